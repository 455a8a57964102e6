"""Coupled complex fields on a pyramid of tori: a multi-resolution fractal cell."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Complex, Float, PRNGKeyArray

from ._activation import LIPSCHITZ
from ._cell import make_activation, make_alpha
from ._contraction import check_norm_args, spectrum_norm
from ._conv import ToroidalConv, complex_rayleigh_init

Fields = tuple[Array, ...]


def _pairs(scales: int) -> list[tuple[int, int]]:
    """Coupled `(target, source)` scale pairs, in the order of `MultiScaleCell.mix`."""
    return [(s, t) for s, t in itertools.product(range(scales), repeat=2) if s != t]


def _check_grid(scales: int, h: int, w: int) -> None:
    f = 2 ** (scales - 1)
    if h % f or w % f:
        raise ValueError(
            f"MultiScaleCell with {scales} scales needs a grid divisible by {f}; got {h}x{w}."
        )


def _pool(z: Array, f: int, planar: bool) -> Array:
    """`f x f` average pooling of `(c, h, w)` or planar `(2, h, w, c, b)` fields."""
    if f == 1:
        return z
    if planar:
        r, h, w, c, b = z.shape
        return z.reshape(r, h // f, f, w // f, f, c, b).mean((2, 4))
    c, h, w = z.shape
    return z.reshape(c, h // f, f, w // f, f).mean((2, 4))


def _upsample(z: Array, f: int, planar: bool) -> Array:
    """Nearest-neighbour upsampling by `f` (each site copied to an `f x f` block)."""
    if f == 1:
        return z
    return jnp.repeat(jnp.repeat(z, f, axis=1), f, axis=2)


def _mix(m: Array, z: Array, planar: bool) -> Array:
    """Complex channel mixing `m (cout, cin)` of a field (a 1x1 convolution)."""
    if not planar:
        return jnp.einsum("oc,chw->ohw", m.astype(z.dtype), z)
    mr, mi = jnp.real(m).astype(z.dtype), jnp.imag(m).astype(z.dtype)
    re = jnp.einsum("oc,hwcb->hwob", mr, z[0]) - jnp.einsum("oc,hwcb->hwob", mi, z[1])
    im = jnp.einsum("oc,hwcb->hwob", mi, z[0]) + jnp.einsum("oc,hwcb->hwob", mr, z[1])
    return jnp.stack([re, im])


class MultiScaleOperator(eqx.Module):
    """The linear part of a `MultiScaleCell` on one grid, rescaled: built once per solve by
    `cell.operator(h, w)` (or `cell.planar_operator(h, w)` for batched planar fields)."""

    convs: tuple[Callable, ...]
    mix: tuple[Complex[Array, "cs ct"], ...]
    planar: bool = eqx.field(static=True)

    def __call__(self, zs: Fields) -> Fields:
        out = [op(z) for op, z in zip(self.convs, zs, strict=True)]
        for m, (s, t) in zip(self.mix, _pairs(len(zs)), strict=True):
            if t < s:  # finer -> coarser: pool, then mix on the coarse grid
                y = _mix(m, _pool(zs[t], 2 ** (s - t), self.planar), self.planar)
            else:  # coarser -> finer: mix on the coarse grid, then upsample
                y = _upsample(_mix(m, zs[t], self.planar), 2 ** (t - s), self.planar)
            out[s] = out[s] + y
        return tuple(out)


class MultiScaleCell(eqx.Module):
    """Fractal cell on a pyramid of tori: scale `s` holds a complex field of `channels[s]`
    channels on the `(h / 2^s, w / 2^s)` torus, and every scale is updated by

        z_s <- (1 - alpha) z_s + alpha * act_s(c [K_s z_s + sum_{t != s} M_st R_st z_t] + u_s)

    - `K_s`: a complex toroidal convolution per scale (the same `kernel_size`, `dilations`);
    - `R_st`: average pooling (finer source) or nearest-neighbour upsampling (coarser source),
      `M_st`: a learned complex `channels[s] x channels[t]` mixing (a 1x1 convolution);
    - `u_s`: the injection, given for the finest scale only (as in MDEQ) or as one field per
      scale;
    - `c = min(1, gamma / ||N||_2)`, where `N[s, s] = ||K_s||_op` (exact operator norm on the
      scale's reference grid, `norm_grid / 2^s`) and `N[s, t] = ||M_st||_2`.

    In the norm `||z||^2 = sum_s mean(|z_s|^2)` (each scale's mean square), pooling and
    upsampling have norm at most 1, so the linear part has norm at most `c ||N||_2 <= gamma`,
    and with a 1-Lipschitz activation the cell is a contraction (`lipschitz_bound`): the fixed
    point exists, is unique, and naive iteration reaches it.

    The state is a tuple of fields, finest first; `init_state(injection)` makes the zero state.
    Grids must be divisible by `2^(scales - 1)`. `coupling` scales the initial `M_st` (relative
    to a complex Glorot initialisation); the other arguments are those of `FractalCell`.
    """

    convs: tuple[ToroidalConv, ...]
    mix: tuple[Complex[Array, "cs ct"], ...]
    acts: tuple[eqx.Module, ...]
    alpha_param: Float[Array, ""] | float
    channels: tuple[int, ...] = eqx.field(static=True)
    act_name: str = eqx.field(static=True)
    learn_alpha: bool = eqx.field(static=True)
    gamma: float = eqx.field(static=True)
    norm_grid: tuple[int, int] = eqx.field(static=True)
    norm_method: Literal["auto", "svd", "power"] = eqx.field(static=True)
    power_iters: int = eqx.field(static=True)

    def __init__(
        self,
        channels: Sequence[int],
        *,
        kernel_size: int = 3,
        dilations: tuple[int, ...] = (1,),
        gamma: float = 0.9,
        norm_grid: tuple[int, int] = (16, 16),
        activation: str = "modrelu",
        alpha: float = 0.5,
        learn_alpha: bool = False,
        coupling: float = 0.5,
        impl: str = "auto",
        norm_method: Literal["auto", "svd", "power"] = "auto",
        power_iters: int = 50,
        key: PRNGKeyArray,
    ):
        channels = tuple(int(c) for c in channels)
        if not channels or min(channels) < 1:
            raise ValueError(f"MultiScaleCell(channels={channels}): need positive channel counts.")
        scales = len(channels)
        check_norm_args(gamma, norm_grid, norm_method)
        h, w = (int(n) for n in norm_grid)
        _check_grid(scales, h, w)
        self.alpha_param = make_alpha(alpha, learn_alpha, "MultiScaleCell")
        self.acts = tuple(make_activation(activation, c) for c in channels)
        ckey, mkey = jr.split(key)
        self.convs = tuple(
            ToroidalConv(c, c, kernel_size, dilations, impl=impl, key=k)
            for c, k in zip(channels, jr.split(ckey, scales), strict=True)
        )
        # Coupling weights start at `coupling` times the complex Glorot scale.
        pairs = _pairs(scales)
        mkeys = jr.split(mkey, max(len(pairs), 1))
        self.mix = tuple(
            complex_rayleigh_init(
                k, (channels[s], channels[t]), coupling / (channels[s] + channels[t]) ** 0.5
            )
            for k, (s, t) in zip(mkeys, pairs, strict=False)
        )
        self.channels = channels
        self.act_name = activation
        self.learn_alpha = learn_alpha
        self.gamma = float(gamma)
        self.norm_grid = (h, w)
        self.norm_method = norm_method
        self.power_iters = power_iters

    @property
    def scales(self) -> int:
        return len(self.channels)

    def alpha(self):
        return jax.nn.sigmoid(self.alpha_param) if self.learn_alpha else self.alpha_param

    def norm_matrix(
        self, h: int, w: int, method: Literal["auto", "svd", "power"] | None = None
    ) -> Float[Array, "scales scales"]:
        """`N` on the `h x w` (finest) grid before rescaling: operator norms of the `K_s` on the
        diagonal, spectral norms of the `M_st` off it."""
        method = self.norm_method if method is None else method
        norms = {}
        for s, conv in enumerate(self.convs):
            norms[s, s] = spectrum_norm(conv.spectrum(h >> s, w >> s), method, self.power_iters)
        for m, (s, t) in zip(self.mix, _pairs(self.scales), strict=True):
            norms[s, t] = spectrum_norm(m[:, :, None, None], method, self.power_iters)
        rows = [[norms[s, t] for t in range(self.scales)] for s in range(self.scales)]
        return jnp.stack([jnp.stack(r) for r in rows])

    def scale(self) -> Float[Array, ""]:
        """`c = min(1, gamma / ||N||_2)` on `norm_grid`."""
        norm = jnp.linalg.norm(self.norm_matrix(*self.norm_grid), 2)
        big = norm > self.gamma
        return jnp.where(big, self.gamma / jnp.where(big, norm, 1.0), 1.0)

    def operator(self, h: int, w: int, *, planar: bool = False) -> MultiScaleOperator:
        """The rescaled linear part on the `h x w` (finest) torus, for `step_with` (or, with
        `planar=True`, `planar_step`); build once per solve (computes the norms)."""
        _check_grid(self.scales, h, w)
        c = self.scale()
        convs = []
        for s, conv in enumerate(self.convs):
            conv = eqx.tree_at(lambda k: k.weight, conv, conv.weight * c.astype(conv.weight.dtype))
            build = conv.planar_operator if planar else conv.operator
            convs.append(build(h >> s, w >> s))
        mix = tuple(m * c.astype(m.dtype) for m in self.mix)
        return MultiScaleOperator(tuple(convs), mix, planar)

    def planar_operator(self, h: int, w: int) -> MultiScaleOperator:
        return self.operator(h, w, planar=True)

    def init_state(self, injection: Array | Fields) -> Fields:
        """The zero state for an injection: an unbatched finest field `(c0, h, w)`, a batched
        planar one `(2, h, w, c0, b)`, or one field per scale."""
        u = injection[0] if isinstance(injection, (tuple, list)) else injection
        planar = u.ndim == 5
        h, w = u.shape[1:3] if planar else u.shape[1:]
        _check_grid(self.scales, h, w)
        if planar:
            shapes = [(2, h >> s, w >> s, c, u.shape[-1]) for s, c in enumerate(self.channels)]
        else:
            shapes = [(c, h >> s, w >> s) for s, c in enumerate(self.channels)]
        return tuple(jnp.zeros(shape, u.dtype) for shape in shapes)

    def _update(self, op, zs: Fields, injection, planar: bool) -> Fields:
        if len(zs) != self.scales:
            raise ValueError(f"MultiScaleCell expects {self.scales} fields, got {len(zs)}.")
        injs = tuple(injection) if isinstance(injection, (tuple, list)) else (injection,)
        if len(injs) not in (1, self.scales):
            raise ValueError(
                f"MultiScaleCell takes the finest injection or one per scale ({self.scales}); "
                f"got {len(injs)}."
            )
        a = self.alpha()
        out = []
        for s, (z, y, act) in enumerate(zip(zs, op(zs), self.acts, strict=True)):
            if s < len(injs):
                y = y + injs[s]
            new = (1 - a) * z + a * (act.planar(y) if planar else act(y))
            out.append(new.astype(z.dtype))
        return tuple(out)

    def step_with(self, op: MultiScaleOperator, zs: Fields, injection) -> Fields:
        """One update of unbatched fields with `op = cell.operator(h, w)`."""
        return self._update(op, zs, injection, planar=False)

    def planar_step(self, op: MultiScaleOperator, ps: Fields, injection) -> Fields:
        """One update of batched planar fields (`ff.to_planar` per scale) with
        `op = cell.planar_operator(h, w)`."""
        return self._update(op, ps, injection, planar=True)

    def __call__(self, zs: Fields, injection) -> Fields:
        """One update of unbatched fields `(channels[s], h / 2^s, w / 2^s)`, finest first."""
        if len(zs) != self.scales:
            raise ValueError(f"MultiScaleCell expects {self.scales} fields, got {len(zs)}.")
        for s, (z, c) in enumerate(zip(zs, self.channels, strict=True)):
            if z.ndim != 3 or z.shape[0] != c:
                raise ValueError(
                    f"MultiScaleCell: field {s} must have shape ({c}, h, w) (unbatched; vmap "
                    f"over batches), got {z.shape}."
                )
        _, h, w = zs[0].shape
        for s, z in enumerate(zs):
            if z.shape[1:] != (h >> s, w >> s):
                raise ValueError(
                    f"MultiScaleCell: field {s} must be on the {h >> s}x{w >> s} grid "
                    f"(the finest grid halved {s} times), got {z.shape[1:]}."
                )
        return self.step_with(self.operator(h, w), zs, injection)

    def lipschitz_bound(self, h: int, w: int) -> Array:
        """Upper bound of the cell's Lipschitz constant on the `h x w` (finest) torus, in the
        norm `||z||^2 = sum_s mean(|z_s|^2)`."""
        _check_grid(self.scales, h, w)
        norm = self.scale() * jnp.linalg.norm(self.norm_matrix(h, w, "svd"), 2)
        a = self.alpha()
        return (1 - a) + a * LIPSCHITZ[self.act_name] * norm
