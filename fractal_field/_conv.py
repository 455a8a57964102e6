"""Complex multi-scale convolution on a 2-D torus.

Convention: like `lax.conv` and PyTorch this is a *cross-correlation* with periodic
boundaries. For a weight `W` of shape `(d, cout, cin, k, k)`, dilations `(r_1, ..., r_d)` and
`c = k // 2`,

    y[o, p, q] = sum_{j,i,a,b} W[j,o,i,a,b] z[i, (p + r_j (a - c)) % h, (q + r_j (b - c)) % w].

Complex arithmetic is used throughout (no conjugation). Real floating inputs are promoted to the
weight's complex dtype (real fields are complex fields with zero imaginary part).

A convolution with real weights (`dtype=jnp.float32`) maps real fields to real fields; its
per-frequency matrices are still complex, and its operator norm (their largest singular value)
is still exact.

`precision="bfloat16"` (mixed precision) rounds the operands of the convolution's real matrix
products to bfloat16 and accumulates them in float32; inputs, outputs and weights keep their
dtypes (see `ff.with_precision`).
"""

import math
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Complex, Float, PRNGKeyArray

from ._planar import PlanarSpectralOperator
from ._precision import Precision, check_precision, einsum
from ._tapconv import block_matrix, toroidal_correlate

Impl = Literal["direct", "spectral", "auto"]


def _check_odd(kernel_size: int) -> None:
    if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"`kernel_size` must be a positive odd integer, got {kernel_size!r}.")


def _as_field(z: Array, dtype, channels: int, name: str) -> Array:
    """`z` checked and cast to `dtype` (a complex dtype, or a real one for a real convolution)."""
    z = jnp.asarray(z)
    if z.ndim != 3:
        raise ValueError(
            f"{name} expects an unbatched field of shape (channels, h, w), got shape {z.shape}; "
            "use `jax.vmap` for batches."
        )
    if z.shape[0] != channels:
        raise ValueError(f"{name} expects {channels} input channels, got {z.shape[0]}.")
    if jnp.issubdtype(z.dtype, jnp.complexfloating):
        if not jnp.issubdtype(dtype, jnp.complexfloating):
            raise TypeError(
                f"{name} has real weights and acts on real fields; got dtype {z.dtype}."
            )
        return z.astype(dtype)
    if jnp.issubdtype(z.dtype, jnp.floating):
        return z.astype(dtype)
    raise TypeError(f"{name} expects a complex (or real floating) field, got dtype {z.dtype}.")


def complex_dtype(dtype) -> jnp.dtype:
    """The complex dtype of the same precision as `dtype` (real or complex)."""
    return jnp.promote_types(dtype, jnp.complex64)


def complex_rayleigh_init(
    key: PRNGKeyArray, shape: tuple[int, ...], sigma: float, dtype=jnp.complex64
) -> Complex[Array, "..."]:
    """Complex weights with Rayleigh(`sigma`) modulus and uniform phase, so `E|w|^2 = 2 sigma^2`."""
    real_dtype = jnp.finfo(dtype).dtype
    kmod, kphase = jax.random.split(key)
    u = jax.random.uniform(kmod, shape, real_dtype, minval=jnp.finfo(real_dtype).tiny, maxval=1)
    modulus = sigma * jnp.sqrt(-2 * jnp.log(u))
    phase = jax.random.uniform(kphase, shape, real_dtype, minval=-math.pi, maxval=math.pi)
    return (modulus * jnp.exp(1j * phase)).astype(dtype)


