"""Encoder -> fractal field (fixed point) -> readout: image classifiers."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Complex, Float, PRNGKeyArray

from ._adjoint import AbstractAdjoint, ImplicitAdjoint
from ._cell import FractalCell
from ._conv import with_precision
from ._fixed_point import fixed_point, solve_settings
from ._head import PyramidHead
from ._jacobian import jacobian_penalty
from ._multiscale import MultiScaleCell
from ._planar import from_planar, to_planar
from ._precision import check_precision
from ._solution import Solution
from ._solver import AbstractFixedPointSolver, Anderson
from ._symmetric import SymmetricCell

_FIELDS = ("complex", "real")


def check_field(field: str, owner: str) -> None:
    if field not in _FIELDS:
        raise ValueError(f"{owner}(field={field!r}) must be 'complex' or 'real'.")


class Encoder(eqx.Module):
    """Real image `(c_in, H, W)` -> complex injection field `(channels, H/s, W/s)`.

    An optional real stem (`hidden > 0`: a 3x3 convolution to `hidden` maps and a ReLU), then a
    3x3 real convolution producing `2 * channels` maps, read as real and imaginary parts, then
    `pool x pool` average pooling; every convolution pads circularly. `phase="learned"`
    multiplies each channel by a learned unit phase `exp(i theta_c)`.

    `field="real"`: a real injection, the convolution producing `channels` maps (no pairing,
    no phase).
    """

    stem: eqx.nn.Conv2d | None
    conv: eqx.nn.Conv2d
    theta: Float[Array, " channels"] | None
    channels: int = eqx.field(static=True)
    pool: int = eqx.field(static=True)
    field: str = eqx.field(static=True, default="complex")

    def __init__(
        self,
        in_channels: int,
        channels: int,
        *,
        pool: int = 1,
        phase: str = "none",
        hidden: int = 0,
        field: str = "complex",
        key,
    ):
        check_field(field, "Encoder")
        if phase not in ("none", "learned"):
            raise ValueError(f"Encoder(phase={phase!r}) must be 'none' or 'learned'.")
        if phase == "learned" and field == "real":
            raise ValueError(
                "Encoder(phase='learned') multiplies the channels by complex phases; it is not "
                "available with field='real'."
            )
        if hidden < 0:
            raise ValueError(f"Encoder(hidden={hidden}) must be >= 0 (0: no stem).")
        # Without a stem, the keys (so the initial weights) are those of encoders before it.
        ckey, pkey = jr.split(key)
        skey = jr.fold_in(key, 1)
        conv = functools.partial(
            eqx.nn.Conv2d, kernel_size=3, padding=1, padding_mode="CIRCULAR", dtype=jnp.float32
        )
        self.stem = conv(in_channels, hidden, key=skey) if hidden else None
        maps = channels if field == "real" else 2 * channels
        self.conv = conv(hidden or in_channels, maps, key=ckey)
        self.theta = (
            jr.uniform(pkey, (channels,), jnp.float32, -math.pi, math.pi)
            if (phase == "learned")
            else None
        )
        self.channels = channels
        self.pool = pool
        self.field = field

    @property
    def in_channels(self) -> int:
        return (self.conv if self.stem is None else self.stem).in_channels

    def __call__(self, x: Float[Array, "cin H W"]) -> Complex[Array, "c h w"]:
        if x.ndim != 3 or x.shape[0] != self.in_channels:
            raise ValueError(
                f"Encoder expects one image of shape ({self.in_channels}, H, W) "
                f"(channels first, unbatched: vmap over a batch); got {x.shape}."
            )
        return self._encode(x[None])[0]

    def batched(self, x: Float[Array, "b cin H W"]) -> Complex[Array, "b c h w"]:
        """`vmap` of the encoder (the same computation, on the batch at once)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"Encoder.batched expects a batch of shape (b, {self.in_channels}, H, W); "
                f"got {x.shape}."
            )
        return self._encode(x)

    def _encode(self, x: Float[Array, "b cin H W"]) -> Complex[Array, "b c h w"]:
        h = x.astype(self.conv.weight.dtype)
        hh, ww = h.shape[2:]
        if hh % self.pool or ww % self.pool:
            raise ValueError(f"Image size {hh}x{ww} is not divisible by pool={self.pool}.")
        if self.stem is not None:
            h = jax.nn.relu(_pooled_conv(self.stem, h, 1))
        return self._to_field(_pooled_conv(self.conv, h, self.pool), axis=1)

    def _to_field(self, h: Array, axis: int) -> Array:
        if self.field == "real":
            return h
        re, im = jnp.split(h, 2, axis=axis)
        z = jax.lax.complex(re, im)
        if self.theta is not None:
            shape = [1] * z.ndim
            shape[axis] = self.channels
            z = z * jnp.exp(1j * self.theta).reshape(shape).astype(z.dtype)
        return z


