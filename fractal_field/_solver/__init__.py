from .anderson import Anderson as Anderson
from .broyden import Broyden as Broyden
from .base import AbstractFixedPointSolver as AbstractFixedPointSolver
from .multigrid import Multigrid as Multigrid
from .naive import Naive as Naive
from .reversible import Reversible as Reversible
