"""Anderson acceleration (type II), complex-safe."""

from __future__ import annotations

from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Bool, Inexact, Int

from .base import AbstractFixedPointSolver


class _AndersonState(eqx.Module):
    gs: Inexact[Array, "m n"]  # residuals f(z_i) - z_i
    fys: Inexact[Array, "m n"]  # f(z_i)
    gram: Inexact[Array, "m m"]  # <g_i, g_j>, updated one row/column per step
    count: Int[Array, ""]
    restarts: Int[Array, ""]


class Anderson(AbstractFixedPointSolver):
    """Anderson acceleration with `history` past iterates.

    Each step mixes the last `m` pairs `(z_i, f(z_i))` with weights `alpha` (summing to one)
    that minimise `||sum_i alpha_i (f(z_i) - z_i)||`:
    `z <- mixing * sum alpha_i f(z_i) + (1 - mixing) * sum alpha_i z_i`.

    - `history`: number of past iterates `m`.
    - `mixing`: `beta` in (0, 1].
    - `ridge`: Tikhonov regularisation of the least-squares Gram matrix, relative to its
      mean diagonal, so a singular (collinear) history never produces NaN.
    - `coefficients`: `"complex"` solves for complex weights with the conjugate (Hermitian)
      inner product; `"real"` restricts them to real weights, which makes the solver identical
      to running it on the real/imaginary split of the state (the natural choice for maps
      that are only R-linear, like modReLU fields). Real states ignore this, and states that
      mix real and complex leaves always use real weights (a complex weight would be cut to
      its real part on the real leaves).

    When the weights come out non-finite the step falls back to a plain mixed step and the
    history restarts (counted in the state as `restarts`).
    """

    history: int = 5
    mixing: float = 1.0
    ridge: float = 1e-4
    coefficients: Literal["complex", "real"] = "complex"

    def __check_init__(self):
        if self.history < 1:
            raise ValueError(f"Anderson(history={self.history}): history must be >= 1.")
        if not 0 < self.mixing <= 1:
            raise ValueError(f"Anderson(mixing={self.mixing}): mixing must lie in (0, 1].")
        if self.ridge < 0:
            raise ValueError(f"Anderson(ridge={self.ridge}): ridge must be >= 0.")
        if self.coefficients not in ("complex", "real"):
            raise ValueError("Anderson(coefficients=...) must be 'complex' or 'real'.")

    def init(self, fn, y, fy, args):
        flat, _ = ravel_pytree(y)
        buf = jnp.zeros((self.history,) + flat.shape, flat.dtype)
        gram = jnp.zeros((self.history, self.history), flat.dtype)
        return _AndersonState(buf, buf, gram, jnp.array(0), jnp.array(0))

    def step(self, fn, y, fy, args, state: _AndersonState):
        # Memory-bound on large states: per step, one pass over the residual history (the new
        # Gram row) and one over the f-history (the mixed iterate); nothing else of size m x n.
        y_flat, unravel = ravel_pytree(y)
        fy_flat, _ = ravel_pytree(fy)
        m = self.history
        slot = state.count % m
        g_new = fy_flat - y_flat
        gs = state.gs.at[slot].set(g_new)
        fys = state.fys.at[slot].set(fy_flat)
        valid: Bool[Array, " m"] = jnp.arange(m) < jnp.minimum(state.count + 1, m)

        row = jnp.conj(gs) @ g_new  # row[j] = <g_j, g_new>
        full = state.gram.at[:, slot].set(row).at[slot, :].set(jnp.conj(row))
        gram = full
        leaves = jax.tree_util.tree_leaves(y)
        mixed = len({jnp.iscomplexobj(x) for x in leaves}) > 1
        if self.coefficients == "real" or mixed or not jnp.iscomplexobj(gram):
            gram = jnp.real(gram)
        both = valid[:, None] & valid[None, :]
        diag = jnp.real(jnp.diagonal(gram))
        scale = jnp.sum(jnp.where(valid, diag, 0)) / jnp.maximum(jnp.sum(valid), 1)
        tiny = jnp.finfo(diag.dtype).tiny
        reg = self.ridge * scale + tiny
        gram = jnp.where(both, gram, 0) + jnp.diag(jnp.where(valid, reg, 1)).astype(gram.dtype)
        alpha = jnp.linalg.solve(gram, valid.astype(gram.dtype))
        alpha = alpha / jnp.sum(alpha)
        ok = jnp.all(jnp.isfinite(alpha))
        alpha = jnp.where(ok, alpha, 0).astype(fys.dtype)

        mixed_f = alpha @ fys
        if self.mixing == 1:
            accel, plain = mixed_f, fy_flat
        else:  # sum alpha_i z_i = sum alpha_i (f(z_i) - g_i)
            accel = mixed_f - (1 - self.mixing) * (alpha @ gs)
            plain = fy_flat - (1 - self.mixing) * g_new
        y_new_flat = jnp.where(ok, accel, plain)
        count = jnp.where(ok, state.count + 1, 0)
        restarts = state.restarts + (~ok).astype(jnp.int32)
        new_state = _AndersonState(gs, fys, full, count, restarts)
        y_new = unravel(y_new_flat)
        return y_new, fn(y_new, args), new_state, 1.0