def _pooled_conv(
    conv: eqx.nn.Conv2d, x: Float[Array, "b cin H W"], pool: int
) -> Float[Array, "b cout H/pool W/pool"]:
    """`conv` (3x3, circular padding) then `pool x pool` average pooling, as the one
    `(pool + 2)`-wide convolution of stride `pool` that the two compose to: `pool**2 / 2.25`
    times fewer products than convolving at full resolution, same values to rounding."""
    w = conv.weight  # (cout, cin, 3, 3)
    if pool > 1:  # box-filter the kernel: tap t of the composite sums taps t - (a, b) / pool^2
        pads = [(a, pool - 1 - a) for a in range(pool)]
        w = sum(jnp.pad(w, ((0, 0), (0, 0), pa, pb)) for pa in pads for pb in pads) / (pool * pool)
    x = jnp.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="wrap")
    y = jax.lax.conv_general_dilated(
        x, w, (pool, pool), "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW")
    )
    return y if conv.bias is None else y + conv.bias[None]


def _pool_matrix(n: int, g: int) -> np.ndarray:
    """`(g, n)`: row `i` averages bin `i` of `n` points split into `g` near-equal bins."""
    edges = np.linspace(0, n, g + 1).round().astype(int)
    m = np.zeros((g, n), np.float32)
    for i in range(g):
        m[i, edges[i] : edges[i + 1]] = 1.0 / (edges[i + 1] - edges[i])
    return m


