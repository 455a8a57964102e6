"""Domain colouring of complex fields: phase as hue, magnitude as brightness."""

from __future__ import annotations

import numpy as np
from matplotlib.colors import hsv_to_rgb


def magnitude_scale(z, *, quantile: float = 0.5) -> float:
    """A robust magnitude scale for `z`: the `quantile` of `|z|` over its nonzero entries.

    Returns 1.0 for an all-zero (or non-finite) field, so that the colouring stays defined.
    """
    mag = np.abs(np.asarray(z))
    mag = mag[np.isfinite(mag) & (mag > 0)]
    if mag.size == 0:
        return 1.0
    return float(np.quantile(mag, quantile))


def domain_colouring(z, *, scale: float | None = None, saturation: float = 0.9) -> np.ndarray:
    """Colour a complex array `z` of shape `(..., H, W)` as RGB floats `(..., H, W, 3)` in [0, 1].

    - **Hue** is the phase: `hue = arg(z) / 2pi mod 1`, so `arg z = 0` is red, `pi/2`
      yellow-green, `pi` cyan and `-pi/2` violet (see `colour_wheel_legend`).
    - **Brightness** is the magnitude, squashed as `v = 1 - 1 / (1 + |z| / scale)`: zero is
      black, `|z| = scale` is half brightness and large magnitudes approach full brightness
      (monotone, so a larger `|z|` is always brighter).
    - `scale`: the magnitude shown at half brightness; default the median nonzero `|z|` of
      this array (`magnitude_scale`). Pass a fixed value to compare several fields or
      frames of an animation on one brightness scale.
    - `saturation`: HSV saturation (below 1 keeps very bright pixels readable).

    Non-finite entries are drawn black.
    """
    z = np.asarray(z)
    if scale is None:
        scale = magnitude_scale(z)
    if not scale > 0:
        raise ValueError(f"domain_colouring(scale={scale}) must be positive.")
    finite = np.isfinite(z)
    z = np.where(finite, z, 0)
    hue = np.mod(np.angle(z) / (2 * np.pi), 1.0)
    value = 1.0 - 1.0 / (1.0 + np.abs(z) / scale)
    value = np.where(finite, value, 0.0)
    hsv = np.stack([hue, np.full_like(hue, saturation), value], axis=-1)
    return hsv_to_rgb(hsv)


def colour_wheel_legend(ax, *, resolution: int = 128, scale: float = 1.0, label: bool = True):
    """Draw the domain-colouring key on `ax`: a disc of `z = r exp(i theta)`, `r <= 3 scale`.

    Hue turns with the phase (0 on the right, counter-clockwise) and brightness grows with
    the radius, exactly as in `domain_colouring(z, scale=scale)`. Returns `ax`.
    """
    t = np.linspace(-3.0, 3.0, resolution)
    re, im = np.meshgrid(t, t[::-1])
    z = (re + 1j * im) * scale
    rgba = np.ones(z.shape + (4,))
    rgba[..., :3] = domain_colouring(z, scale=scale)
    rgba[..., 3] = (np.abs(re + 1j * im) <= 3.0).astype(float)
    ax.imshow(rgba, extent=(-3, 3, -3, 3), interpolation="bilinear")
    ax.set_xticks([])
    ax.set_yticks([])
    for side in ax.spines.values():
        side.set_visible(False)
    if label:
        kw = dict(ha="center", va="center", fontsize=7)
        ax.text(3.6, 0, "0", **kw)
        ax.text(0, 3.6, r"$\pi/2$", **kw)
        ax.text(-3.7, 0, r"$\pi$", **kw)
        ax.text(0, -3.6, r"$-\pi/2$", **kw)
        ax.set_xlim(-4.3, 4.3)
        ax.set_ylim(-4.3, 4.3)
        ax.set_title("phase (hue)\n|z| (brightness)", fontsize=7)
    ax.set_aspect("equal")
    return ax
