"""The real-valued twin of a complex field classifier at equal parameters."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax.random as jr

from ._model import PRESETS, count_params, make_model


def _count(preset: str | None, kwargs: dict[str, Any]) -> int:
    shapes = eqx.filter_eval_shape(make_model, preset, key=jr.PRNGKey(0), **kwargs)
    return count_params(shapes)


def equal_params_channels(preset: str | Mapping[str, Any] | None = None, **overrides) -> int:
    """The `channels` of the real-valued twin (`field="real"`) whose real parameter count is
    closest to the complex model's.

    `preset` is a preset name (`"nano"`) or a dict of `ff.make_model` arguments (a config's
    `model` dict, with its `"preset"` key); `overrides` are further arguments. The complex
    reference is that model with `field="complex"`; the twin differs only in `field` and
    `channels`. Counted from shapes (`ff.count_params`), no weights initialised. A complex
    3x3 `C -> C` convolution has `18 C^2` real parameters and a real one `9 C^2`, so the answer
    is near `C sqrt(2)` when the cell's convolution dominates.
    """
    if isinstance(preset, Mapping):
        kwargs = dict(preset)
        preset = kwargs.pop("preset", None)
    else:
        kwargs = {}
    kwargs.update(overrides)
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose from {sorted(PRESETS)}.")
    channels = kwargs.get("channels", PRESETS.get(preset, {}).get("channels", 24))
    if not isinstance(channels, int) or kwargs.get("scales", 1) != 1:
        raise ValueError(
            "equal_params_channels needs a single field (an int `channels`, scales=1): the "
            "real-valued twin has no multi-scale field."
        )
    kwargs["field"] = "complex"
    target = _count(preset, kwargs)
    kwargs["field"] = "real"
    kwargs.pop("batch_solve", None)  # the twin solves per sample; no parameters either way

    def count(c: int) -> int:
        return _count(preset, dict(kwargs, channels=c))

    # The count grows with the channels: bisect for the first count at or above the target.
    lo, hi = 1, 2 * channels + 8
    while count(hi) < target:
        hi *= 2
    while lo < hi:
        mid = (lo + hi) // 2
        if count(mid) < target:
            lo = mid + 1
        else:
            hi = mid
    if lo > 1 and target - count(lo - 1) < count(lo) - target:
        return lo - 1
    return lo