class Readout(eqx.Module):
    """`|z|` (plus `|z| cos(arg z)`, `|z| sin(arg z)` if `phase_features`) -> optional head ->
    average pooling to a `grid x grid` layout (1 = global pooling) -> linear -> logits.

    `field="real"` (a real field): the real counterparts, `|z|` (plus `z` itself if
    `phase_features`).

    `hidden > 0` adds a nonlinear head at every site before pooling: a real 1x1 convolution
    from the site's features to `hidden` maps and a ReLU (one head per scale).

    `pyramid` (one width per scale) with `final_channels` replaces that head with HRNet's
    classification head as MDEQ uses it (`ff.PyramidHead`): the scales' site features are
    widened, merged from finest to coarsest and projected to `final_channels` maps on the
    coarsest grid, which are pooled to `max(1, grid // 2^(scales - 1))` bins a side (`grid=1`:
    MDEQ's global pooling).

    `dropout > 0` zeroes that fraction of the pooled features (scaling the rest by
    `1 / (1 - dropout)`) when called with a `key`; without one (evaluation) it does nothing.

    For a multi-scale state (`channels` a tuple, the fields finest first), scale `s` is pooled
    to `max(1, grid // 2^s)` bins a side and the features of all scales are concatenated.
    """

    linear: eqx.nn.Linear
    heads: tuple[eqx.nn.Linear, ...] | None
    pyramid: PyramidHead | None
    grid: int = eqx.field(static=True)
    phase_features: bool = eqx.field(static=True)
    channels: tuple[int, ...] = eqx.field(static=True)
    dropout: float = eqx.field(static=True)
    field: str = eqx.field(static=True, default="complex")

    def __init__(
        self,
        channels: int | Sequence[int],
        num_classes: int,
        *,
        grid: int = 1,
        phase_features=False,
        hidden: int = 0,
        dropout: float = 0.0,
        field: str = "complex",
        pyramid: Sequence[int] = (),
        final_channels: int = 0,
        key,
    ):
        check_field(field, "Readout")
        if hidden < 0:
            raise ValueError(f"Readout(hidden={hidden}) must be >= 0 (0: no head).")
        pyramid = tuple(int(p) for p in pyramid)
        if bool(pyramid) != (final_channels > 0) or (pyramid and hidden):
            raise ValueError(
                f"Readout(pyramid={pyramid}, final_channels={final_channels}, hidden={hidden}): "
                "a pyramid head needs both pyramid widths and final_channels > 0, and replaces "
                "the 1x1 head (hidden=0)."
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"Readout(dropout={dropout}) must be in [0, 1).")
        self.dropout = float(dropout)
        self.channels = (channels,) if isinstance(channels, int) else tuple(channels)
        self.grid = grid
        self.phase_features = phase_features
        self.field = field
        per_site = (2 if field == "real" else 3) if phase_features else 1
        # Without a head, the key (so the initial weights) is that of readouts before it.
        hkeys = jr.split(jr.fold_in(key, 1), len(self.channels))
        self.heads = (
            tuple(
                eqx.nn.Linear(per_site * c, hidden, dtype=jnp.float32, key=k)
                for c, k in zip(self.channels, hkeys, strict=True)
            )
            if hidden
            else None
        )
        self.pyramid = (
            PyramidHead(
                [per_site * c for c in self.channels],
                pyramid,
                final_channels,
                key=jr.fold_in(key, 2),
            )
            if pyramid
            else None
        )
        site = (hidden,) * len(self.channels) if hidden else [per_site * c for c in self.channels]
        if pyramid:
            feats = final_channels * self.grids[-1] ** 2
        else:
            feats = sum(f * g * g for f, g in zip(site, self.grids, strict=True))
        self.linear = eqx.nn.Linear(feats, num_classes, dtype=jnp.float32, key=key)

    @property
    def grids(self) -> tuple[int, ...]:
        return tuple(max(1, self.grid >> s) for s in range(len(self.channels)))

    def __call__(
        self, z: Complex[Array, "c h w"] | tuple, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " classes"]:
        zs = tuple(z) if isinstance(z, (tuple, list)) else (z,)
        if len(zs) != len(self.channels):
            raise ValueError(f"Readout expects {len(self.channels)} fields, got {len(zs)}.")
        if self.pyramid is not None:
            dtype = self.linear.weight.dtype
            f = self.pyramid([self._site(zi).astype(dtype) for zi in zs])
            feats = _pool(f, self.grids[-1])
        else:
            heads = (None,) * len(zs) if self.heads is None else self.heads
            feats = [
                self._features(zi, g, head)
                for zi, g, head in zip(zs, self.grids, heads, strict=True)
            ]
            feats = jnp.concatenate(feats)
        return self._classify(feats, key)

    def planar(
        self, p: Float[Array, "2 h w c b"] | tuple, *, keys: PRNGKeyArray | None = None
    ) -> Float[Array, "b classes"]:
        """The logits of a batch of planar fields (`ff.to_planar`; a tuple of them, finest
        first, for a multi-scale state): `vmap` of the readout on `ff.from_planar(p)`, with
        `keys` one per image, computed in the planar layout so that only the pooled features
        change layout. With a pyramid head it is that `vmap`."""
        ps = tuple(p) if isinstance(p, (tuple, list)) else (p,)
        if len(ps) != len(self.channels):
            raise ValueError(f"Readout expects {len(self.channels)} fields, got {len(ps)}.")
        if self.field == "real":
            raise ValueError("Readout(field='real') reads real fields; planar fields are complex.")
        if self.pyramid is not None:
            zs = tuple(from_planar(pi) for pi in ps)
            return jax.vmap(lambda z, k: self(z, key=k))(zs if len(zs) > 1 else zs[0], keys)
        heads = (None,) * len(ps) if self.heads is None else self.heads
        feats = []
        for pi, g, head in zip(ps, self.grids, heads, strict=True):
            f = self._site_planes(pi[0], pi[1], axis=2)  # (h, w, f, b)
            if head is not None:
                f = f.astype(head.weight.dtype)
                f = jnp.einsum("oc,hwcb->hwob", head.weight, f) + head.bias[:, None]
                f = jax.nn.relu(f)
            h, w = f.shape[:2]
            _check_pool(h, w, g)
            pooled = jnp.einsum("ih,hwfb,jw->bfij", _pool_matrix(h, g), f, _pool_matrix(w, g))
            feats.append(pooled.reshape(pooled.shape[0], -1))
        return jax.vmap(self._classify)(jnp.concatenate(feats, 1), keys)

    def _classify(self, feats: Float[Array, " f"], key: PRNGKeyArray | None) -> Array:
        """Dropout (with a `key`) and the linear layer, on one example's pooled features."""
        feats = feats.astype(self.linear.weight.dtype)
        if key is not None and self.dropout > 0:
            keep = jr.bernoulli(key, 1.0 - self.dropout, feats.shape)
            feats = jnp.where(keep, feats / (1.0 - self.dropout), 0.0)
        return self.linear(feats)

    def _site(self, z: Complex[Array, "c h w"]) -> Float[Array, "f h w"]:
        """The real features at every site of one field."""
        if self.field == "real" and jnp.iscomplexobj(z):
            raise TypeError(f"Readout(field='real') expects a real field, got dtype {z.dtype}.")
        if self.field == "real":
            mag = jnp.sqrt(z**2 + 1e-12)
            return jnp.concatenate([mag, z] if self.phase_features else [mag], 0)
        return self._site_planes(jnp.real(z), jnp.imag(z), axis=0)

    def _site_planes(self, re: Array, im: Array, axis: int) -> Array:
        """A complex field's site features from its real and imaginary parts, in any layout,
        concatenated along the channel `axis`."""
        mag = jnp.sqrt(re**2 + im**2 + 1e-12)
        feats = [mag]
        if self.phase_features:
            feats += [re / (mag + 1e-6) * mag, im / (mag + 1e-6) * mag]
        return jnp.concatenate(feats, axis)

    def _features(
        self, z: Complex[Array, "c h w"], g: int, head: eqx.nn.Linear | None
    ) -> Float[Array, " f"]:
        f = self._site(z)
        if head is not None:  # a 1x1 convolution: one matrix product over the channel axis
            f = f.astype(head.weight.dtype)
            f = jax.nn.relu(jnp.einsum("oc,chw->ohw", head.weight, f) + head.bias[:, None, None])
        return _pool(f, g)


