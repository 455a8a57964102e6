"""The interface every fixed-point solver implements."""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import equinox as eqx
from jaxtyping import Array, PyTree

Fn = Callable[[PyTree, PyTree], PyTree]


class AbstractFixedPointSolver(eqx.Module):
    """A fixed-point solver: holds only hyperparameters.

    The shared driver (`ff.fixed_point`) owns the loop. It evaluates `fy = fn(y, args)` once
    before the loop and then calls `step` until the driver's residual test passes:

    - `init(fn, y, fy, args) -> state`
    - `step(fn, y, fy, args, state) -> (y_new, fy_new, state_new, work)`: one solver step,
      returning the new iterate, the map at the new iterate and the work spent in
      fine-grid-equivalent map evaluations (including the one for `fy_new`).
    - `check(fn, z0, args)`: optional trace-time validation of the problem.
    """

    @abc.abstractmethod
    def init(self, fn: Fn, y: PyTree, fy: PyTree, args: PyTree) -> Any: ...

    @abc.abstractmethod
    def step(
        self, fn: Fn, y: PyTree, fy: PyTree, args: PyTree, state: Any
    ) -> tuple[PyTree, PyTree, Any, Array | float]: ...

    def check(self, fn: Fn, z0: PyTree, args: PyTree) -> None:
        del fn, z0, args
