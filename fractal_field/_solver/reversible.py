"""The reversible relaxed iteration (McCallum & Foster, 2025)."""

from __future__ import annotations

import jax.tree_util as jtu

from .._misc import tree_lerp
from .base import AbstractFixedPointSolver


def unlerp(new, f, beta: float):
    """Undo `new = (1 - beta) old + beta f`: `old = (new - beta f) / (1 - beta)`, leafwise."""
    return jtu.tree_map(lambda n, g: ((n - beta * g) / (1 - beta)).astype(n.dtype), new, f)


class Reversible(AbstractFixedPointSolver):
    """Two coupled relaxed sequences, both started at `z0`, whose steps can be undone:

    `y <- (1 - beta) y + beta f(z)`, then `z <- (1 - beta) z + beta f(y)` (the new `y`).

    The iterate (the value and the stopping test) is `z`. Each step is inverted by
    `z_old = (z - beta f(y)) / (1 - beta)`, then `y_old = (y - beta f(z_old)) / (1 - beta)`,
    which `ff.ReversibleAdjoint` uses to differentiate the iteration exactly without storing
    it. Converges to the fixed point of a contraction for any `beta` in (0, 1); two map
    evaluations per step. McCallum & Foster, "Reversible Deep Equilibrium Models" (2025).
    """

    beta: float = 0.5

    def __check_init__(self):
        if not 0 < self.beta < 1:
            raise ValueError(
                f"Reversible(beta={self.beta}): beta must lie in (0, 1) (beta = 1 cannot be "
                "undone)."
            )

    def init(self, fn, y, fy, args):
        # The companion sequence, started at z0.
        return y

    def step(self, fn, y, fy, args, state):
        companion = tree_lerp(state, fy, self.beta)
        z = tree_lerp(y, fn(companion, args), self.beta)
        return z, fn(z, args), companion, 2.0

    def undo(self, fn, z, companion, args):
        """The previous `(z, companion)` from the current ones (one step backwards)."""
        z_old = unlerp(z, fn(companion, args), self.beta)
        return z_old, unlerp(companion, fn(z_old, args), self.beta)
