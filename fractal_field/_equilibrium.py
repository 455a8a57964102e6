"""Equilibrium propagation: a gradient from two nudged fixed points, no backward solve."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from ._adjoint import (
    BACKWARD_STATS,
    AbstractAdjoint,
    _stop,
    solve_at_fixed_point,
    value_cotangent,
)
from ._energy import AbstractEnergyMap
from ._fixed_point import _Config, solve_loop, strip_tangent
from ._misc import state_real_dtype, tree_norm
from ._solution import RESULTS
from ._solver.base import AbstractFixedPointSolver


class EquilibriumPropagation(AbstractAdjoint):
    """Equilibrium propagation (Scellier & Bengio, 2017) for energy maps
    (`ff.AbstractEnergyMap`, e.g. `ff.SymmetricCell`).

    For a loss `L(z*)` at the free fixed point `z*`, the adjoint receives `g = dL/dz*` and
    solves the map again, nudged: `z_s` is the fixed point for the energy
    `E(z) + s Re<g, z>`, started from `z*`. Then `dL/dtheta` is estimated by
    `(dE/dtheta(z_s) - dE/dtheta(z_-s)) / (2 s)` (`symmetric=True`: two nudged solves, error
    `O(s^2)`) or `(dE/dtheta(z_s) - dE/dtheta(z*)) / s` (`symmetric=False`: one solve, error
    `O(s)`). `dE/dtheta` is a local derivative of the energy at a given state: no backward
    solve and no pass through the iterations. As `s -> 0` the estimate is the implicit
    gradient (`ff.ImplicitAdjoint`).

    - `beta`: nudge strength, relative: `s g` has norm `beta * max(||z*||, 1)`.
    - `solver`, `max_steps`, `rtol`, `atol`: the nudged solves (default: the forward solver
      and `max_steps`). Their error enters divided by `beta`: keep `rtol` well below it.
    - `throw`: raise if a nudged solve does not converge; otherwise the failure is counted in
      the `stats_probe` gradient, which carries `[nudged solver steps (both solves),
      largest relative residual, failed]`.

    The nudge is the loss's gradient at `z*` (the linearised loss, what autodiff hands the
    adjoint), not the loss itself; both give the same limit.
    """

    beta: float = eqx.field(static=True, default=0.1)
    symmetric: bool = eqx.field(static=True, default=True)
    solver: AbstractFixedPointSolver | None = None
    max_steps: int | None = eqx.field(static=True, default=None)
    rtol: float = eqx.field(static=True, default=1e-4)
    atol: float = eqx.field(static=True, default=1e-7)
    throw: bool = eqx.field(static=True, default=True)

    def __check_init__(self):
        if not self.beta > 0:
            raise ValueError(f"EquilibriumPropagation(beta={self.beta}) must be positive.")

    def apply(self, fn, z0, args, cfg, probe):
        if not isinstance(fn, AbstractEnergyMap):
            raise TypeError(
                "EquilibriumPropagation needs a map that is the gradient of an energy "
                "(an ff.AbstractEnergyMap such as ff.SymmetricCell, whose coupling is "
                f"Hermitian); got {type(fn).__name__}. A FractalCell's convolution is not "
                "symmetric, so its update has no energy: use another adjoint or a "
                "SymmetricCell."
            )
        if probe is None:
            probe = jnp.zeros((len(BACKWARD_STATS),), jnp.float32)
        return _ep((fn, args, probe), _stop(z0), cfg, self)


def _ep_bwd(z_star, grad_obj, perturbed, vjp_arg, z0, cfg, adjoint: EquilibriumPropagation):
    fn, args, probe = vjp_arg
    # JAX's cotangent of a real loss is conj(dL/dRe + i dL/dIm): its conjugate is the
    # gradient as a vector, the direction of the nudge.
    g = jtu.tree_map(jnp.conj, value_cotangent(grad_obj, z_star))
    rdtype = state_real_dtype(z_star)
    size = jnp.maximum(tree_norm(z_star).astype(rdtype), 1.0)
    s = adjoint.beta * size / jnp.maximum(tree_norm(g).astype(rdtype), jnp.finfo(rdtype).tiny)
    ncfg = _Config(
        solver=cfg.solver if adjoint.solver is None else adjoint.solver,
        max_steps=cfg.max_steps if adjoint.max_steps is None else adjoint.max_steps,
        rtol=adjoint.rtol,
        atol=adjoint.atol,
        divergence=cfg.divergence,
    )

    def nudged(sign):
        nudge = jtu.tree_map(lambda x: (sign * s * x).astype(x.dtype), g)
        return solve_loop(lambda z, a: fn(z, a, nudge), z_star, args, ncfg)

    z_plus, r_plus, st_plus = nudged(1.0)
    solves = [(r_plus, st_plus)]
    if adjoint.symmetric:
        z_minus, r_minus, st_minus = nudged(-1.0)
        solves.append((r_minus, st_minus))
        denom = 2 * s
    else:
        z_minus, denom = z_star, s
    dyn, rest = eqx.partition((fn, args), (perturbed[0], perturbed[1]))

    def energy_difference(d):
        fn_, a = eqx.combine(d, rest)
        return (fn_.energy(z_plus, a) - fn_.energy(z_minus, a)) / denom

    e, vjp = jax.vjp(energy_difference, dyn)
    (grads,) = vjp(jnp.ones_like(e))
    failed = sum((strip_tangent(r) != RESULTS.successful).astype(jnp.float32) for r, _ in solves)
    if adjoint.throw:
        for r, _ in solves:
            grads = strip_tangent(r).error_if(grads, strip_tangent(r) != RESULTS.successful)
    steps = sum(st.num_steps.astype(jnp.float32) for _, st in solves)
    residual = jnp.max(jnp.stack([st.relative_residual.astype(jnp.float32) for _, st in solves]))
    probe_ct = jnp.stack([steps, residual, failed]).astype(probe.dtype)
    return grads[0], grads[1], probe_ct if perturbed[2] else None


_ep = solve_at_fixed_point(_ep_bwd)
