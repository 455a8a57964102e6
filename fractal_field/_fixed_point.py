"""`fixed_point`: the one driver that owns the solver loop."""

from __future__ import annotations

from functools import partial
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import PyTree

from ._energy import AbstractEnergyMap
from ._loop import while_done
from ._misc import (
    check_inexact,
    check_same_structure,
    state_real_dtype,
    tree_norm,
    tree_sub,
    tree_where,
)
from ._solution import RESULTS, Solution, Stats
from ._solver.anderson import Anderson
from ._solver.base import AbstractFixedPointSolver, Fn


class _Config(eqx.Module):
    """Loop settings shared by the forward solve and the adjoint's backward solve."""

    solver: AbstractFixedPointSolver
    max_steps: int = eqx.field(static=True)
    rtol: float = eqx.field(static=True)
    atol: float = eqx.field(static=True)
    divergence: float = eqx.field(static=True)
    residual_trace: bool = eqx.field(static=True, default=False)
    record_every: int | None = eqx.field(static=True, default=None)
    polish: bool = eqx.field(static=True, default=True)


def _record(buf, y, step, every):
    if buf is None:
        return None
    slot = step // every
    write = (step % every == 0) & (slot < jtu.tree_leaves(buf)[0].shape[0])
    slot = jnp.minimum(slot, jtu.tree_leaves(buf)[0].shape[0] - 1)
    return jtu.tree_map(lambda b, x: jnp.where(write, b.at[slot].set(x), b), buf, y)


def solve_loop(
    fn: Fn,
    z0: PyTree,
    args: PyTree,
    cfg: _Config,
    *,
    differentiable: bool = False,
    return_state: bool = False,
):
    """Run `cfg.solver` from `z0` and return `(value, result, stats)`, plus the last iterate
    and solver state `(y, state)` with `return_state=True`.

    With `differentiable=False` the loop is a `lax.while_loop` with early exit (no history is
    stored). With `differentiable=True` it is a masked `lax.scan` of `max_steps` steps that
    reverse-mode autodiff can go through (memory grows with `max_steps`).
    """
    solver = cfg.solver
    rdtype = state_real_dtype(z0)
    fy0 = fn(z0, args)
    res0 = tree_norm(tree_sub(fy0, z0)).astype(rdtype)
    fnorm0 = tree_norm(fy0).astype(rdtype)
    finite0 = jnp.isfinite(res0)
    conv0 = res0 <= cfg.atol + cfg.rtol * fnorm0
    result0 = RESULTS.where(
        finite0,
        RESULTS.where(conv0, RESULTS.successful, RESULTS.max_steps_reached),
        RESULTS.nonfinite_input,
    )
    done0 = conv0 | ~finite0 | (cfg.max_steps <= 0)
    trace = None
    if cfg.residual_trace:
        trace = jnp.full((cfg.max_steps + 1,), jnp.nan, rdtype).at[0].set(res0)
    traj = None
    if cfg.record_every is not None:
        n_rec = cfg.max_steps // cfg.record_every + 1
        traj = jtu.tree_map(lambda x: jnp.zeros((n_rec,) + x.shape, x.dtype), z0)
        traj = _record(traj, z0, 0, cfg.record_every)
    carry0 = dict(
        step=jnp.array(0),
        y=z0,
        fy=fy0,
        state=solver.init(fn, z0, fy0, args),
        result=result0,
        done=done0,
        res=res0,
        fnorm=fnorm0,
        best=res0,
        work=jnp.array(1.0, rdtype),
        trace=trace,
        traj=traj,
    )

    def body(ops, c):
        fn, args, solver = ops
        y, fy, state, work = solver.step(fn, c["y"], c["fy"], args, c["state"])
        step = c["step"] + 1
        res = tree_norm(tree_sub(fy, y)).astype(rdtype)
        fnorm = tree_norm(fy).astype(rdtype)
        finite = jnp.isfinite(res) & jnp.isfinite(fnorm)
        converged = finite & (res <= cfg.atol + cfg.rtol * fnorm)
        diverged = finite & (res > cfg.divergence * c["best"]) & (cfg.divergence > 0)
        out_of_steps = step >= cfg.max_steps
        result = RESULTS.where(
            ~finite,
            RESULTS.nonfinite,
            RESULTS.where(
                converged,
                RESULTS.successful,
                RESULTS.where(diverged, RESULTS.diverged, RESULTS.max_steps_reached),
            ),
        )
        # Never hand back a non-finite iterate: keep the last finite one.
        y, fy = tree_where(finite, y, c["y"]), tree_where(finite, fy, c["fy"])
        new = dict(
            step=step,
            y=y,
            fy=fy,
            state=state,
            result=result,
            done=~finite | converged | diverged | out_of_steps,
            res=jnp.where(finite, res, c["res"]),
            fnorm=jnp.where(finite, fnorm, c["fnorm"]),
            best=jnp.where(finite, jnp.minimum(c["best"], res), c["best"]),
            work=c["work"] + work,
            trace=None if c["trace"] is None else c["trace"].at[step].set(res),
            traj=_record(c["traj"], y, step, cfg.record_every) if cfg.record_every else None,
        )
        return new

    if differentiable:

        def scan_body(c, _):
            new = body((fn, args, solver), c)
            return tree_where(c["done"], c, new), None

        final, _ = jax.lax.scan(scan_body, carry0, None, length=cfg.max_steps)
    elif getattr(solver, "resolution_agnostic", False):
        # Calls fn on other grids, so fn cannot be closure-converted at this grid.
        final = jax.lax.while_loop(lambda c: ~c["done"], partial(body, (fn, args, solver)), carry0)
    else:
        fn = eqx.filter_closure_convert(fn, z0, args)
        # A finished sample's solver state may keep changing, unless it is handed back.
        scratch = () if return_state else ("state",)
        final = while_done(body, (fn, args, solver), carry0, scratch=scratch)

    stats = Stats(
        num_steps=final["step"],
        num_fn_evals=final["work"],
        residual=final["res"],
        relative_residual=final["res"] / jnp.maximum(final["fnorm"], jnp.finfo(rdtype).tiny),
        residual_trace=final["trace"],
        trajectory=final["traj"],
    )
    # Codes and statistics carry no gradient.
    stats = jtu.tree_map(jax.lax.stop_gradient, stats)
    result = final["result"]
    value = final["y"]
    if cfg.polish:
        # f(z_k) is already computed (the stopping test needs it): one more step for free.
        # A failed solve hands back its last iterate, the one its statistics describe.
        value = tree_where(result == RESULTS.successful, final["fy"], value)
    if return_state:
        return value, result, stats, (final["y"], final["state"])
    return value, result, stats