def _pool(f: Float[Array, "c h w"], g: int) -> Float[Array, " cgg"]:
    """Adaptive average pooling on the torus grid to `g x g` bins of near-equal size, as two
    small averaging matrices: one contraction, whatever layout `f` arrives in."""
    c, h, w = f.shape
    _check_pool(h, w, g)
    return jnp.einsum("ih,chw,jw->cij", _pool_matrix(h, g), f, _pool_matrix(w, g)).reshape(-1)


def _check_pool(h: int, w: int, g: int) -> None:
    if h < g or w < g:
        raise ValueError(f"Readout pools to {g}x{g} bins; the field's grid is {h}x{w}.")


class _Masked(eqx.Module):
    """A linear part whose output is multiplied by a fixed mask."""

    op: Callable
    mask: Array

    def __call__(self, z):
        return self.op(z) * self.mask


class FieldClassifier(eqx.Module):
    """Image classifier whose hidden layer is the fixed point of a `FractalCell`.

    `model(x)` on one image `(c, H, W)` returns `(logits, solution)` where `solution` is the
    field's `ff.Solution` (value, result code, stats). `vmap` over a batch, or call
    `model.batched(x)` on a batch `(b, c, H, W)`, which follows `batch_solve`:

    - `"per_sample"` (default): `vmap` of `model`; each image's field stops on its own test.
    - `"planar"`: the whole batch is one fixed-point problem in the planar layout
      (`ff.to_planar`; every stage of the convolution a real matrix product), with one stopping
      test on the batch's residual norm. 1.4-1.9x faster training steps on a 2-core CPU
      (`benchmarks/batch_solve.py`), the same fixed points to within the tolerance; not for
      resolution-agnostic solvers (`ff.Multigrid`).

    `stem > 0` gives the encoder a hidden 3x3 ReLU convolution with that many maps;
    `readout_hidden > 0` gives the readout a 1x1 ReLU head with that many maps before pooling;
    `readout_pyramid` (one width per scale) and `readout_final` give it HRNet's classification
    head instead, as MDEQ uses it (`ff.PyramidHead`, `Readout(pyramid=...)`);
    `dropout > 0` drops that fraction of the readout's pooled features when the model is called
    with a `key` (training), and nothing without one. `field_dropout > 0` is variational dropout
    inside the equilibrium (MDEQ's): with a `key`, each image draws one mask of the field
    (`field_mask`) that multiplies the cell's linear part at every step of its solve.

    `hidden > 0` expands the cell's convolution to `hidden` channels and back at every step
    (`FractalCell(hidden=...)`), with `hidden_activation` between. `norm_groups > 0`
    group-normalises the cell's linear part (`FractalCell(norm_groups=...)`; no contraction
    certificate). `weight_norm=True` weight-normalises the cell's convolutions (MDEQ's;
    `FractalCell(weight_norm=True)`), under the same contraction certificate.

    `scales > 1` makes the field multi-resolution (`ff.MultiScaleCell`): `channels` complex
    channels on each of the `grid`, `grid / 2`, ... tori (or `channels` a tuple, one count per
    scale), coupled at every step, the injection entering at the finest; `coupling` sets the
    initial size of the cross-scale weights. The solution's value is then a tuple of fields,
    finest first.

    `symmetric=True` makes the cell an `ff.SymmetricCell` (a Hermitian coupling; activation
    `"modrelu"`, `"phase_tanh"` or `"crelu"`): its fixed point minimises an energy, which
    `ff.EquilibriumPropagation` needs. Single field, per-sample solves only.

    `precision="bfloat16"` is mixed precision for the field: the cell's toroidal convolutions
    run their matrix products on bfloat16 operands with float32 accumulation
    (`ff.ToroidalConv(precision=...)`, set by `ff.with_precision`), while the field, the
    solver's state, the encoder, the readout and all parameters stay float32/complex64.

    `field="real"` is the real-valued twin: a real injection (`Encoder(field="real")`), a real
    toroidal convolution with the same contraction certificate, the activation's real
    counterpart and real readout features (`Readout(field="real")`). A single field with
    per-sample solves (not with `scales > 1`, `batch_solve="planar"`, `symmetric`,
    `norm_groups` or `phase="learned"`). `ff.equal_params_channels` gives the channel count
    whose parameter count matches a complex model's.
    """

    encoder: Encoder
    cell: FractalCell | MultiScaleCell | SymmetricCell
    readout: Readout
    solver: AbstractFixedPointSolver
    adjoint: AbstractAdjoint
    max_steps: int = eqx.field(static=True)
    rtol: float = eqx.field(static=True)
    atol: float = eqx.field(static=True)
    batch_solve: str = eqx.field(static=True)
    field_dropout: float = eqx.field(static=True, default=0.0)
    field: str = eqx.field(static=True, default="complex")

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        image_size: int,
        channels: int | Sequence[int] = 24,
        scales: int = 1,
        coupling: float = 0.5,
        pool: int = 2,
        kernel_size: int = 3,
        dilations: tuple[int, ...] = (1,),
        gamma: float = 0.9,
        activation: str = "modrelu",
        alpha: float = 0.5,
        learn_alpha: bool = False,
        phase: str = "none",
        stem: int = 0,
        hidden: int = 0,
        hidden_activation: str | None = None,
        norm_groups: int = 0,
        weight_norm: bool = False,
        readout_grid: int = 1,
        phase_features: bool = False,
        readout_hidden: int = 0,
        readout_pyramid: Sequence[int] = (),
        readout_final: int = 0,
        dropout: float = 0.0,
        field_dropout: float = 0.0,
        impl: str = "auto",
        solver: AbstractFixedPointSolver | None = None,
        adjoint: AbstractAdjoint | None = None,
        max_steps: int = 30,
        rtol: float = 1e-3,
        atol: float = 1e-6,
        batch_solve: str = "per_sample",
        symmetric: bool = False,
        precision: str = "float32",
        field: str = "complex",
        key: PRNGKeyArray,
    ):
        precision = check_precision(precision, "FieldClassifier")
        check_field(field, "FieldClassifier")
        if batch_solve not in ("per_sample", "planar"):
            raise ValueError(
                f"FieldClassifier(batch_solve={batch_solve!r}) must be 'per_sample' or 'planar'."
            )
        if isinstance(field_dropout, bool) or not 0.0 <= field_dropout < 1.0:
            raise ValueError(f"FieldClassifier(field_dropout={field_dropout!r}) must be in [0, 1).")
        if field_dropout and (symmetric or scales > 1 or not isinstance(channels, int)):
            raise ValueError(
                f"FieldClassifier(field_dropout={field_dropout}) is an option of a single "
                "FractalCell field (not with symmetric=True or several scales)."
            )
        if field_dropout and getattr(solver, "resolution_agnostic", False):
            raise ValueError(
                f"FieldClassifier(field_dropout={field_dropout}) needs a solver that stays on one "
                f"grid (its mask is drawn for the field's grid); {type(solver).__name__} is "
                "resolution-agnostic."
            )
        if isinstance(channels, int):
            if scales < 1:
                raise ValueError(f"FieldClassifier(scales={scales}) must be >= 1.")
            chans = (channels,) * scales
        else:
            chans = tuple(int(c) for c in channels)
            if scales not in (1, len(chans)):
                raise ValueError(
                    f"FieldClassifier(scales={scales}, channels={channels}): give one channel "
                    "count per scale."
                )
        if field == "real":
            _only_defaults(
                "FieldClassifier(field='real') is a single FractalCell field with per-sample "
                "solves",
                scales=(len(chans), 1),
                batch_solve=(batch_solve, "per_sample"),
                symmetric=(symmetric, False),
                norm_groups=(norm_groups, 0),
                phase=(phase, "none"),
            )
        if len(chans) > 1:
            _check_multiscale_solver(solver)
            single = dict(hidden=hidden, norm_groups=norm_groups, weight_norm=weight_norm)
            for name, value in single.items():
                if value:
                    raise ValueError(
                        f"FieldClassifier({name}={value}) is an option of a single field's "
                        f"cell; it is not available with scales={len(chans)}."
                    )
        if symmetric:
            _only_defaults(
                "FieldClassifier(symmetric=True) supports a single field with per-sample solves "
                "only",
                scales=(len(chans), 1),
                hidden=(hidden, 0),
                norm_groups=(norm_groups, 0),
                weight_norm=(weight_norm, False),
                learn_alpha=(learn_alpha, False),
                batch_solve=(batch_solve, "per_sample"),
            )
        else:
            from ._equilibrium import EquilibriumPropagation  # circular import

            if isinstance(adjoint, EquilibriumPropagation):
                raise ValueError(
                    "EquilibriumPropagation needs a field whose update is the gradient of an "
                    "energy: FractalCell's convolution is not symmetric. Use symmetric=True "
                    "(an ff.SymmetricCell)."
                )
        ekey, ckey, rkey = jr.split(key, 3)
        grid = image_size // pool
        self.encoder = Encoder(
            in_channels, chans[0], pool=pool, phase=phase, hidden=stem, field=field, key=ekey
        )
        cell_kwargs = dict(
            kernel_size=kernel_size,
            dilations=tuple(dilations),
            gamma=gamma,
            norm_grid=(grid, grid),
            activation=activation,
            alpha=alpha,
            learn_alpha=learn_alpha,
            impl=impl,
            key=ckey,
        )
        if symmetric:
            cell_kwargs.pop("learn_alpha")
            self.cell = SymmetricCell(chans[0], **cell_kwargs)
        elif len(chans) == 1:
            self.cell = FractalCell(
                chans[0],
                hidden=hidden,
                hidden_activation=hidden_activation,
                norm_groups=norm_groups,
                weight_norm=weight_norm,
                dtype=jnp.float32 if field == "real" else jnp.complex64,
                **cell_kwargs,
            )
        else:
            self.cell = MultiScaleCell(chans, coupling=coupling, **cell_kwargs)
        self.cell = with_precision(self.cell, precision)
        self.readout = Readout(
            chans if len(chans) > 1 else chans[0],
            num_classes,
            grid=readout_grid,
            phase_features=phase_features,
            hidden=readout_hidden,
            dropout=dropout,
            field=field,
            pyramid=readout_pyramid,
            final_channels=readout_final,
            key=rkey,
        )
        self.solver = Anderson() if solver is None else solver
        self.adjoint = ImplicitAdjoint() if adjoint is None else adjoint
        self.max_steps = max_steps
        self.rtol = rtol
        self.atol = atol
        self.batch_solve = batch_solve
        self.field_dropout = float(field_dropout)
        self.field = field
        if batch_solve == "planar":
            _check_planar_solver(self.solver)

    def field_mask(self, key: PRNGKeyArray, grid: tuple[int, int]) -> Float[Array, "c h w"]:
        """One image's variational dropout mask of the field's linear part: `0` with
        probability `field_dropout`, else `1 / (1 - field_dropout)`, drawn once per solve."""
        p = self.field_dropout
        keep = jr.bernoulli(key, 1.0 - p, (self.cell.channels, *grid))
        return jnp.where(keep, 1.0 / (1.0 - p), 0.0).astype(jnp.float32)

    def _field_key(self, key: PRNGKeyArray | None) -> PRNGKeyArray | None:
        # Derived, so that the readout's dropout keeps the key it had without field dropout.
        return None if key is None or not self.field_dropout else jr.fold_in(key, 1)

    def solve(
        self,
        x: Float[Array, "cin H W"],
        *,
        z0=None,
        stats_probe=None,
        field_mask: Float[Array, "c h w"] | None = None,
        **fixed_point_kwargs: Any,
    ) -> Solution:
        """Encode `x` and solve the field from `z0` (default: the zero field; a warm start
        from a similar input's fixed point saves steps); keyword arguments override
        `ff.fixed_point`'s. `field_mask` (`field_mask(key, grid)`) multiplies the cell's linear
        part at every step: variational dropout inside the equilibrium."""
        injection = self.encoder(x)
        kwargs = solve_settings(self, fixed_point_kwargs)
        if field_mask is not None and (
            getattr(kwargs["solver"], "resolution_agnostic", False)
            or not isinstance(self.cell, FractalCell)
        ):
            raise ValueError(
                "field_mask needs a FractalCell field and a solver that stays on one grid."
            )
        zero = self.cell.init_state(injection)
        if z0 is None:
            z0 = zero
        else:
            shapes = jax.tree_util.tree_map(jnp.shape, (z0, zero))
            if shapes[0] != shapes[1]:
                raise ValueError(f"`z0` has shapes {shapes[0]}; the field has shapes {shapes[1]}.")
            z0 = jax.tree_util.tree_map(lambda a, b: jnp.asarray(a, b.dtype), z0, zero)
        if isinstance(self.cell, SymmetricCell):
            # An energy map; with its operator built once, outside the loop, unless the
            # solver needs it at several grid sizes.
            agnostic = getattr(kwargs["solver"], "resolution_agnostic", False)
            fn = self.cell if agnostic else self.cell.bind(*injection.shape[1:])
        elif getattr(kwargs["solver"], "resolution_agnostic", False):
            if isinstance(self.cell, MultiScaleCell):
                _check_multiscale_solver(kwargs["solver"])
            # Acts at any grid size; the solver restricts the injection alongside the state.
            fn = self.cell.normalized()
        else:
            # Precompute the operator (e.g. the kernel's spectrum) once, outside the loop.
            _, h, w = injection.shape
            op = self.cell.operator(h, w)
            if field_mask is not None:
                op = _Masked(op, field_mask)
            cell = self.cell

            def fn(z, inj):
                return cell.step_with(op, z, inj)

        return fixed_point(fn, z0, injection, stats_probe=stats_probe, **kwargs)

    def __call__(
        self,
        x: Float[Array, "cin H W"],
        *,
        key: PRNGKeyArray | None = None,
        stats_probe=None,
        **fixed_point_kwargs: Any,
    ) -> tuple[Float[Array, " classes"], Solution]:
        """`(logits, solution)` for one image; `key` switches on the dropouts (the readout's,
        and the field's with `field_dropout > 0`)."""
        field_key = self._field_key(key)
        mask = None if field_key is None else self.field_mask(field_key, self._grid(x))
        sol = self.solve(x, stats_probe=stats_probe, field_mask=mask, **fixed_point_kwargs)
        return self.readout(sol.value, key=key), sol

    def _grid(self, x: Float[Array, "... cin H W"]) -> tuple[int, int]:
        return tuple(int(n) // self.encoder.pool for n in x.shape[-2:])

    def solve_planar(
        self,
        x: Float[Array, "b cin H W"],
        *,
        stats_probe=None,
        field_masks: Float[Array, "b c h w"] | None = None,
        planar_value: bool = False,
        **fixed_point_kwargs: Any,
    ) -> Solution:
        """Encode a batch and solve its fields as one problem in the planar layout.

        Returns the batch's `ff.Solution` with `value` of shape `(b, c, h, w)` (complex; a
        tuple of such fields, finest first, for a multi-scale field; with `planar_value`, the
        planar fields `(2, h, w, c, b)` as solved) and scalar `result` and `stats` (one solve).
        Differentiating with respect to `stats_probe` gives the backward solve's statistics
        times `b`, so that, as for `b` per-sample solves, dividing by `b` gives the per-image
        mean.
        """
        if x.ndim != 4:
            raise ValueError(f"solve_planar expects a batch (b, c, H, W), got shape {x.shape}.")
        if self.field == "real":
            raise ValueError(
                "solve_planar carries complex fields; a field='real' model solves per sample."
            )
        injection = to_planar(self.encoder.batched(x))
        kwargs = solve_settings(self, fixed_point_kwargs)
        _check_planar_solver(kwargs["solver"])
        _, h, w, _, b = injection.shape
        op = self.cell.planar_operator(h, w)
        if field_masks is not None:  # (b, c, h, w) -> (h, w, c, b), shared by both planes
            op = _Masked(op, jnp.transpose(field_masks, (2, 3, 1, 0)))
        cell = self.cell

        def fn(p, inj):
            return cell.planar_step(op, p, inj)

        if stats_probe is not None:
            stats_probe = stats_probe * b
        sol = fixed_point(
            fn, self.cell.init_state(injection), injection, stats_probe=stats_probe, **kwargs
        )
        return sol if planar_value else _value_from_planar(sol)

    def batched(
        self,
        x: Float[Array, "b cin H W"],
        *,
        key: PRNGKeyArray | None = None,
        stats_probe=None,
        **fixed_point_kwargs: Any,
    ) -> tuple[Float[Array, "b classes"], Solution]:
        """`(logits, solution)` for a batch `(b, c, H, W)`, solved as `batch_solve` says.

        The solution's `value`, `result` and `stats` have a leading batch axis either way (with
        `"planar"`, every image carries the batch solve's result and statistics). `key` switches
        on the readout's dropout (split into one key per image)."""
        if x.ndim != 4:
            raise ValueError(f"batched expects a batch (b, c, H, W), got shape {x.shape}.")
        keys = None if key is None else jr.split(key, x.shape[0])
        if self.batch_solve == "per_sample":
            return jax.vmap(
                lambda xi, ki: self(xi, key=ki, stats_probe=stats_probe, **fixed_point_kwargs)
            )(x, keys)
        masks = None
        if keys is not None and self.field_dropout:
            grid = self._grid(x)
            masks = jax.vmap(lambda k: self.field_mask(self._field_key(k), grid))(keys)
        planar = self.solve_planar(
            x, stats_probe=stats_probe, field_masks=masks, planar_value=True, **fixed_point_kwargs
        )
        logits = self.readout.planar(planar.value, keys=keys)
        sol = _value_from_planar(planar)
        b = x.shape[0]
        traj = sol.stats.trajectory
        stats = dataclasses.replace(sol.stats, trajectory=None)
        result, stats = jax.tree_util.tree_map(
            lambda a: jnp.broadcast_to(a, (b, *jnp.shape(a))) if eqx.is_array(a) else a,
            (sol.result, stats),
        )
        if traj is not None:  # each image's own iterates, batch axis first as under vmap
            traj = jax.tree_util.tree_map(lambda t: jnp.swapaxes(t, 0, 1), traj)
            stats = dataclasses.replace(stats, trajectory=traj)
        return logits, Solution(value=sol.value, result=result, stats=stats)

    def jacobian_penalty(
        self,
        x: Float[Array, "b cin H W"],
        value,
        *,
        key: PRNGKeyArray,
        probes: int = 1,
    ) -> Float[Array, ""]:
        """`ff.jacobian_penalty` of the cell's update without its relaxation,
        `act(K z + injection)`, at a batch's fixed points `value` (`batched(x)[1].value`;
        gradients stopped there), averaged over the batch. A training loss term that keeps the
        solves short (Bai et al. 2021), useful for cells without a certificate (`norm_groups`).
        """
        value = jax.lax.stop_gradient(value)
        cell = self.cell
        a = cell.alpha()

        def unrelaxed(step):
            def f(z, inj):
                return jax.tree_util.tree_map(lambda s, zi: (s - (1 - a) * zi) / a, step(z, inj), z)

            return f

        if self.batch_solve == "planar":
            injection = to_planar(self.encoder.batched(x))
            _, h, w, _, _ = injection.shape
            op = cell.planar_operator(h, w)
            z = jax.tree_util.tree_map(to_planar, value)
            fn = unrelaxed(lambda p, inj: cell.planar_step(op, p, inj))
            return jacobian_penalty(fn, z, injection, key=key, probes=probes)
        injection = jax.vmap(self.encoder)(x)
        op = cell.operator(*injection.shape[-2:])
        fn = unrelaxed(lambda z, inj: cell.step_with(op, z, inj))
        keys = jr.split(key, x.shape[0])
        per_image = jax.vmap(lambda z, inj, k: jacobian_penalty(fn, z, inj, key=k, probes=probes))(
            value, injection, keys
        )
        return jnp.mean(per_image)


def _value_from_planar(sol: Solution) -> Solution:
    """A planar solve's value `(2, h, w, c, b)` (and its trajectory) as complex `(b, c, h, w)`
    fields."""
    sol = eqx.tree_at(lambda s: s.value, sol, jax.tree_util.tree_map(from_planar, sol.value))
    if sol.stats.trajectory is not None:  # (records, 2, h, w, c, b) -> (records, b, c, h, w)
        traj = jax.tree_util.tree_map(jax.vmap(from_planar), sol.stats.trajectory)
        sol = eqx.tree_at(lambda s: s.stats.trajectory, sol, traj)
    return sol


def _only_defaults(what: str, **options: tuple[Any, Any]) -> None:
    """Raise `what; name=value is not available` for the first option `name=(value, default)`
    that is not at its default."""
    for name, (value, default) in options.items():
        if value != default:
            raise ValueError(f"{what}; {name}={value!r} is not available.")


def _check_multiscale_solver(solver) -> None:
    if getattr(solver, "resolution_agnostic", False):
        raise ValueError(
            f"{type(solver).__name__} solves a single field across resolutions; a multi-scale "
            "field (scales > 1) needs a single-grid solver (Anderson, Broyden, Naive)."
        )


def _check_planar_solver(solver) -> None:
    if getattr(solver, "resolution_agnostic", False):
        raise ValueError(
            f"batch_solve='planar' needs a solver that stays on one grid; "
            f"{type(solver).__name__} is resolution-agnostic. Use batch_solve='per_sample'."
        )


def count_params(model) -> int:
    """Real parameters (a complex weight counts as two) of a model, or of its shapes from
    `eqx.filter_eval_shape` (no weights initialised)."""

    def is_param(x):
        shaped = eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)
        return shaped and jnp.issubdtype(x.dtype, jnp.inexact)

    leaves = [x for x in jax.tree_util.tree_leaves(model) if is_param(x)]
    return int(sum(math.prod(x.shape) * (2 if jnp.iscomplexobj(x) else 1) for x in leaves))


