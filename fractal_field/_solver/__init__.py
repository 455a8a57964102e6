from .anderson import Anderson as Anderson
from .base import AbstractFixedPointSolver as AbstractFixedPointSolver
from .broyden import Broyden as Broyden
from .multigrid import Multigrid as Multigrid, chebyshev_damping as chebyshev_damping
from .naive import Naive as Naive
from .reversible import Reversible as Reversible