def strip_tangent(result: RESULTS) -> RESULTS:
    """A result code with a symbolic-zero tangent, safe for `error_if` under autodiff."""
    code = jax.lax.stop_gradient(result._value.astype(jnp.float32)).astype(jnp.int32)
    return eqx.tree_at(lambda r: r._value, result, code)


def fixed_point(
    fn: Fn,
    z0: PyTree,
    args: PyTree = None,
    *,
    solver: AbstractFixedPointSolver = Anderson(),
    adjoint=None,
    max_steps: int = 100,
    rtol: float = 1e-4,
    atol: float = 1e-6,
    throw: bool = True,
    divergence: float = 1e4,
    residual_trace: bool = False,
    record_every: int | None = None,
    polish: bool = True,
    stats_probe=None,
) -> Solution:
    """Find `z` with `z = fn(z, args)`, starting from `z0`.

    - `fn(z, args) -> z'`: same pytree structure, shapes and dtypes as `z0` (real or complex
      leaves). Parameters may enter through `args`, as `fn` being an `eqx.Module`, or by
      closure.
    - `solver`: `ff.Naive`, `ff.Anderson` (default), `ff.Broyden`, `ff.Multigrid` or
      `ff.Reversible`.
    - `adjoint`: how to differentiate; `ff.ImplicitAdjoint()` (default), `ff.PhantomAdjoint`,
      `ff.JacobianFreeAdjoint`, `ff.UnrolledAdjoint`, `ff.ReversibleAdjoint` (with
      `solver=ff.Reversible()`) or `ff.EquilibriumPropagation` (for a `fn` that is an
      `ff.AbstractEnergyMap`).
    - Stops when `||fn(z) - z|| <= atol + rtol * ||fn(z)||` (2-norm over the whole pytree;
      under `vmap`, per sample), when a value turns non-finite, when the residual exceeds
      `divergence` times the best residual so far (`divergence=0` disables it), or after
      `max_steps` steps.
    - `throw=True` raises a runtime error naming the cause when the solve does not succeed;
      with `throw=False` inspect `sol.result` (a `ff.RESULTS` code) instead.
    - `residual_trace=True` records the residual at every step in `sol.stats.residual_trace`;
      `record_every=k` records every k-th iterate in `sol.stats.trajectory` (bounded by
      `max_steps // k + 1` copies of the state).
    - `polish=True` returns `fn(z_k)` for the last iterate `z_k` of a successful solve: the
      stopping test has already computed it, so it costs nothing, and for a contraction it lies
      closer to the fixed point than `z_k` by the contraction factor. `polish=False` (and any
      failed solve) returns `z_k` itself, whose residual is the one the stopping test saw; use
      it for maps that only converge damped.
    - `stats_probe`: an array from `ff.backward_stats_probe()`; differentiating the loss with
      respect to it returns the backward solve's statistics (see `ImplicitAdjoint`).

    Returns a `ff.Solution` with `value`, `result` and `stats`.
    """
    from ._adjoint import ImplicitAdjoint  # circular import

    if adjoint is None:
        adjoint = ImplicitAdjoint()
    if not isinstance(solver, AbstractFixedPointSolver):
        raise TypeError(f"solver must be an ff solver (Naive, Anderson, ...), got {solver!r}.")
    if max_steps < 0:
        raise ValueError(f"max_steps must be >= 0, got {max_steps}.")
    if record_every is not None and record_every < 1:
        raise ValueError(f"record_every must be a positive integer, got {record_every}.")
    check_inexact(z0)
    try:
        out = jax.eval_shape(fn, z0, args)
    except Exception as e:  # noqa: BLE001
        raise type(e)(f"fn(z0, args) failed while checking the problem: {e}") from e
    check_same_structure(z0, out)
    solver.check(fn, z0, args)
    converted = eqx.filter_closure_convert(fn, z0, args)
    if isinstance(fn, AbstractEnergyMap):
        pass  # holds its parameters as fields; `EquilibriumPropagation` needs its energy
    elif getattr(solver, "resolution_agnostic", False) is False:
        # Make closed-over arrays explicit, so gradients reach them.
        fn = converted
    elif any(
        isinstance(c, jax.core.Tracer) and id(c) not in {id(x) for x in jtu.tree_leaves(fn)}
        for c in jtu.tree_leaves(converted)
    ):
        raise ValueError(
            f"{type(solver).__name__} calls fn on other grid sizes, so fn cannot close over "
            "traced arrays (e.g. parameters being differentiated or jit arguments): pass them "
            "through `args` or make fn an eqx.Module holding them."
        )
    cfg = _Config(
        solver=solver,
        max_steps=max_steps,
        rtol=rtol,
        atol=atol,
        divergence=divergence,
        residual_trace=residual_trace,
        record_every=record_every,
        polish=polish,
    )
    value, result, stats = adjoint.apply(fn, z0, args, cfg, stats_probe)
    result = strip_tangent(result)
    if throw:
        value = result.error_if(value, result != RESULTS.successful)
    return Solution(value=value, result=result, stats=stats)


def solve_settings(owner, overrides: dict) -> dict[str, Any]:
    """`fixed_point` keywords from a model's `solver`, `adjoint`, `max_steps`, `rtol` and
    `atol` (with `throw=False`: a model reports failures as result codes), then `overrides`."""
    kwargs: dict[str, Any] = dict(
        solver=owner.solver,
        adjoint=owner.adjoint,
        max_steps=owner.max_steps,
        rtol=owner.rtol,
        atol=owner.atol,
        throw=False,
    )
    kwargs.update(overrides)
    return kwargs