def param_summary(model) -> str:
    """A table of parameter counts per module path."""
    rows = []
    flat = jax.tree_util.tree_flatten_with_path(eqx.filter(model, eqx.is_inexact_array))[0]
    for path, x in flat:
        n = x.size * (2 if jnp.iscomplexobj(x) else 1)
        rows.append((jax.tree_util.keystr(path), f"{x.dtype.name}{list(x.shape)}", n))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'parameter':<{width}}  {'array':<24} {'real params':>11}"]
    lines += [f"{p:<{width}}  {s:<24} {n:>11,}" for p, s, n in rows]
    lines.append(f"{'total':<{width}}  {'':<24} {count_params(model):>11,}")
    return "\n".join(lines)


PRESETS: dict[str, dict[str, Any]] = {
    # MNIST, under 20,000 real parameters.
    "nano": dict(in_channels=1, num_classes=10, image_size=28, channels=28, pool=2, readout_grid=4),
    # CIFAR-10, at most 170,000 real parameters.
    "cifar_small": dict(
        in_channels=3,
        num_classes=10,
        image_size=32,
        channels=64,
        pool=2,
        readout_grid=4,
        phase_features=True,
    ),
    # A tiny model for tests and smoke runs.
    "tiny": dict(in_channels=1, num_classes=10, image_size=8, channels=4, pool=1, readout_grid=2),
}


def make_model(preset: str | None = None, *, key: PRNGKeyArray, **overrides) -> FieldClassifier:
    """Build a `FieldClassifier` from a named preset (`nano`, `cifar_small`, `tiny`) with
    keyword overrides."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose from {sorted(PRESETS)}.")
    kwargs = dict(PRESETS.get(preset, {}))
    kwargs.update(overrides)
    return FieldClassifier(key=key, **kwargs)
