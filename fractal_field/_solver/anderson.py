"""Anderson acceleration (type II), complex-safe."""

from __future__ import annotations

from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Bool, Float, Inexact, Int

from ._planes import combine, inner_row, planes
from .base import AbstractFixedPointSolver


class _AndersonState(eqx.Module):
    # Complex states are stored as separate real and imaginary planes: on XLA:CPU complex
    # matrix-vector products (and real/imag interleaving) run several times slower than real
    # products doing the same work.
    gs: tuple[Float[Array, "m n"], ...]  # residuals f(z_i) - z_i: (re,) or (re, im)
    fys: tuple[Float[Array, "m n"], ...]  # f(z_i), the same way
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

    - `period`: mix every `period`-th evaluation (periodic Pulay, or Alternating
      Anderson-Richardson; Banerjee et al. 2016, Pratapa & Suryanarayana 2015). One `step`
      takes `period - 1` plain mixed steps, whose pairs join the history, then the Anderson
      step. The mixed iterate, one pass over the f-history, is formed once per step, not
      once per evaluation; the stopping test also runs once per step, so a solve may take up
      to `period - 1` evaluations more than it needs.

    When the weights come out non-finite the step falls back to a plain mixed step and the
    history restarts (counted in the state as `restarts`).
    """

    history: int = 5
    mixing: float = 1.0
    ridge: float = 1e-4
    coefficients: Literal["complex", "real"] = "complex"
    # Static, so that checkpoints of models that hold a solver keep their layout.
    period: int = eqx.field(static=True, default=1)

    def __check_init__(self):
        if self.history < 1:
            raise ValueError(f"Anderson(history={self.history}): history must be >= 1.")
        if not 0 < self.mixing <= 1:
            raise ValueError(f"Anderson(mixing={self.mixing}): mixing must lie in (0, 1].")
        if self.ridge < 0:
            raise ValueError(f"Anderson(ridge={self.ridge}): ridge must be >= 0.")
        if self.coefficients not in ("complex", "real"):
            raise ValueError("Anderson(coefficients=...) must be 'complex' or 'real'.")
        if self.period < 1:
            raise ValueError(f"Anderson(period={self.period}): period must be >= 1.")

    def init(self, fn, y, fy, args):
        flat, _ = ravel_pytree(y)
        buf = tuple(jnp.zeros((self.history,) + p.shape, p.dtype) for p in planes(flat))
        gram = jnp.zeros((self.history, self.history), flat.dtype)
        return _AndersonState(buf, buf, gram, jnp.array(0), jnp.array(0))

    def step(self, fn, y, fy, args, state: _AndersonState):
        # Memory-bound on large states: per evaluation one pass over the residual history (the
        # new Gram row), and per step one over the f-history (the mixed iterate), two each with
        # complex weights; nothing else of size m x n.
        m = self.history
        leaves = jax.tree_util.tree_leaves(y)
        mixed = len({jnp.iscomplexobj(x) for x in leaves}) > 1
        real_coef = self.coefficients == "real" or mixed or not jnp.iscomplexobj(state.gram)
        gs, fys, count, full = state.gs, state.fys, state.count, state.gram
        for _ in range(self.period - 1):
            flats = ravel_pytree(y)[0], ravel_pytree(fy)[0]
            gs, fys, full, _ = self._push(gs, fys, full, count, *flats, real_coef)
            count = count + 1
            y = jax.tree_util.tree_map(
                lambda a, b: (a + self.mixing * (b - a)).astype(a.dtype), y, fy
            )
            fy = fn(y, args)
        y_flat, unravel = ravel_pytree(y)
        gs, fys, full, slot = self._push(
            gs, fys, full, count, y_flat, ravel_pytree(fy)[0], real_coef
        )
        valid: Bool[Array, " m"] = jnp.arange(m) < jnp.minimum(count + 1, m)
        gram = jnp.real(full) if real_coef else full
        both = valid[:, None] & valid[None, :]
        diag = jnp.real(jnp.diagonal(gram))
        scale = jnp.sum(jnp.where(valid, diag, 0)) / jnp.maximum(jnp.sum(valid), 1)
        tiny = jnp.finfo(diag.dtype).tiny
        reg = self.ridge * scale + tiny
        gram = jnp.where(both, gram, 0) + jnp.diag(jnp.where(valid, reg, 1)).astype(gram.dtype)
        alpha = jnp.linalg.solve(gram, valid.astype(gram.dtype))
        alpha = alpha / jnp.sum(alpha)
        ok = jnp.all(jnp.isfinite(alpha))
        # The fallback (a plain mixed step) is the one-hot weight on the newest pair: a choice
        # among m weights, not a select over the whole state.
        alpha = jnp.where(ok, alpha, jnp.arange(m) == slot).astype(alpha.dtype)

        y_new = combine(alpha, fys)
        if self.mixing != 1:  # sum alpha_i z_i = sum alpha_i (f(z_i) - g_i)
            beta = 1 - self.mixing
            y_new = tuple(a - beta * b for a, b in zip(y_new, combine(alpha, gs), strict=True))
        if len(y_new) == 2:
            y_new_flat = jax.lax.complex(*y_new).astype(y_flat.dtype)
        else:
            y_new_flat = y_new[0].astype(y_flat.dtype)
        count = jnp.where(ok, count + 1, 0)
        restarts = state.restarts + (~ok).astype(jnp.int32)
        new_state = _AndersonState(gs, fys, full, count, restarts)
        y_new = unravel(y_new_flat)
        return y_new, fn(y_new, args), new_state, float(self.period)

    def _push(self, gs, fys, full, count, y_flat, fy_flat, real_coef):
        """The pair `(y, fy)` (flattened) written to history slot `count % m`, with its Gram
        row."""
        slot = count % self.history
        g_new = planes(fy_flat - y_flat)
        gs = tuple(h.at[slot].set(v) for h, v in zip(gs, g_new, strict=True))
        fys = tuple(h.at[slot].set(v) for h, v in zip(fys, planes(fy_flat), strict=True))
        # One new row and column (a full `G G^T` product runs several times slower on XLA:CPU
        # than these matrix-vector products).
        row = inner_row(gs, g_new, real_coef, full.dtype)
        full = full.at[:, slot].set(row).at[slot, :].set(jnp.conj(row))
        return gs, fys, full, slot
