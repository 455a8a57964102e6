"""Mixed precision for the field's convolution: bfloat16 operands, float32 accumulation.

JAX has no bfloat16 complex type, so a "bfloat16 field" rounds the real and imaginary planes
that enter each real matrix product of the convolution (and the weights they meet) to
bfloat16 and accumulates the products in the operands' own dtype (float32, float64 under
x64). Everything else (the field state, the solver's state, the activation, the parameters)
keeps its dtype.
"""

import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array

Precision = Literal["float32", "bfloat16"]
PRECISIONS: tuple[str, ...] = ("float32", "bfloat16")


def check_precision(precision, owner: str) -> Precision:
    """`precision` itself, or a `ValueError` naming `owner` (the function or class)."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(
            f"{owner}(precision={precision!r}): use 'float32' (products in the field's own "
            "dtype) or 'bfloat16' (bfloat16 operands, float32 accumulation)."
        )
    return precision


def operand_dtype(precision: Precision, dtype):
    """The dtype the operands of a product are rounded to: bfloat16, or `dtype` itself."""
    return jnp.bfloat16 if precision == "bfloat16" else dtype


def einsum(spec: str, a: Array, b: Array, *, precision: Precision, accumulate) -> Array:
    """`jnp.einsum(spec, a, b)` (two operands, no repeated or ellipsis indices) on operands
    rounded to `operand_dtype(precision, ...)`, accumulated in and returned as `accumulate`.
    Its gradient rounds the cotangent the same way and returns `accumulate` cotangents
    (autodiff's own transpose would multiply a float32 cotangent by a bfloat16 operand)."""
    a, b = a.astype(accumulate), b.astype(accumulate)
    if precision == "float32":
        return jnp.einsum(spec, a, b)
    return _mixed_einsum(spec, precision, a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _mixed_einsum(spec: str, precision: Precision, a: Array, b: Array) -> Array:
    return _mixed_einsum_fwd(spec, precision, a, b)[0]


def _mixed_einsum_fwd(spec, precision, a, b):
    acc = a.dtype
    c = operand_dtype(precision, acc)
    a, b = a.astype(c), b.astype(c)
    return jnp.einsum(spec, a, b, preferred_element_type=acc), (a, b)


def _mixed_einsum_bwd(spec, precision, res, ct):
    a, b = res
    ins, out = spec.replace(" ", "").split("->")
    sa, sb = ins.split(",")
    if not set(sa) <= set(sb) | set(out) or not set(sb) <= set(sa) | set(out):
        raise NotImplementedError(f"no transpose rule for the einsum {spec!r}.")
    acc = ct.dtype  # the forward's output dtype
    ct = ct.astype(a.dtype)
    ct_a = jnp.einsum(f"{out},{sb}->{sa}", ct, b, preferred_element_type=acc)
    ct_b = jnp.einsum(f"{sa},{out}->{sb}", a, ct, preferred_element_type=acc)
    return ct_a, ct_b


_mixed_einsum.defvjp(_mixed_einsum_fwd, _mixed_einsum_bwd)


def dot_general(a: Array, b: Array, dims, *, precision: Precision, accumulate) -> Array:
    """`lax.dot_general(a, b, dims)` with the operands and accumulation of `einsum`, for use
    inside explicit VJPs (differentiated, its transpose is JAX's own)."""
    if precision == "float32":
        return lax.dot_general(a.astype(accumulate), b.astype(accumulate), dims)
    c = operand_dtype(precision, accumulate)
    return lax.dot_general(a.astype(c), b.astype(c), dims, preferred_element_type=accumulate)
