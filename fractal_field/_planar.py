"""The batched planar layout: a batch of complex fields as real planes, batch last.

A batch of complex fields `z` of shape `(b, c, h, w)` is stored as the real array
`p = to_planar(z)` of shape `(2, h, w, c, b)` with `p[0] = Re z`, `p[1] = Im z`. In this layout
every stage of the spectral toroidal convolution is a plain (batched) real matrix product
with no data movement between stages (`PlanarSpectralOperator`):

1. DFT along `h`: one `(2h, 2h) @ (2h, w c b)` product (real and imaginary parts ride on the
   contracted axis, so complex arithmetic costs nothing extra);
2. DFT along `w`: `h` products `(2w, 2w) @ (2w, c b)`;
3. channel mixing: one `(2 cout, 2 cin) @ (2 cin, b)` product per frequency;
4. inverse DFTs, the same way back.

Each product writes its output in exactly the layout the next one reads, so no transposes are
needed anywhere. In the batch-first complex layout that `vmap` produces, XLA:CPU runs two FFTs
and moves the data twice around the per-frequency mixing; at the CIFAR field size (batch 128,
64 channels, 16x16) one application costs ~35 ms here against ~60 ms there
(`benchmarks/peers.py`, problem B).

The layout is for solving a whole batch as one fixed-point problem (one stopping test for the
batch). Convert once before the solve and once after (`to_planar`, `from_planar`), never per
iteration.
"""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Complex, Float

from ._precision import Precision, check_precision, dot_general, operand_dtype
from ._tapconv import block_matrix


def to_planar(z: Complex[Array, "b c h w"]) -> Float[Array, "2 h w c b"]:
    """A batch of complex fields `(b, c, h, w)` -> real planes `(2, h, w, c, b)`."""
    z = jnp.asarray(z)
    if z.ndim != 4:
        raise ValueError(f"to_planar expects a batch of fields (b, c, h, w), got shape {z.shape}.")
    if not jnp.issubdtype(z.dtype, jnp.inexact):
        raise TypeError(f"to_planar expects a complex or real floating field, got {z.dtype}.")
    return jnp.transpose(jnp.stack([jnp.real(z), jnp.imag(z)]), (0, 3, 4, 2, 1))


def from_planar(p: Float[Array, "2 h w c b"]) -> Complex[Array, "b c h w"]:
    """Real planes `(2, h, w, c, b)` -> the batch of complex fields `(b, c, h, w)`."""
    p = jnp.asarray(p)
    if p.ndim != 5 or p.shape[0] != 2:
        raise ValueError(f"from_planar expects planes of shape (2, h, w, c, b), got {p.shape}.")
    return jnp.transpose(lax.complex(p[0], p[1]), (3, 2, 0, 1))


def _real_block(m: np.ndarray, rows_first: bool) -> np.ndarray:
    """Complex `(n, n)` -> real `(2n, 2n)` acting on a contracted axis that carries `(re, im)`.

    `rows_first=True`: rows indexed `(k, r')` (frequency-major, part-minor) and columns
    `(r, j)` (part-major); `False`: rows `(r', k)`, columns `(j, r)`.
    """
    n = m.shape[0]
    blk = np.zeros((2, 2, n, n))  # [r', r, k, j]
    blk[0, 0], blk[0, 1], blk[1, 0], blk[1, 1] = m.real, -m.imag, m.imag, m.real
    if rows_first:
        return np.transpose(blk, (2, 0, 1, 3)).reshape(2 * n, 2 * n)  # (k r'), (r j)
    return np.transpose(blk, (0, 2, 3, 1)).reshape(2 * n, 2 * n)  # (r' k), (j r)


