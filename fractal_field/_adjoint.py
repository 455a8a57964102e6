"""How `fixed_point` is differentiated: one adjoint object, reused by every solver."""

from __future__ import annotations

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Float

from ._fixed_point import _Config, solve_loop, strip_tangent
from ._misc import state_real_dtype, tree_add, tree_lerp, tree_norm, tree_sub, tree_where
from ._solution import RESULTS
from ._solver.anderson import Anderson
from ._solver.base import AbstractFixedPointSolver
from ._solver.reversible import Reversible, unlerp

BACKWARD_STATS = ("num_steps", "relative_residual", "failed")


def backward_stats_probe() -> Float[Array, " 3"]:
    """A zero array to pass as `fixed_point(..., stats_probe=probe)`.

    Its gradient carries the statistics of `ImplicitAdjoint`'s backward solve:
    `[num_steps, relative_residual, failed]`, summed over every solve it took part in (e.g.
    over a `vmap`ped batch; divide by the batch size for means). Other adjoints leave it zero.
    """
    return jnp.zeros((len(BACKWARD_STATS),), jnp.float32)


def _stop(tree):
    return jtu.tree_map(lambda x: jax.lax.stop_gradient(x) if eqx.is_array(x) else x, tree)


def value_cotangent(grad_obj, like):
    """The cotangent of a solve's value with symbolic zeros (`None`) made real zeros."""
    return jtu.tree_map(
        lambda ct, z: jnp.zeros_like(z) if ct is None else ct,
        grad_obj[0],
        like,
        is_leaf=lambda x: x is None,
    )


def map_of_perturbed(fn, args, perturbed):
    """`(at, dyn)`: `at(z, dyn) = fn(z, args)` with the differentiated parts of `(fn, args)`
    (as `perturbed` marks them) split out as `dyn`."""
    dyn, rest = eqx.partition((fn, args), (perturbed[0], perturbed[1]))

    def at(z, d):
        f, a = eqx.combine(d, rest)
        return f(z, a)

    return at, dyn


class AbstractAdjoint(eqx.Module):
    """Decides how gradients flow through a fixed-point solve."""

    @abc.abstractmethod
    def apply(self, fn, z0, args, cfg: _Config, probe):
        """Return `(value, result, stats)`."""


class UnrolledAdjoint(AbstractAdjoint):
    """Backpropagate through every iteration (a masked `lax.scan` of `max_steps` steps).

    Exact derivative of what the solver computed, memory linear in `max_steps`: the
    reference for short solves and for checking the other adjoints.
    """

    def apply(self, fn, z0, args, cfg, probe):
        return solve_loop(fn, z0, args, cfg, differentiable=True)


class PhantomAdjoint(AbstractAdjoint):
    """k-step phantom gradient (Geng et al., 2021).

    The forward value is the solver's fixed point `z*` exactly; the gradient is that of `k`
    damped steps `z <- (1 - damping) z + damping f(z)` started at `stop_gradient(z*)`. This
    replaces `(I - J)^{-1}` by `damping * sum_{i<k} ((1 - damping) I + damping J)^i`, an
    approximation that improves with `k` for a contractive map; cost `k` map VJPs.
    """

    steps: int = 5
    damping: float = 0.5

    def __check_init__(self):
        if self.steps < 1:
            raise ValueError(f"PhantomAdjoint(steps={self.steps}): steps must be >= 1.")
        if not 0 < self.damping <= 1:
            raise ValueError(f"PhantomAdjoint(damping={self.damping}) must lie in (0, 1].")

    def apply(self, fn, z0, args, cfg, probe):
        value, result, stats = solve_loop(_stop(fn), _stop(z0), _stop(args), cfg)
        value = _stop(value)
        # A rolled loop: compile time does not grow with `steps`.
        z = jax.lax.fori_loop(
            0, self.steps, lambda _, z: tree_lerp(z, fn(z, args), self.damping), value
        )
        # Value exactly z*, gradient through the k unrolled steps.
        out = jtu.tree_map(lambda v, u: v + (u - jax.lax.stop_gradient(u)), value, z)
        return out, result, stats


class JacobianFreeAdjoint(PhantomAdjoint):
    """Jacobian-free backpropagation (Fung et al., 2022): one undamped step from `z*`.

    Replaces `(I - J)^{-1}` by `I`; cheapest option, a descent direction for contractive
    maps but not the exact gradient.
    """

    steps: int = 1
    damping: float = 1.0


