"""Limited-memory ("good") Broyden method on `g(z) = f(z) - z`, complex-safe."""

from __future__ import annotations

from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Bool, Float, Inexact, Int

from ._planes import combine, inner_row, planes
from .base import AbstractFixedPointSolver

Planes = tuple[Float[Array, " n"], ...]


class _BroydenState(eqx.Module):
    # The inverse-Jacobian estimate `H = -I + sum_i u_i v_i^H` of `g`, its factors stored as
    # real and imaginary planes like Anderson's history (faster products on XLA:CPU).
    us: tuple[Float[Array, "m n"], ...]
    vs: tuple[Float[Array, "m n"], ...]
    direction: tuple[Float[Array, " n"], ...]  # `-H g` at the current iterate
    count: Int[Array, ""]  # updates since the last restart
    restarts: Int[Array, ""]


def _put(buf: Array, slot: Int[Array, ""], row: Array) -> Array:
    """`buf.at[slot].set(row)` in place: `slot` lies in range, so no select over `buf` (which
    JAX's default out-of-bounds handling adds, one full copy of the buffer per step)."""
    return buf.at[slot].set(row, mode="promise_in_bounds")


def _dot(a: Planes, b: Planes, real: bool):
    """`<a, b> = sum conj(a) b` (its real part if `real`)."""
    if len(a) == 1:
        return jnp.vdot(a[0], b[0])
    (ar, ai), (br, bi) = a, b
    re = jnp.vdot(ar, br) + jnp.vdot(ai, bi)
    return re if real else jax.lax.complex(re, jnp.vdot(ar, bi) - jnp.vdot(ai, br))


def _scale(s, a: Planes) -> Planes:
    """`s * a` for a real or complex scalar `s`."""
    if not jnp.iscomplexobj(s):
        return tuple(s * x for x in a)
    ar, ai = a
    sr, si = jnp.real(s), jnp.imag(s)
    return sr * ar - si * ai, sr * ai + si * ar


def _add(*terms: Planes) -> Planes:
    return tuple(sum(xs[1:], xs[0]) for xs in zip(*terms, strict=True))


def _sub(a: Planes, b: Planes) -> Planes:
    return tuple(x - y for x, y in zip(a, b, strict=True))


def _sqnorm(a: Planes) -> Float[Array, ""]:
    return sum(jnp.vdot(x, x) for x in a)


def _where(pred: Bool[Array, ""], a: Planes, b: Planes) -> Planes:
    return tuple(jnp.where(pred, x, y) for x, y in zip(a, b, strict=True))


def _unplanes(p: Planes, dtype) -> Inexact[Array, " n"]:
    return (jax.lax.complex(*p) if len(p) == 2 else p[0]).astype(dtype)


