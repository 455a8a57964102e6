"""Solve one input with several solvers, for side-by-side comparisons."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import equinox as eqx
import numpy as np

from .._fixed_point import fixed_point
from .._solution import Solution
from .._solver import Anderson, Naive
from ._trajectory import _model_solve, valid_residuals


def is_model(obj) -> bool:
    """Whether `obj` looks like a `FieldClassifier` (has `solve`, `encoder` and `cell`)."""
    return all(hasattr(obj, a) for a in ("solve", "encoder", "cell"))


def default_solvers(grid: tuple[int, int] | None = None, *, max_levels: int = 3) -> dict:
    """`{"Naive": ..., "Anderson": ..., "Multigrid": ...}` with default hyperparameters.

    Multigrid gets the most levels (up to `max_levels`) that the torus `grid` allows; it
    is left out if it cannot be imported or the grid has an odd side.
    """
    solvers: dict[str, Any] = {"Naive": Naive(), "Anderson": Anderson()}
    try:
        from .._solver.multigrid import Multigrid
    except ImportError:  # pragma: no cover - multigrid is optional while it is written
        return solvers
    levels = 1
    if grid is not None:
        h, w = grid
        while levels < max_levels and h % 2**levels == 0 and w % 2**levels == 0:
            levels += 1
    if levels >= 2:
        solvers["Multigrid"] = Multigrid(levels=levels)
    return solvers


def field_grid(model_or_fn, x, args=None) -> tuple[int, int]:
    """The torus grid `(h, w)` of the field solved for input `x`."""
    if is_model(model_or_fn):
        shape = eqx.filter_eval_shape(model_or_fn.encoder, x).shape
    else:
        shape = np.shape(x)
    return tuple(shape[-2:])


@eqx.filter_jit
def _fn_solve(fn, z0, args, kwargs):
    return fixed_point(fn, z0, args, **kwargs)


def compare_solvers(
    model_or_fn,
    x,
    solvers: Mapping[str, Any] | None = None,
    *,
    args=None,
    max_steps: int = 100,
    rtol: float = 1e-5,
    atol: float = 1e-7,
    **kwargs: Any,
) -> dict[str, Solution]:
    """Solve the same problem with each solver; returns `{name: ff.Solution}`.

    - `model_or_fn`: a `FieldClassifier` (then `x` is one image `(c, H, W)`) or a map
      `fn(z, args)` (then `x` is the initial guess `z0`, and `args` its arguments).
    - `solvers`: `{name: solver}`; default `default_solvers` for the field's grid.

    Every solve records its residual trace (`throw=False`); extra keyword arguments go to
    `ff.fixed_point`.
    """
    if solvers is None:
        solvers = default_solvers(field_grid(model_or_fn, x, args))
    out = {}
    for name, solver in solvers.items():
        kw = dict(kwargs, solver=solver, max_steps=max_steps, rtol=rtol, atol=atol)
        kw.update(residual_trace=True, throw=False)
        if is_model(model_or_fn):
            out[name] = _model_solve(model_or_fn, x, kw)
        else:
            out[name] = _fn_solve(model_or_fn, x, args, kw)
    return out


def work_per_step(sol: Solution) -> float:
    """Average fine-grid map evaluations per solver step (the initial evaluation excluded)."""
    n = int(sol.stats.num_steps)
    return (float(sol.stats.num_fn_evals) - 1.0) / n if n else 1.0


def residual_curve(trace) -> tuple[np.ndarray, np.ndarray]:
    """`(steps, residual)` for a residual trace or a `Solution` (NaNs past the end dropped)."""
    if isinstance(trace, Solution):
        trace = valid_residuals(trace)
    r = np.asarray(trace, np.float64)
    keep = ~np.isnan(r)
    return np.arange(len(r))[keep], r[keep]