class ImplicitAdjoint(AbstractAdjoint):
    """Exact gradient at the fixed point by the implicit function theorem.

    For `z* = f(z*, theta)` and an output cotangent `g`, solves `u = J_z^T u + g` iteratively
    with `solver` (a fixed-point solver on the linear map; Anderson by default) to
    `rtol`/`atol` within `max_steps`, then returns `J_theta^T u`. Only `z*` is kept from the
    forward pass, so memory does not depend on the number of forward iterations.

    A backward solve that does not converge is never silent: with `throw=True` (default)
    it raises; with `throw=False` the (best-effort) gradient is returned and the failure is
    counted in the `stats_probe` gradient (see `backward_stats_probe`).
    """

    solver: AbstractFixedPointSolver = Anderson(history=5)
    max_steps: int = eqx.field(static=True, default=100)
    rtol: float = eqx.field(static=True, default=1e-4)
    atol: float = eqx.field(static=True, default=1e-7)
    throw: bool = eqx.field(static=True, default=True)

    def apply(self, fn, z0, args, cfg, probe):
        if probe is None:
            probe = jnp.zeros((len(BACKWARD_STATS),), jnp.float32)
        value, result, stats = _implicit((fn, args, probe), _stop(z0), cfg, self)
        return value, result, stats


def solve_at_fixed_point(bwd):
    """`solve(vjp_arg, z0, cfg, adjoint)`: the forward solve of `vjp_arg = (fn, args, probe)`
    with a custom VJP that keeps only `z*` and calls
    `bwd(z_star, grad_obj, perturbed, vjp_arg, z0, cfg, adjoint)` for the gradients of
    `(fn, args, probe)`."""

    @eqx.filter_custom_vjp
    def solve(vjp_arg, z0, cfg, adjoint):
        fn, args, _ = vjp_arg
        return solve_loop(fn, z0, args, cfg)

    @solve.def_fwd
    def _fwd(perturbed, vjp_arg, z0, cfg, adjoint):
        fn, args, _ = vjp_arg
        out = solve_loop(fn, z0, args, cfg)
        return out, out[0]

    solve.def_bwd(bwd)
    return solve


def _implicit_bwd(z_star, grad_obj, perturbed, vjp_arg, z0, cfg, adjoint: ImplicitAdjoint):
    fn, args, probe = vjp_arg
    g = value_cotangent(grad_obj, z_star)
    at, dyn = map_of_perturbed(fn, args, perturbed)

    # Linearise once, in `z` and the parameters together: the backward loop uses the `z` part
    # (the parameter part is dead code there), the final step the parameter part.
    _, vjp_all = jax.vjp(at, z_star, dyn)

    def linear(u, _):
        return tree_add(vjp_all(u)[0], g)

    bcfg = _Config(
        solver=adjoint.solver,
        max_steps=adjoint.max_steps,
        rtol=adjoint.rtol,
        atol=adjoint.atol,
        divergence=cfg.divergence,
    )
    u, bresult, bstats = solve_loop(linear, g, None, bcfg)
    bresult = strip_tangent(bresult)
    failed = bresult != RESULTS.successful
    if adjoint.throw:
        u = bresult.error_if(u, failed)
    _, g_params = vjp_all(u)
    probe_ct = jnp.stack(
        [
            bstats.num_steps.astype(jnp.float32),
            bstats.relative_residual.astype(jnp.float32),
            failed.astype(jnp.float32),
        ]
    ).astype(probe.dtype)
    probe_ct = probe_ct if perturbed[2] else None
    return g_params[0], g_params[1], probe_ct


_implicit = solve_at_fixed_point(_implicit_bwd)