@functools.lru_cache(maxsize=32)
def _dft_mats(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Forward and inverse DFT of length `n` as real block matrices (float64)."""
    k = np.arange(n)
    f = np.exp(-2j * np.pi * ((np.outer(k, k)) % n) / n)
    g = np.conj(f) / n
    return _real_block(f, rows_first=True), _real_block(g, rows_first=False)


_MM = (((1,), (0,)), ((), ()))  # (m, k) @ (k, n)
_BMM = (((2,), (1,)), ((0,), (0,)))  # (g, m, k) @ (g, k, n)


def _pipeline(mats, block: Array, p: Array, precision: Precision) -> tuple[Array, Array]:
    """`p (2, h, w, cin, b)` -> `(y (2, h, w, cout, b), mixing input (hw, 2 cin, b))`, the
    latter rounded to the products' operand dtype."""
    fh, fw, iw, ih = mats
    _, h, w, cin, b = p.shape
    acc = p.dtype

    def mm(a, x, dims):
        return dot_general(a, x, dims, precision=precision, accumulate=acc)

    # Keeps XLA from constant-folding the products when `p` is a constant (e.g. the zero
    # start of a fixed-point solve): seconds of compile time for nothing.
    p = lax.optimization_barrier(p)
    cout = block.shape[1] // 2
    y = mm(fh, p.reshape(2 * h, w * cin * b), _MM).reshape(h, 2 * w, cin * b)  # rows (u, r)
    x = mm(fw, y, _BMM).reshape(h * w, 2 * cin, b)  # rows (v, r): per frequency (r, cin, b)
    x = x.astype(operand_dtype(precision, acc))
    y = mm(block, x, _BMM).reshape(h, 2 * w, cout * b)  # per frequency (r, cout, b)
    y = mm(iw, y, _BMM).reshape(2 * h, w * cout * b)  # rows (r, x), grouped per u as (u, r)
    return mm(ih, y, _MM).reshape(2, h, w, cout, b), x


def _mats(h: int, w: int, dtype, transpose: bool):
    fh, ih = _dft_mats(h)
    fw, iw = _dft_mats(w)
    if transpose:  # the adjoint pipeline runs the transposed stages in reverse order
        fh, fw, iw, ih = ih.T, iw.T, fw.T, fh.T
    fw = np.broadcast_to(fw, (h,) + fw.shape)
    iw = np.broadcast_to(iw, (h,) + iw.shape)
    return tuple(jnp.asarray(m, dtype) for m in (fh, fw, iw, ih))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _apply(block: Array, block_t: Array, p: Array, precision: Precision) -> Array:
    return _apply_fwd(block, block_t, p, precision)[0]


def _apply_fwd(block, block_t, p, precision):
    _, h, w, _, _ = p.shape
    mats = _mats(h, w, operand_dtype(precision, p.dtype), False)
    y, x = _pipeline(mats, block, p, precision)
    return y, (block_t, x)


def _apply_bwd(precision, res, ct):
    # The transpose is the same pipeline with the transposed stages in reverse order (all
    # products stay in the forward's layout); its mixing input, paired with the forward's,
    # gives the block's cotangent (one product per frequency).
    block_t, x = res
    _, h, w, _, _ = ct.shape
    mats = _mats(h, w, operand_dtype(precision, ct.dtype), True)
    ct_p, g = _pipeline(mats, block_t, ct, precision)
    dims = (((2,), (2,)), ((0,), (0,)))
    ct_block = dot_general(g, x, dims, precision=precision, accumulate=ct.dtype)
    return ct_block.astype(block_t.dtype), jnp.zeros_like(block_t), ct_p


_apply.defvjp(_apply_fwd, _apply_bwd)


class PlanarSpectralOperator(eqx.Module):
    """A toroidal convolution on batched planar fields `(2, h, w, cin, b)` (see `to_planar`).

    Built by `ToroidalConv.planar_operator(h, w)` (or `from_spectrum`) once per solve, applied
    in the loop. Real and imaginary parts are carried as planes and every stage is a real
    matrix product; the VJP is written out and uses the transposed mixing matrices stored
    here, so the backward solve costs the same as the forward. With `precision="bfloat16"`
    every product (DFTs and mixing, forward and backward) takes bfloat16 operands and
    accumulates in the field's dtype.
    """

    block: Float[Array, "hw 2cout 2cin"]  # rows (r', o), columns (r, i)
    block_t: Float[Array, "hw 2cin 2cout"]
    shape: tuple[int, int] = eqx.field(static=True)
    precision: Precision = eqx.field(static=True, default="float32")

    @staticmethod
    def from_spectrum(
        s: Complex[Array, "cout cin h w"], *, precision: Precision = "float32"
    ) -> PlanarSpectralOperator:
        precision = check_precision(precision, "PlanarSpectralOperator")
        cout, cin, h, w = s.shape
        st = jnp.transpose(s.reshape(cout, cin, h * w), (2, 1, 0))  # (hw, cin, cout)
        block_t = block_matrix(st)  # rows (r, i), columns (r', o)
        return PlanarSpectralOperator(jnp.swapaxes(block_t, 1, 2), block_t, (h, w), precision)

    @property
    def in_channels(self) -> int:
        return self.block.shape[2] // 2

    @property
    def out_channels(self) -> int:
        return self.block.shape[1] // 2

    def __call__(self, p: Float[Array, "2 h w cin b"]) -> Float[Array, "2 h w cout b"]:
        p = jnp.asarray(p)
        if p.ndim != 5 or p.shape[0] != 2:
            raise ValueError(
                f"PlanarSpectralOperator expects planar fields (2, h, w, c, b), got {p.shape}; "
                "convert a batch of complex fields with `ff.to_planar`."
            )
        if p.shape[1:3] != self.shape:
            raise ValueError(f"operator built for grid {self.shape}, got {p.shape[1:3]}.")
        if p.shape[3] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels, got {p.shape[3]}.")
        if not jnp.issubdtype(p.dtype, jnp.floating):
            raise TypeError(f"planar fields are real, got dtype {p.dtype}.")
        dtype = jnp.result_type(p.dtype, self.block.dtype)
        block, block_t = self.block.astype(dtype), self.block_t.astype(dtype)
        return _apply(block, block_t, p.astype(dtype), self.precision)
