"""Result codes, solver statistics and the `Solution` returned by `fixed_point`."""

from __future__ import annotations

import equinox as eqx
from jaxtyping import Array, Float, Int, PyTree


class RESULTS(eqx.Enumeration):
    """Outcome of a solve. Compare with `sol.result == ff.RESULTS.successful`.

    Each message starts with the item's name, so `print(sol.result)` names it
    (`...RESULTS<successful>`).
    """

    successful = "successful"
    max_steps_reached = (
        "max_steps_reached: the fixed-point solver did not converge: it reached `max_steps` "
        "with the residual still above the tolerance. Raise `max_steps`, loosen `rtol`/`atol`, "
        "use a stronger solver (Anderson, Multigrid) or make the map more contractive."
    )
    nonfinite = (
        "nonfinite: the fixed-point solver produced a non-finite value (NaN or inf) in the "
        "iterate or its residual. Check the inputs for NaN/inf and the map for overflow."
    )
    diverged = (
        "diverged: the fixed-point iteration diverged: the residual grew far above the smallest "
        "residual seen. The map is probably not contractive; lower the step size "
        "(damping/mixing) or constrain the map's Lipschitz constant."
    )
    nonfinite_input = (
        "nonfinite_input: the initial guess z0 (or fn(z0, args)) contains NaN or inf values."
    )


class Stats(eqx.Module):
    """Statistics of one solve (per sample under `vmap`).

    - `num_steps`: solver steps taken.
    - `num_fn_evals`: map evaluations, in fine-grid-equivalent work (a multigrid evaluation
      on a grid 4x smaller counts 1/4).
    - `residual`: the stopping test's absolute residual `||f(z_k) - z_k||` at the last
      iterate `z_k`. The returned value is `f(z_k)` by default (`polish=True`), whose own
      residual is smaller by the map's contraction factor.
    - `relative_residual`: `||f(z_k) - z_k|| / ||f(z_k)||`.
    - `residual_trace`: the absolute residual at each step (NaN past the last step), or
      `None` unless `fixed_point(..., residual_trace=True)`.
    - `trajectory`: recorded iterates (leading axis: record index), or `None`.
    """

    num_steps: Int[Array, ""]
    num_fn_evals: Float[Array, ""]
    residual: Float[Array, ""]
    relative_residual: Float[Array, ""]
    residual_trace: Float[Array, " max_steps"] | None = None
    trajectory: PyTree | None = None


class Solution(eqx.Module):
    """What `fixed_point` returns.

    - `value`: the fixed point, with the structure and dtypes of `z0`.
    - `result`: a `RESULTS` code.
    - `stats`: a `Stats`.
    """

    value: PyTree
    result: RESULTS
    stats: Stats
