"""Post-training weight quantisation (int8/int4, per-channel scales) with the contraction
certificate re-checked."""

from __future__ import annotations

import math
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Integer

from ._contraction import ContractiveToroidalConv
from ._conv import ToroidalConv

ComplexFormat = Literal["reim", "polar"]


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise TypeError(f"bits={bits!r} must be an int (8 or 4).")
    if bits not in (4, 8):
        raise ValueError(f"bits={bits} is not supported: use 8 or 4.")
    return int(bits)


def _channel_max(a: np.ndarray, axis: int) -> np.ndarray:
    """`max |a|` over every axis but `axis`, kept broadcastable against `a`."""
    other = tuple(i for i in range(a.ndim) if i != axis)
    return np.max(np.abs(a), axis=other, keepdims=True)


class QuantisedArray(eqx.Module):
    """A weight stored as `bits`-bit integers with one float32 scale per channel (`axis`).

    Formats:

    - `"real"`: `w ~ scale * q`, `q` symmetric in `[-(2^(bits-1) - 1), 2^(bits-1) - 1]`.
    - `"reim"` (complex): real and imaginary parts as two such integer arrays (`values[0]`,
      `values[1]`) sharing the channel's scale.
    - `"polar"` (complex): `|w| ~ scale * m` with unsigned `m` in `[0, 2^bits - 1]`
      (`values`) and `arg w ~ 2 pi k / 2^bits` with `k` in `[-2^(bits-1), 2^(bits-1) - 1]`
      (`phase`; no scale).

    Rounding is to nearest, so each integer-coded part is off by at most `scale / 2` and
    a polar phase by at most `pi / 2^bits`. `dequantise()` gives back a float array of the
    original dtype; `nbytes` is the packed size (`bits / 8` bytes per integer plus the
    float32 scales).
    """

    values: Integer[Array, "..."]
    phase: Integer[Array, "..."] | None
    scale: Float[Array, "..."]
    bits: int = eqx.field(static=True)
    format: str = eqx.field(static=True)
    axis: int = eqx.field(static=True)
    dtype: Any = eqx.field(static=True)

    def __init__(
        self,
        weight: Array,
        bits: int = 8,
        *,
        axis: int = 0,
        complex_format: ComplexFormat = "reim",
    ):
        bits = _check_bits(bits)
        if complex_format not in ("reim", "polar"):
            raise ValueError(f"complex_format={complex_format!r} must be 'reim' or 'polar'.")
        w = np.asarray(weight)
        if not jnp.issubdtype(w.dtype, jnp.inexact):
            raise TypeError(f"QuantisedArray quantises float or complex arrays, got {w.dtype}.")
        if w.ndim == 0 or not -w.ndim <= axis < w.ndim:
            raise ValueError(f"axis={axis} is not a channel axis of an array of shape {w.shape}.")
        axis = axis % w.ndim
        qmax = 2 ** (bits - 1) - 1
        w64 = w.astype(np.complex128 if np.iscomplexobj(w) else np.float64)
        self.bits, self.axis, self.dtype = bits, axis, w.dtype
        self.phase = None
        if not np.iscomplexobj(w):
            self.format = "real"
            scale = _scale(_channel_max(w64, axis), qmax)
            self.values = jnp.asarray(np.clip(np.rint(w64 / scale), -qmax, qmax), jnp.int8)
        elif complex_format == "reim":
            self.format = "reim"
            parts = np.stack([w64.real, w64.imag])
            scale = _scale(
                np.maximum(_channel_max(w64.real, axis), _channel_max(w64.imag, axis)), qmax
            )
            self.values = jnp.asarray(np.clip(np.rint(parts / scale), -qmax, qmax), jnp.int8)
        else:
            self.format = "polar"
            levels = 2**bits - 1
            scale = _scale(_channel_max(w64, axis), levels)
            self.values = jnp.asarray(np.clip(np.rint(np.abs(w64) / scale), 0, levels), jnp.uint8)
            step = 2 * math.pi / 2**bits
            k = np.rint(np.angle(w64) / step).astype(np.int64)
            k = (k + 2 ** (bits - 1)) % 2**bits - 2 ** (bits - 1)  # wrap +pi to -pi
            self.phase = jnp.asarray(k, jnp.int8)
        self.scale = jnp.asarray(scale, jnp.float32)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape[1:] if self.format == "reim" else self.values.shape

    def dequantise(self) -> Array:
        """The float (or complex) array the integers stand for."""
        s = self.scale
        if self.format == "real":
            return (self.values.astype(jnp.float32) * s).astype(self.dtype)
        if self.format == "reim":
            v = self.values.astype(jnp.float32) * s
            return jax.lax.complex(v[0], v[1]).astype(self.dtype)
        mag = self.values.astype(jnp.float32) * s
        ang = self.phase.astype(jnp.float32) * (2 * math.pi / 2**self.bits)
        return jax.lax.complex(mag * jnp.cos(ang), mag * jnp.sin(ang)).astype(self.dtype)

    @property
    def nbytes(self) -> int:
        """Packed size in bytes: the integers at `bits` bits each, plus float32 scales."""
        n = self.values.size + (0 if self.phase is None else self.phase.size)
        return math.ceil(n * self.bits / 8) + 4 * self.scale.size


