"""Plain (optionally damped) fixed-point iteration."""

from __future__ import annotations

from .._misc import tree_lerp
from .base import AbstractFixedPointSolver


class Naive(AbstractFixedPointSolver):
    """Picard iteration `z <- (1 - damping) z + damping f(z)`.

    Converges for any start when `f` is a contraction and `0 < damping <= 1`; damping below 1
    can also rescue mildly expansive or oscillating maps.
    """

    damping: float = 1.0

    def __check_init__(self):
        if not 0 < self.damping <= 1:
            raise ValueError(f"Naive(damping={self.damping}): damping must lie in (0, 1].")

    def init(self, fn, y, fy, args):
        return None

    def step(self, fn, y, fy, args, state):
        y_new = fy if self.damping == 1 else tree_lerp(y, fy, self.damping)
        return y_new, fn(y_new, args), None, 1.0
