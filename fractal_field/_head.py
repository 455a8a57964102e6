"""HRNet's classification head (as MDEQ uses it), on the torus: `PyramidHead`."""

from __future__ import annotations

import math
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

EXPANSION = 4  # a bottleneck's output is `EXPANSION` times its inner width (HRNet's)


def _conv(cin: int, cout: int, size: int, *, stride: int = 1, bias: bool, key) -> eqx.nn.Conv2d:
    """A real convolution on the torus: circular padding keeps `h, w` (or halves them)."""
    return eqx.nn.Conv2d(
        cin,
        cout,
        size,
        stride=stride,
        padding=size // 2,
        padding_mode="CIRCULAR",
        use_bias=bias,
        dtype=jnp.float32,
        key=key,
    )


def _norm(channels: int, groups: int) -> eqx.nn.GroupNorm:
    return eqx.nn.GroupNorm(math.gcd(groups, channels), channels, dtype=jnp.float32)


class Bottleneck(eqx.Module):
    """HRNet's bottleneck block on the torus: a 1x1 convolution to `planes` maps, a 3x3 one,
    a 1x1 one to `4 planes`, each group-normalised with a ReLU between, added to the input
    (projected by a group-normalised 1x1 convolution when the widths differ), then a ReLU."""

    conv1: eqx.nn.Conv2d
    norm1: eqx.nn.GroupNorm
    conv2: eqx.nn.Conv2d
    norm2: eqx.nn.GroupNorm
    conv3: eqx.nn.Conv2d
    norm3: eqx.nn.GroupNorm
    skip: tuple[eqx.nn.Conv2d, eqx.nn.GroupNorm] | None

    def __init__(self, in_channels: int, planes: int, *, norm_groups: int, key: PRNGKeyArray):
        k1, k2, k3, k4 = jr.split(key, 4)
        out = EXPANSION * planes
        self.conv1 = _conv(in_channels, planes, 1, bias=False, key=k1)
        self.norm1 = _norm(planes, norm_groups)
        self.conv2 = _conv(planes, planes, 3, bias=False, key=k2)
        self.norm2 = _norm(planes, norm_groups)
        self.conv3 = _conv(planes, out, 1, bias=False, key=k3)
        self.norm3 = _norm(out, norm_groups)
        self.skip = (
            None
            if in_channels == out
            else (_conv(in_channels, out, 1, bias=False, key=k4), _norm(out, norm_groups))
        )

    def __call__(self, x: Float[Array, "c h w"]) -> Float[Array, "c4 h w"]:
        y = jax.nn.relu(self.norm1(self.conv1(x)))
        y = jax.nn.relu(self.norm2(self.conv2(y)))
        y = self.norm3(self.conv3(y))
        residual = x if self.skip is None else self.skip[1](self.skip[0](x))
        return jax.nn.relu(y + residual)


class PyramidHead(eqx.Module):
    """HRNet's classification head (Wang et al. 2020; MDEQ's, Bai et al. 2020) on real feature
    maps on the torus, one per scale, finest first, each half the grid of the one before.

    A `Bottleneck` widens scale `s` to `4 head_channels[s]` maps; going coarser, the running
    map is halved by a strided 3x3 convolution (group norm, ReLU) and added to the next
    scale's; a 1x1 convolution to `final_channels` maps (group norm, ReLU) ends it. Returns
    that map on the coarsest grid; the caller pools it.

    Group norm (`norm_groups` groups, or the largest divisor of a layer's width below it)
    stands in for HRNet's batch norm, so the head acts on one example with no running
    statistics, like every other layer here.
    """

    blocks: tuple[Bottleneck, ...]
    downs: tuple[tuple[eqx.nn.Conv2d, eqx.nn.GroupNorm], ...]
    final: tuple[eqx.nn.Conv2d, eqx.nn.GroupNorm]
    in_channels: tuple[int, ...] = eqx.field(static=True)

    def __init__(
        self,
        in_channels: Sequence[int],
        head_channels: Sequence[int],
        final_channels: int,
        *,
        norm_groups: int = 4,
        key: PRNGKeyArray,
    ):
        ins, heads = tuple(int(c) for c in in_channels), tuple(int(c) for c in head_channels)
        if len(heads) != len(ins):
            raise ValueError(
                f"PyramidHead(head_channels={heads}) needs one width per scale ({len(ins)})."
            )
        if min(heads + ins) < 1 or final_channels < 1 or norm_groups < 1:
            raise ValueError(
                f"PyramidHead(in_channels={ins}, head_channels={heads}, final_channels="
                f"{final_channels}, norm_groups={norm_groups}): every size must be >= 1."
            )
        bkeys = jr.split(jr.fold_in(key, 0), len(ins))
        dkeys = jr.split(jr.fold_in(key, 1), len(ins))
        self.blocks = tuple(
            Bottleneck(c, h, norm_groups=norm_groups, key=k)
            for c, h, k in zip(ins, heads, bkeys, strict=True)
        )
        widths = [EXPANSION * h for h in heads]
        self.downs = tuple(
            (_conv(a, b, 3, stride=2, bias=True, key=k), _norm(b, norm_groups))
            for a, b, k in zip(widths[:-1], widths[1:], dkeys, strict=False)
        )
        self.final = (
            _conv(widths[-1], final_channels, 1, bias=True, key=jr.fold_in(key, 2)),
            _norm(final_channels, norm_groups),
        )
        self.in_channels = ins

    @property
    def out_channels(self) -> int:
        return self.final[0].out_channels

    def __call__(self, xs: Sequence[Float[Array, "c h w"]]) -> Float[Array, "f h2 w2"]:
        if len(xs) != len(self.blocks):
            raise ValueError(f"PyramidHead expects {len(self.blocks)} maps, got {len(xs)}.")
        for s, (x, c) in enumerate(zip(xs, self.in_channels, strict=True)):
            if x.ndim != 3 or x.shape[0] != c:
                raise ValueError(
                    f"PyramidHead: scale {s} must be a ({c}, h, w) map, got shape {x.shape}."
                )
        y = self.blocks[0](xs[0])
        for s, ((conv, norm), block) in enumerate(
            zip(self.downs, self.blocks[1:], strict=True), start=1
        ):
            y = jax.nn.relu(norm(conv(y)))
            nxt = block(xs[s])
            if y.shape[1:] != nxt.shape[1:]:
                raise ValueError(
                    f"PyramidHead: scale {s}'s grid {nxt.shape[1:]} is not half of scale "
                    f"{s - 1}'s {xs[s - 1].shape[1:]} (halved: {y.shape[1:]})."
                )
            y = y + nxt
        conv, norm = self.final
        return jax.nn.relu(norm(conv(y)))
