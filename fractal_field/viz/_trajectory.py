"""Record the iterates of a fixed-point solve, for plots and animations."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.tree_util as jtu
import numpy as np

from .._fixed_point import fixed_point
from .._solution import Solution


def valid_residuals(sol: Solution) -> np.ndarray:
    """The absolute residual at steps `0..num_steps` of `sol` (needs `residual_trace=True`)."""
    trace = sol.stats.residual_trace
    if trace is None:
        raise ValueError("The solve recorded no residual trace: pass residual_trace=True.")
    return np.asarray(trace)[: int(sol.stats.num_steps) + 1]


def _trim(sol: Solution, every: int):
    n_valid = int(sol.stats.num_steps) // every + 1
    traj = jtu.tree_map(lambda t: np.asarray(t)[:n_valid], sol.stats.trajectory)
    return traj, valid_residuals(sol)


@eqx.filter_jit
def _solve(fn, z0, args, kwargs):
    return fixed_point(fn, z0, args, **kwargs)


def record_trajectory(
    fn, z0, args=None, *, solver, max_steps: int = 100, every: int = 1, **kwargs: Any
) -> tuple[Any, np.ndarray, Solution]:
    """Solve `z = fn(z, args)` from `z0` with `solver`, recording every `every`-th iterate.

    A thin wrapper over `ff.fixed_point(..., record_every=every, residual_trace=True,
    throw=False)`; other keyword arguments (`rtol`, `atol`, ...) are passed on.

    **Returns** `(trajectory, residuals, solution)`:

    - `trajectory`: numpy, the leaves of `z0` with a leading record axis `T`: record `i` is the
      iterate after `i * every` solver steps (`0` is `z0`), valid records only, i.e.
      `T = num_steps // every + 1`. For `ff.Multigrid` a step is one V-cycle.
    - `residuals`: numpy `(num_steps + 1,)`, the absolute residual `||fn(z) - z||` at every
      step (index 0 is the initial guess), so record `i` has residual `residuals[i * every]`.
    - `solution`: the `ff.Solution` (its `value` is the final iterate, which is not recorded
      when `num_steps` is not a multiple of `every`).
    """
    kwargs = dict(kwargs, solver=solver, max_steps=max_steps, record_every=every)
    kwargs.update(residual_trace=True, throw=False)
    sol = _solve(fn, z0, args, kwargs)
    traj, res = _trim(sol, every)
    return traj, res, sol


@eqx.filter_jit
def _model_solve(model, x, kwargs):
    return model.solve(x, **kwargs)


def model_trajectory(
    model, x, *, solver=None, every: int = 1, max_steps: int | None = None, **kwargs: Any
) -> tuple[np.ndarray, np.ndarray, Solution]:
    """`record_trajectory` for a `FieldClassifier` on one image `x` `(c, H, W)` (normalised).

    Records the complex field `(T, channels, h, w)` from `z0 = 0` to the fixed point (for a
    multi-scale model, a tuple of such stacks, finest first; every figure and animation
    function takes either).
    `solver` and `max_steps` default to the model's own; other keyword arguments (`rtol`,
    `atol`, ...) are passed on to `ff.fixed_point`.
    """
    x = jax.numpy.asarray(x, jax.numpy.float32)
    if x.ndim != 3:
        raise ValueError(f"model_trajectory takes one image (c, H, W), got shape {x.shape}.")
    kwargs = dict(kwargs, record_every=every, residual_trace=True, throw=False)
    kwargs["solver"] = model.solver if solver is None else solver
    kwargs["max_steps"] = model.max_steps if max_steps is None else max_steps
    sol = _model_solve(model, x, kwargs)
    traj, res = _trim(sol, every)
    return traj, res, sol