class Broyden(AbstractFixedPointSolver):
    """Limited-memory Broyden method (Broyden's "good" update of the inverse Jacobian), as
    used by DEQ and MDEQ, on the residual `g(z) = f(z) - z`.

    Keeps `H = -I + sum_i u_i v_i^H`, an estimate of the inverse Jacobian of `g`, and steps
    `z <- z - step_size * H g(z)`; after each step a rank-one update makes `H` map the change
    of `g` to the change of `z` (the secant condition). The first step, and every step after
    a restart, is a plain (damped) fixed-point step.

    - `memory`: rank-one updates kept.
    - `when_full`: what the update after `memory` updates does. `"restart"` drops them all and
      starts again from `H = -I` with the newest secant pair (no step is lost). `"overwrite"`
      replaces the oldest, as DEQ/MDEQ do; the estimate is then no longer Broyden's, and on the
      trained MNIST model 36 of 64 per-sample solves at `rtol=1e-5` failed with it (none with
      `"restart"`).
    - `step_size`: damping of the Broyden step, in (0, 1]; 1 (no line search) as in DEQ.
    - `max_step_ratio`: a step longer than `max_step_ratio * ||g(z)||`, or a non-finite one,
      is replaced by a plain step and the memory restarts; so does an update with a zero or
      non-finite denominator. These restarts (not those of `when_full`) are counted in the
      state as `restarts`.
    - `inner_product`: `"complex"` uses the conjugate (Hermitian) inner product, so `H` is
      complex-linear; `"real"` uses its real part, which makes the solver identical to running
      it on the real/imaginary split of the state (the natural choice for maps that are only
      R-linear, like modReLU fields). Real states ignore this, and states that mix real and
      complex leaves always use the real one.

    On a linear map in `n` dimensions (complex-linear with `"complex"`) with `step_size=1`
    and `memory >= 2n`, it reaches the fixed point in at most `2n` steps in exact arithmetic.
    Per step: one map evaluation and four passes over the `2 * memory` stored vectors.
    """

    memory: int = 10
    when_full: Literal["restart", "overwrite"] = "restart"
    step_size: float = 1.0
    max_step_ratio: float = 1e3
    inner_product: Literal["complex", "real"] = "complex"

    def __check_init__(self):
        if isinstance(self.memory, bool) or not isinstance(self.memory, int):
            raise TypeError(f"Broyden(memory={self.memory!r}): memory must be an int.")
        if self.memory < 1:
            raise ValueError(f"Broyden(memory={self.memory}): memory must be >= 1.")
        if not 0 < self.step_size <= 1:
            raise ValueError(f"Broyden(step_size={self.step_size}): step_size must lie in (0, 1].")
        if not self.max_step_ratio >= 1:
            raise ValueError(
                f"Broyden(max_step_ratio={self.max_step_ratio}): max_step_ratio must be >= 1 "
                "(a plain step has ratio 1)."
            )
        if self.inner_product not in ("complex", "real"):
            raise ValueError("Broyden(inner_product=...) must be 'complex' or 'real'.")
        if self.when_full not in ("restart", "overwrite"):
            raise ValueError("Broyden(when_full=...) must be 'restart' or 'overwrite'.")

    def init(self, fn, y, fy, args):
        y_flat, _ = ravel_pytree(y)
        fy_flat, _ = ravel_pytree(fy)
        g = planes(fy_flat - y_flat)
        buf = tuple(jnp.zeros((self.memory,) + p.shape, p.dtype) for p in g)
        return _BroydenState(buf, buf, g, jnp.array(0), jnp.array(0))

    def step(self, fn, y, fy, args, state: _BroydenState):
        y_flat, unravel = ravel_pytree(y)
        fy_flat, _ = ravel_pytree(fy)
        leaves = jax.tree_util.tree_leaves(y)
        mixed = len({jnp.iscomplexobj(x) for x in leaves}) > 1
        real = self.inner_product == "real" or mixed or not jnp.iscomplexobj(y_flat)
        cdtype = y_flat.dtype if not real else state.direction[0].dtype
        m = self.memory

        # The step: Broyden's, or a plain one (and a restart) if it is non-finite or huge.
        g = planes(fy_flat - y_flat)
        d = state.direction
        d_sq, g_sq = _sqnorm(d), _sqnorm(g)
        ok = jnp.isfinite(d_sq) & (d_sq <= self.max_step_ratio**2 * g_sq)
        d = _where(ok, d, g)
        count = jnp.where(ok, state.count, 0)
        dx = d if self.step_size == 1 else _scale(self.step_size, d)
        y_new_flat = y_flat + _unplanes(dx, y_flat.dtype)
        y_new = unravel(y_new_flat)
        fy_new = fn(y_new, args)
        fy_new_flat, _ = ravel_pytree(fy_new)
        g_new = planes(fy_new_flat - y_new_flat)

        # Rank-one update: H_new = H + u v^H with v = H^H dx and u = (dx - H dg) / <v, dg>,
        # using H g = -d (also right after a restart: H = -I and d = g), or -g where the memory
        # is full and restarts with this update.
        if self.when_full == "restart":
            fresh = count >= m
            count = jnp.where(fresh, 0, count)
            h_g = _where(fresh, _scale(-1.0, g), _scale(-1.0, d))
        else:
            h_g = _scale(-1.0, d)
        valid: Bool[Array, " m"] = jnp.arange(m) < jnp.minimum(count, m)
        c = jnp.where(valid, inner_row(state.vs, g_new, real, cdtype), 0)
        h_g_new = _sub(combine(c, state.us), g_new)
        h_dg = _sub(h_g_new, h_g)
        e = jnp.where(valid, inner_row(state.us, dx, real, cdtype), 0)
        v = _sub(combine(e, state.vs), dx)
        denom = _dot(v, _sub(g_new, g), real)
        good = jnp.isfinite(denom) & (denom != 0)
        u = _scale(1 / jnp.where(good, denom, 1), _sub(dx, h_dg))
        good = good & jnp.isfinite(_sqnorm(u)) & jnp.isfinite(_sqnorm(v))
        zero = tuple(jnp.zeros_like(x) for x in u)
        u, v = _where(good, u, zero), _where(good, v, zero)
        slot = count % m
        us = tuple(_put(b, slot, x) for b, x in zip(state.us, u, strict=True))
        vs = tuple(_put(b, slot, x) for b, x in zip(state.vs, v, strict=True))
        # -H_new g_new = -(H g_new + u <v, g_new>); after a failed update, a restart: g_new.
        h_g_new = _add(h_g_new, _scale(_dot(v, g_new, real), u))
        if self.when_full == "overwrite":
            # H_new has also lost the pair in `slot` (its coefficient `c[slot]` is known).
            lost = jnp.where(count >= m, c[slot], 0)
            h_g_new = _sub(h_g_new, _scale(lost, tuple(b[slot] for b in state.us)))
        d_new = _scale(-1.0, h_g_new)
        d_new = _where(good, d_new, g_new)
        new_state = _BroydenState(
            us,
            vs,
            d_new,
            jnp.where(good, count + 1, 0),
            state.restarts + (~(ok & good)).astype(jnp.int32),
        )
        return y_new, fy_new, new_state, 1.0
