"""A state vector as real planes (`(re,)` or `(re, im)`) and the products solvers take of their
histories of such vectors. On XLA:CPU complex matrix-vector products (and real/imaginary
interleaving) run several times slower than real products doing the same work."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Inexact


def planes(v: Inexact[Array, " n"]) -> tuple[Float[Array, " n"], ...]:
    return (v.real, v.imag) if jnp.iscomplexobj(v) else (v,)


def inner_row(hist, v, real_coef: bool, dtype):
    """`row[j] = <h_j, v> = sum conj(h_j) v` (its real part if `real_coef`)."""
    if len(hist) == 1:
        return (hist[0] @ v[0]).astype(dtype)
    (hr, hi), (vr, vi) = hist, v
    re = hr @ vr + hi @ vi
    if real_coef:
        return re.astype(dtype)
    return jax.lax.complex(re, hr @ vi - hi @ vr).astype(dtype)


def combine(coef: Inexact[Array, " m"], hist) -> tuple[Float[Array, " n"], ...]:
    """`sum_i coef_i h_i`, plane by plane."""
    ar = jnp.real(coef).astype(hist[0].dtype)
    if len(hist) == 1:
        return (ar @ hist[0],)
    hr, hi = hist
    if not jnp.iscomplexobj(coef):
        return ar @ hr, ar @ hi
    ai = jnp.imag(coef).astype(hr.dtype)
    return ar @ hr - ai @ hi, ar @ hi + ai @ hr