class ReversibleAdjoint(AbstractAdjoint):
    """Exact gradient of the iteration `ff.Reversible` ran, in memory independent of its
    number of steps (McCallum & Foster, 2025).

    The forward pass is the reversible solver's early-stopping loop and keeps only its last
    pair of states. The backward pass runs the iteration backwards over the same number of
    steps, reconstructing each state from the next (`Reversible.undo`) and accumulating the
    vector-Jacobian products of every step: two map VJPs per step, no stored iterates. The
    gradient is that of the finite iteration actually run (including `polish` and
    gradients with respect to `z0`), up to the reconstruction's rounding error.

    Undoing a step is exact only in exact arithmetic: it divides by `1 - beta` and undoes
    the map's contraction, so rounding errors grow geometrically backwards (by at most
    `(1 - beta)^-2` per step for a map with Lipschitz constant 1). The gradient is at rounding
    level for short, loosely converged solves (float64, 18 steps: 8e-13; float32, 10 steps:
    7e-7 on a Nano-like cell) and is lost once the reconstruction error reaches the size of
    the state (float32 beyond ~20 steps; see `docs/gradients.md`). Prefer an unrelaxed map
    (the solver relaxes) and loose tolerances. The `stats_probe` gradient carries
    `[num_steps, reconstruction error, 0]`: the backward steps, and the distance of the
    reconstructed initial states from `z0` relative to the final state's norm.

    Needs `solver=ff.Reversible(...)`.
    """

    def apply(self, fn, z0, args, cfg, probe):
        if not isinstance(cfg.solver, Reversible):
            raise TypeError(
                "ReversibleAdjoint differentiates the reversible iteration: use "
                f"solver=ff.Reversible(beta=...), not {type(cfg.solver).__name__}."
            )
        if probe is None:
            probe = jnp.zeros((len(BACKWARD_STATS),), jnp.float32)
        value, result, stats = _reversible((fn, args, z0, probe), cfg)
        return value, result, stats


@eqx.filter_custom_vjp
def _reversible(vjp_arg, cfg):
    fn, args, z0, _ = vjp_arg
    return solve_loop(fn, z0, args, cfg)


@_reversible.def_fwd
def _reversible_fwd(perturbed, vjp_arg, cfg):
    fn, args, z0, _ = vjp_arg
    value, result, stats, (z, companion) = solve_loop(fn, z0, args, cfg, return_state=True)
    polished = cfg.polish & (result == RESULTS.successful)
    return (value, result, stats), (z, companion, stats.num_steps, polished)


@_reversible.def_bwd
def _reversible_bwd(residuals, grad_obj, perturbed, vjp_arg, cfg):
    fn, args, z0, probe = vjp_arg
    z_n, y_n, num_steps, polished = residuals
    beta = cfg.solver.beta
    g = value_cotangent(grad_obj, z_n)
    f, dyn = map_of_perturbed(fn, args, perturbed)

    def scale(c, tree):
        return jtu.tree_map(lambda x: (c * x).astype(x.dtype), tree)

    # The value is f(z_n) when polished, else z_n.
    _, vjp_n = jax.vjp(f, z_n, dyn)
    gz, gd = vjp_n(g)
    zbar = tree_where(polished, gz, g)
    dbar = jtu.tree_map(lambda x: jnp.where(polished, x, jnp.zeros_like(x)), gd)
    ybar = jtu.tree_map(jnp.zeros_like, y_n)

    def body(c):
        k, z, y, zbar, ybar, dbar = c
        # Step k: y_k = (1 - b) y_{k-1} + b f(z_{k-1}); z_k = (1 - b) z_{k-1} + b f(y_k).
        fy, vjp_y = jax.vjp(f, y, dyn)
        z_prev = unlerp(z, fy, beta)
        ay, ad = vjp_y(scale(beta, zbar))
        ybar = tree_add(ybar, ay)
        dbar = tree_add(dbar, ad)
        fz, vjp_z = jax.vjp(f, z_prev, dyn)
        y_prev = unlerp(y, fz, beta)
        az, ad = vjp_z(scale(beta, ybar))
        zbar = tree_add(scale(1 - beta, zbar), az)
        dbar = tree_add(dbar, ad)
        return k - 1, z_prev, y_prev, zbar, scale(1 - beta, ybar), dbar

    _, z_0, y_0, zbar, ybar, dbar = jax.lax.while_loop(
        lambda c: c[0] > 0, body, (num_steps, z_n, y_n, zbar, ybar, dbar)
    )
    rdtype = state_real_dtype(z_n)
    err = jnp.maximum(tree_norm(tree_sub(z_0, z0)), tree_norm(tree_sub(y_0, z0))).astype(rdtype)
    err = err / jnp.maximum(tree_norm(z_n).astype(rdtype), jnp.finfo(rdtype).tiny)
    probe_ct = jnp.stack(
        [num_steps.astype(jnp.float32), err.astype(jnp.float32), jnp.zeros((), jnp.float32)]
    ).astype(probe.dtype)
    z0_ct = jtu.tree_map(
        lambda p, a, b: (a + b) if p else None,
        perturbed[2],
        zbar,
        ybar,
    )
    return dbar[0], dbar[1], z0_ct, probe_ct if perturbed[3] else None
