from .anderson import Anderson as Anderson
from .base import AbstractFixedPointSolver as AbstractFixedPointSolver
from .naive import Naive as Naive