def glorot_init(
    key: PRNGKeyArray, shape: tuple[int, ...], sigma: float, dtype
) -> Float[Array, "..."]:
    """Real or complex weights with `E|w|^2 = 2 sigma^2`: normal for a real `dtype`,
    `complex_rayleigh_init` for a complex one."""
    if jnp.issubdtype(dtype, jnp.complexfloating):
        return complex_rayleigh_init(key, shape, sigma, dtype)
    return (math.sqrt(2) * sigma * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


#
# Spectral implementation.
#


def _phases(n: int, kernel_size: int, dilations: tuple[int, ...]) -> np.ndarray:
    """`exp(2 pi i f r (a - c) / n)` of shape `(d, k, n)`, computed in float64."""
    c = kernel_size // 2
    r = np.asarray(dilations)[:, None, None]
    a = np.arange(kernel_size)[None, :, None] - c
    f = np.arange(n)[None, None, :]
    return np.exp(2j * np.pi * ((r * a * f) % n) / n)


def spectrum(
    weight: Complex[Array, "d cout cin k k"], dilations: tuple[int, ...], h: int, w: int
) -> Complex[Array, "cout cin h w"]:
    """The 2-D DFT of the kernel embedded on the `h x w` torus.

    Equals `fft2` of the `(cout, cin, h, w)` array holding `W[j, :, :, a, b]` at position
    `(-r_j (a - c)) % (h, w)` (taps that wrap onto the same site add), so that
    `fft2(conv(z))[o] = sum_i spectrum[o, i] * fft2(z)[i]`. Differentiable in `weight`.
    """
    k = weight.shape[-1]
    cdtype = complex_dtype(weight.dtype)
    py = jnp.asarray(_phases(h, k, dilations), cdtype)
    px = jnp.asarray(_phases(w, k, dilations), cdtype)
    return jnp.einsum("joiab,jay,jbx->oiyx", weight, py, px)


class ToroidalOperator(eqx.Module):
    """A toroidal convolution specialised to one grid size, with everything that does not depend
    on the input precomputed. Build it once per solve (outside the fixed-point loop), call it in
    the loop. Acts on unbatched `(cin, h, w)` fields.
    """

    def __call__(self, z: Complex[Array, "cin h w"]) -> Complex[Array, "cout h w"]:
        raise NotImplementedError


class DirectOperator(ToroidalOperator):
    """One matrix product per kernel row on the `[re | im]` planes (`ff.toroidal_correlate`)."""

    kernel: Complex[Array, "d k k cin cout"]
    dilations: tuple[int, ...] = eqx.field(static=True)
    shape: tuple[int, int] = eqx.field(static=True)
    precision: Precision = eqx.field(static=True, default="float32")

    def __call__(self, z: Complex[Array, "cin h w"]) -> Complex[Array, "cout h w"]:
        cin = self.kernel.shape[3]
        z = _as_field(z, self.kernel.dtype, cin, "DirectOperator")
        if z.shape[1:] != self.shape:
            raise ValueError(f"operator built for grid {self.shape}, got {z.shape[1:]}.")
        zt = jnp.transpose(z, (1, 2, 0))[None]
        y = toroidal_correlate(zt, self.kernel, self.dilations, precision=self.precision)
        return jnp.transpose(y[0], (2, 0, 1))


class SpectralOperator(ToroidalOperator):
    """FFT on the torus, per-frequency channel mixing, inverse FFT.

    The mixing is a real product on the `[re | im]` planes with the block matrices
    `[[Re S, Im S], [-Im S, Re S]]` (one per frequency): XLA:CPU's complex matrix products are
    several times slower than real ones, and this form was ~15% faster per application at the
    MNIST Nano and CIFAR sizes (batch 128, 2-core CPU). With `precision="bfloat16"` the mixing
    runs on bfloat16 operands (the FFTs stay complex64: XLA has no bfloat16 FFT).

    `real=True` (the spectrum of real weights): real fields in and out through `rfft2` and
    `irfft2`, mixing the `h x (w // 2 + 1)` non-redundant frequencies only.
    """

    block: Float[Array, "hw 2cin 2cout"]
    shape: tuple[int, int] = eqx.field(static=True)
    precision: Precision = eqx.field(static=True, default="float32")
    real: bool = eqx.field(static=True, default=False)

    @staticmethod
    def from_spectrum(
        s: Complex[Array, "cout cin h w"], *, precision: Precision = "float32", real: bool = False
    ) -> "SpectralOperator":
        precision = check_precision(precision, "SpectralOperator")
        cout, cin, h, w = s.shape
        if real:  # the other half of the spectrum is the conjugate of this one
            s = s[..., : w // 2 + 1]
        st = jnp.transpose(s.reshape(cout, cin, -1), (2, 1, 0))  # (frequencies, cin, cout)
        return SpectralOperator(block_matrix(st), (h, w), precision, real)

    def __call__(self, z: Complex[Array, "cin h w"]) -> Complex[Array, "cout h w"]:
        _, cin2, cout2 = self.block.shape
        cin, cout = cin2 // 2, cout2 // 2
        cdtype = complex_dtype(self.block.dtype)
        z = _as_field(z, self.block.dtype if self.real else cdtype, cin, "SpectralOperator")
        if z.shape[1:] != self.shape:
            raise ValueError(f"operator built for grid {self.shape}, got {z.shape[1:]}.")
        h, w = self.shape
        zf = (jnp.fft.rfft2(z) if self.real else jnp.fft.fft2(z)).reshape(cin, -1)
        planes = jnp.concatenate([jnp.real(zf), jnp.imag(zf)], axis=0)
        acc = self.block.dtype
        yf = einsum("fio,if->of", self.block, planes, precision=self.precision, accumulate=acc)
        yf = lax.complex(yf[:cout], yf[cout:]).reshape(cout, h, -1)
        return jnp.fft.irfft2(yf, s=(h, w)) if self.real else jnp.fft.ifft2(yf)


def auto_impl(channels: int, h: int, w: int, taps: int) -> Literal["direct", "spectral"]:
    """The implementation `impl="auto"` picks: spectral unless the kernel has fewer than 9 taps.

    Measured with `benchmarks/conv.py --quick` (XLA:CPU, jaxlib 0.10.2, 2 shared cores so
    +-20% noise; complex64, batch 32 via `vmap`, 20 applications in a `fori_loop` with the
    operator built outside; ms per application, forward / gradient through the loop; direct is
    `ff.toroidal_correlate` on the `[re | im]` planes):

    | kernel, dilations | grid  | C  | direct      | spectral  |
    |-------------------|-------|----|-------------|-----------|
    | 3x3, (1,)         | 28x28 | 16 | 9.2 / 33    | 11 / 31   |
    | 3x3, (1,)         | 28x28 | 32 | 31 / 107    | 19 / 59   |
    | 3x3, (1, 2, 4)    | 28x28 | 16 | 28 / 72     | 7.5 / 25  |
    | 3x3, (1, 2, 4)    | 28x28 | 32 | 79 / 276    | 21 / 60   |

    Spectral costs `O(C^2 hw + C hw log hw)` whatever the number of taps, direct
    `O(taps C^2 hw)`. Direct only wins the forward pass of a single 3x3 scale at 16 channels
    and loses or ties every gradient, so it is kept for kernels with fewer than 9 taps (e.g.
    1x1, a plain channel mix) only.
    """
    del channels, h, w
    return "direct" if taps < 9 else "spectral"


class ToroidalConv(eqx.Module):
    """Complex multi-scale convolution on a torus (periodic cross-correlation).

    The same field is correlated with one `k x k` kernel per dilation and the results are
    summed. Works at any grid size; `operator(h, w)` precomputes a grid-specific operator for
    use inside fixed-point loops.

    Initialisation: modulus Rayleigh(sigma), phase uniform on `[-pi, pi)`, with complex Glorot
    scale `E|W|^2 = 2 sigma^2 = 2 / (fan_in + fan_out)` (Trabelsi et al. 2018), where
    `fan = channels * k^2 * len(dilations)`. For `cin == cout` this makes the map
    variance-preserving on average, a sensible start for a fixed-point iteration (He scale,
    `2 / fan_in`, would double the variance, compensating a ReLU that a DEQ does not want).

    `precision="bfloat16"`: mixed precision. The operands of the convolution's real matrix
    products (the field's real and imaginary planes, or their spectra, and the weights) are
    rounded to bfloat16 and the products accumulate in float32; the weight, the input and the
    output keep their dtypes. `"float32"` (default): products in the weight's dtype.

    `dtype=jnp.float32`: real weights (Glorot normal, the same `E W^2`), mapping real fields to
    real fields; no planar operator (the planar layout carries complex fields).
    """

    weight: Complex[Array, "d cout cin k k"] | Float[Array, "d cout cin k k"]
    in_channels: int = eqx.field(static=True)
    out_channels: int = eqx.field(static=True)
    kernel_size: int = eqx.field(static=True)
    dilations: tuple[int, ...] = eqx.field(static=True)
    impl: Impl = eqx.field(static=True)
    precision: Precision = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        dilations: tuple[int, ...] = (1,),
        *,
        impl: Impl = "auto",
        dtype=jnp.complex64,
        precision: Precision = "float32",
        key: PRNGKeyArray,
    ):
        _check_odd(kernel_size)
        dilations = tuple(int(r) for r in dilations)
        if len(dilations) == 0 or any(r < 1 for r in dilations):
            raise ValueError(f"`dilations` must be positive integers, got {dilations!r}.")
        if in_channels < 1 or out_channels < 1:
            raise ValueError("channel counts must be positive.")
        if impl not in ("direct", "spectral", "auto"):
            raise ValueError(f"`impl` must be 'direct', 'spectral' or 'auto', got {impl!r}.")
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(f"`dtype` must be complex or real floating, got {dtype}.")
        self.precision = check_precision(precision, "ToroidalConv")
        fan = kernel_size**2 * len(dilations)
        sigma = 1 / math.sqrt(fan * (in_channels + out_channels))
        shape = (len(dilations), out_channels, in_channels, kernel_size, kernel_size)
        self.weight = glorot_init(key, shape, sigma, dtype)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.dilations = dilations
        self.impl = impl

    @property
    def real(self) -> bool:
        """Whether the weights (so the fields it maps) are real."""
        return not jnp.iscomplexobj(self.weight)

    @property
    def taps(self) -> int:
        return len(self.dilations) * self.kernel_size**2

    def spectrum(self, h: int, w: int) -> Complex[Array, "cout cin h w"]:
        """The per-frequency `cout x cin` matrices of the operator on the `h x w` torus."""
        return spectrum(self.weight, self.dilations, h, w)

    def operator(
        self, h: int, w: int, *, impl: Impl | None = None
    ) -> DirectOperator | SpectralOperator:
        """The convolution on the `h x w` torus with input-independent work precomputed."""
        impl = self.impl if impl is None else impl
        if impl == "auto":
            impl = auto_impl(max(self.in_channels, self.out_channels), h, w, self.taps)
        if impl == "direct":
            kernel = jnp.transpose(self.weight, (0, 3, 4, 2, 1))
            return DirectOperator(kernel, self.dilations, (h, w), self.precision)
        elif impl == "spectral":
            return SpectralOperator.from_spectrum(
                self.spectrum(h, w), precision=self.precision, real=self.real
            )
        raise ValueError(f"`impl` must be 'direct', 'spectral' or 'auto', got {impl!r}.")

    def planar_operator(self, h: int, w: int) -> PlanarSpectralOperator:
        """The convolution on the `h x w` torus for batched planar fields `(2, h, w, c, b)`
        (`ff.to_planar`): spectral, every stage a real matrix product. Complex weights only."""
        if self.real:
            raise ValueError(
                "A ToroidalConv with real weights has no planar operator: the planar layout "
                "carries complex fields (real and imaginary planes)."
            )
        return PlanarSpectralOperator.from_spectrum(self.spectrum(h, w), precision=self.precision)

    def __call__(
        self, z: Complex[Array, "cin h w"], *, impl: Impl | None = None
    ) -> Complex[Array, "cout h w"]:
        z = _as_field(z, self.weight.dtype, self.in_channels, "ToroidalConv")
        return self.operator(z.shape[1], z.shape[2], impl=impl)(z)

    def coarsened(self) -> "ToroidalConv":
        """The same operator on a grid twice as coarse, for smooth fields.

        The same kernel on a coarser grid reaches twice as far: a diffusion-like stencil
        comes out 4x stronger relative to its pointwise part. Here each kernel's moments
        along each axis, `sum_a (a - c)^p K[a]` for `p < k`, are scaled by `2^-p` (one
        coarse cell spans two fine ones): exact on fields that are polynomials of degree
        `< k` along each axis, on every scale (the moments of a dilated kernel scale alike).
        `ff.Multigrid(coarsen_layers=True)` uses it on its coarser grids.
        """
        k = self.kernel_size
        offsets = np.arange(k) - k // 2
        vander = offsets[None, :] ** np.arange(k)[:, None]  # moments from taps
        rescale = np.linalg.solve(vander, np.diag(0.5 ** np.arange(k)) @ vander)
        t = jnp.asarray(rescale, jnp.real(self.weight).dtype)
        weight = jnp.einsum("ia,...ab,jb->...ij", t, self.weight, t).astype(self.weight.dtype)
        return eqx.tree_at(lambda c: c.weight, self, weight)

    def operator_norm(self, h: int, w: int) -> Array:
        """Exact operator (spectral) norm on the `h x w` torus (Sedghi, Gupta & Long 2019):
        the largest singular value over the per-frequency `cout x cin` matrices. Uses a batched
        SVD; differentiable (almost everywhere)."""
        return operator_norm(self.spectrum(h, w))

    def operator_norm_estimate(self, h: int, w: int, *, iters: int = 30) -> Array:
        """Cheap power-iteration estimate of `operator_norm` (a lower bound, tight once
        converged). Gradients flow through the final Rayleigh quotient only."""
        return operator_norm_power(self.spectrum(h, w), iters=iters)


def _freq_major(s: Complex[Array, "cout cin h w"]) -> Complex[Array, "hw cout cin"]:
    cout, cin = s.shape[:2]
    return jnp.transpose(s.reshape(cout, cin, -1), (2, 0, 1))


def operator_norm(s: Complex[Array, "cout cin h w"]) -> Array:
    """Largest singular value over the per-frequency matrices of a spectrum (exact, SVD)."""
    return jnp.max(jnp.linalg.svd(_freq_major(s), compute_uv=False))


def operator_norm_power(s: Complex[Array, "cout cin h w"], *, iters: int = 30) -> Array:
    """Power-iteration lower bound on `operator_norm`, run on all frequencies at once."""
    m = _freq_major(s)
    ms = lax.stop_gradient(m)
    gram = jnp.einsum("foi,foj->fij", ms.conj(), ms)
    # A fixed generic start (a constant vector can be orthogonal to the top singular vector).
    kr, ki = jax.random.split(jax.random.key(0))
    shape = m.shape[:1] + m.shape[2:]
    real_dtype = jnp.finfo(m.dtype).dtype
    v = jax.random.normal(kr, shape, real_dtype).astype(m.dtype)
    if jnp.iscomplexobj(m):
        v = v + 1j * jax.random.normal(ki, shape, real_dtype)

    def body(_, v):
        v = jnp.einsum("fij,fj->fi", gram, v)
        return v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-30)

    v = lax.stop_gradient(lax.fori_loop(0, iters, body, v))
    return jnp.max(jnp.linalg.norm(jnp.einsum("foi,fi->fo", m, v), axis=-1))


def with_precision(tree, precision: Precision):
    """`tree` (a model, cell or layer) with every `ff.ToroidalConv` in it computing at
    `precision` (`"float32"` or `"bfloat16"`, see `ToroidalConv`); the weights are the same
    arrays. E.g. a float32-trained checkpoint evaluated with a bfloat16 field."""
    precision = check_precision(precision, "with_precision")

    def is_conv(x) -> bool:
        return isinstance(x, ToroidalConv)

    def set_precision(x):
        if not is_conv(x) or x.precision == precision:
            return x
        # A static field: rebuild the layer (shapes only, nothing computed), put the weight back.
        conv = eqx.filter_eval_shape(
            ToroidalConv,
            x.in_channels,
            x.out_channels,
            x.kernel_size,
            x.dilations,
            impl=x.impl,
            precision=precision,
            key=jax.random.key(0),
        )
        return eqx.tree_at(lambda c: c.weight, conv, x.weight)

    return jax.tree_util.tree_map(set_precision, tree, is_leaf=is_conv)
