"""Group normalisation of complex fields."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Complex, Float


class ComplexGroupNorm(eqx.Module):
    """Group normalisation of a complex `(channels, h, w)` field (Wu & He 2018, complex).

    The channels are split into `groups`; each group is centred by its complex mean and
    divided by its root-mean-square modulus, `(z - mean) / sqrt(mean |z - mean|^2 + eps)`.
    Then channel `c` is scaled by the real `gain[c]` (initially `gain`, default 1) and shifted
    by the complex `bias[c]` (initially 0). Blind to each group's scale and offset, equivariant
    to its phase and to translations on the torus.

    Not Lipschitz with a bounded constant (near a constant group it divides by `sqrt(eps)`), so
    a cell using it has no contraction certificate; its output is bounded, so a fixed point
    still exists.
    """

    gain: Float[Array, " channels"]
    bias: Complex[Array, " channels"]
    groups: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)

    def __init__(self, channels: int, groups: int, *, gain: float = 1.0, eps: float = 1e-5):
        if groups < 1 or channels % groups:
            raise ValueError(
                f"ComplexGroupNorm(channels={channels}, groups={groups}): groups must be a "
                "positive divisor of channels."
            )
        self.gain = jnp.full((channels,), gain, jnp.float32)
        self.bias = jnp.zeros((channels,), jnp.complex64)
        self.groups = groups
        self.eps = float(eps)

    @property
    def channels(self) -> int:
        return self.gain.shape[0]

    def __call__(self, z: Complex[Array, "channels h w"]) -> Complex[Array, "channels h w"]:
        if z.ndim != 3 or z.shape[0] != self.channels:
            raise ValueError(
                f"ComplexGroupNorm expects a field ({self.channels}, h, w), got shape {z.shape}."
            )
        c, h, w = z.shape
        g = z.reshape(self.groups, c // self.groups, h, w)
        g = g - jnp.mean(g, axis=(1, 2, 3), keepdims=True)
        var = jnp.mean(jnp.real(g) ** 2 + jnp.imag(g) ** 2, axis=(1, 2, 3), keepdims=True)
        out = (g * jax.lax.rsqrt(var + self.eps)).reshape(c, h, w)
        gain = self.gain.astype(var.dtype)[:, None, None]
        return (out * gain + self.bias.astype(z.dtype)[:, None, None]).astype(z.dtype)

    def planar(self, p: Float[Array, "2 h w channels b"]) -> Float[Array, "2 h w channels b"]:
        """The same on batched planar fields (`ff.to_planar`), each field on its own."""
        if p.ndim != 5 or p.shape[0] != 2 or p.shape[3] != self.channels:
            raise ValueError(
                f"ComplexGroupNorm.planar expects planar fields (2, h, w, {self.channels}, b), "
                f"got shape {p.shape}."
            )
        _, h, w, c, b = p.shape
        g = p.reshape(2, h, w, self.groups, c // self.groups, b)
        g = g - jnp.mean(g, axis=(1, 2, 4), keepdims=True)
        var = jnp.mean(jnp.sum(g**2, axis=0, keepdims=True), axis=(1, 2, 4), keepdims=True)
        out = (g * jax.lax.rsqrt(var + self.eps)).reshape(2, h, w, c, b)
        bias = jnp.stack([jnp.real(self.bias), jnp.imag(self.bias)]).astype(p.dtype)
        return out * self.gain.astype(p.dtype)[:, None] + bias[:, None, None, :, None]
