"""fractal-field: deep-equilibrium fractal neural fields in JAX/Equinox."""

from ._adjoint import (
    AbstractAdjoint as AbstractAdjoint,
)
from ._adjoint import (
    ImplicitAdjoint as ImplicitAdjoint,
)
from ._adjoint import (
    JacobianFreeAdjoint as JacobianFreeAdjoint,
)
from ._adjoint import (
    PhantomAdjoint as PhantomAdjoint,
)
from ._adjoint import (
    UnrolledAdjoint as UnrolledAdjoint,
)
from ._adjoint import (
    backward_stats_probe as backward_stats_probe,
)
from ._fixed_point import fixed_point as fixed_point
from ._solution import RESULTS as RESULTS
from ._solution import Solution as Solution
from ._solution import Stats as Stats
from ._solver import (
    AbstractFixedPointSolver as AbstractFixedPointSolver,
)
from ._solver import (
    Anderson as Anderson,
)
from ._solver import (
    Naive as Naive,
)

__version__ = "0.1.0"