def _scale(channel_max: np.ndarray, levels: int) -> np.ndarray:
    # An all-zero channel gets scale 1 (its integers are all 0 anyway).
    return np.where(channel_max > 0, channel_max / levels, 1.0).astype(np.float32)


def _is_layer(x) -> bool:
    return isinstance(x, (eqx.nn.Linear, eqx.nn.Conv, ToroidalConv, ContractiveToroidalConv))


def _is_quantised(x) -> bool:
    return isinstance(x, QuantisedArray)


def quantise(
    model: eqx.Module,
    bits: int = 8,
    *,
    complex_format: ComplexFormat = "reim",
    on_violation: Literal["rescale", "raise"] = "rescale",
) -> eqx.Module:
    """Post-training quantisation of a model's layer weights to `bits` (8 or 4) bits.

    Every `weight` of an `eqx.nn.Linear`, `eqx.nn.Conv` and `ff.ToroidalConv` becomes a
    `ff.QuantisedArray` with one scale per output channel; complex weights are stored as
    real/imaginary pairs (`complex_format="reim"`) or magnitude/phase (`"polar"`). Biases and
    other small parameters stay in float32. The result stores integers and cannot be called:
    `ff.dequantise` gives back a runnable model.

    A `ff.ContractiveToroidalConv` is quantised with its contraction rescaling folded in
    (the operator it applies, of norm at most `gamma`). Rounding can move the operator norm
    above `gamma`; then `on_violation="rescale"` multiplies that weight's scales by
    `gamma / norm` (the integers are unchanged; the exact norm on `norm_grid` is then
    `gamma` to rounding) and `"raise"` raises a `ValueError`. `ff.contraction_report` gives
    the norms after quantisation.
    """
    bits = _check_bits(bits)
    if complex_format not in ("reim", "polar"):
        raise ValueError(f"complex_format={complex_format!r} must be 'reim' or 'polar'.")
    if on_violation not in ("rescale", "raise"):
        raise ValueError(f"on_violation={on_violation!r} must be 'rescale' or 'raise'.")

    def quantise_layer(layer):
        if isinstance(layer, ContractiveToroidalConv):
            conv = layer.normalised()
            qconv = quantise_layer(conv)
            h, w = layer.norm_grid
            norm = float(_dequantise_tree(qconv).operator_norm(h, w))
            if norm > layer.gamma:
                if on_violation == "raise":
                    raise ValueError(
                        f"After {bits}-bit quantisation a contractive convolution has operator "
                        f"norm {norm:.6f} > gamma={layer.gamma} on its {h}x{w} grid."
                    )
                # A hair below `gamma` so that rounding in the check stays inside the bound.
                factor = layer.gamma / norm * (1 - 1e-6)
                qconv = eqx.tree_at(lambda c: c.weight.scale, qconv, qconv.weight.scale * factor)
            if layer.gain is not None:  # the folded weight already holds the normalisation
                layer = eqx.tree_at(lambda c: c.gain, layer, None)
            return eqx.tree_at(lambda c: c.conv, layer, qconv)
        if _is_quantised(layer.weight):
            raise ValueError("This model is already quantised; dequantise it first.")
        axis = 1 if isinstance(layer, ToroidalConv) else 0  # (d, cout, cin, k, k)
        q = QuantisedArray(layer.weight, bits, axis=axis, complex_format=complex_format)
        return eqx.tree_at(lambda c: c.weight, layer, q)

    return jax.tree_util.tree_map(
        lambda x: quantise_layer(x) if _is_layer(x) else x, model, is_leaf=_is_layer
    )


def _dequantise_tree(tree):
    return jax.tree_util.tree_map(
        lambda x: x.dequantise() if _is_quantised(x) else x, tree, is_leaf=_is_quantised
    )


def dequantise(model: eqx.Module) -> eqx.Module:
    """The runnable model whose weights are those a `ff.quantise`d model stands for."""
    return _dequantise_tree(model)


def model_nbytes(model: eqx.Module) -> int:
    """Bytes of a model's arrays (quantised weights at their packed size)."""
    leaves = jax.tree_util.tree_leaves(model, is_leaf=_is_quantised)
    total = 0
    for leaf in leaves:
        if _is_quantised(leaf):
            total += leaf.nbytes
        elif eqx.is_array(leaf):
            total += leaf.size * leaf.dtype.itemsize
    return total


def contraction_report(model: eqx.Module) -> list[dict[str, float]]:
    """For every `ff.ContractiveToroidalConv` of a (possibly quantised) model: the exact
    operator norm of its stored weight on `norm_grid` (`"norm"`), its bound `"gamma"`, and
    the norm of the operator it applies (`"applied"`, after the runtime rescaling, at most
    `gamma`)."""
    model = dequantise(model)
    convs = [
        x
        for x in jax.tree_util.tree_leaves(
            model, is_leaf=lambda x: isinstance(x, ContractiveToroidalConv)
        )
        if isinstance(x, ContractiveToroidalConv)
    ]
    return [
        dict(
            norm=float(c.conv.operator_norm(*c.norm_grid)),
            gamma=c.gamma,
            applied=float(c.lipschitz_bound(*c.norm_grid)),
        )
        for c in convs
    ]
