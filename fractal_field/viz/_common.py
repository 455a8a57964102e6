"""Small helpers shared by the figure functions."""

from __future__ import annotations

import os

import numpy as np
from matplotlib.figure import Figure


def new_figure(width: float, height: float, **kwargs) -> Figure:
    """A figure that is not registered with pyplot (so nothing is shown or leaked).

    Saving goes through Agg; in a notebook, display it by leaving it as the cell's value.
    """
    return Figure(figsize=(width, height), layout="constrained", **kwargs)


def finish(fig: Figure, path: str | os.PathLike | None, dpi: int = 120) -> Figure:
    if path is not None:
        os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
        fig.savefig(path, dpi=dpi)
    return fig


def as_field_stack(trajectory) -> np.ndarray:
    """`(T, H, W)` or `(T, C, H, W)` -> numpy `(T, C, H, W)`."""
    t = np.asarray(trajectory)
    if t.ndim == 3:
        t = t[:, None]
    if t.ndim != 4:
        raise ValueError(
            f"Expected a trajectory of shape (T, channels, h, w) or (T, h, w); got {t.shape}."
        )
    return t


def as_field(z) -> np.ndarray:
    """`(H, W)` or `(C, H, W)` -> numpy `(C, H, W)`."""
    z = np.asarray(z)
    if z.ndim == 2:
        z = z[None]
    if z.ndim != 3:
        raise ValueError(f"Expected a field of shape (channels, h, w) or (h, w); got {z.shape}.")
    return z


def clean_axes(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def show_image(ax, x) -> None:
    """Show a model input `(C, H, W)` (normalised floats) as a grey or RGB picture."""
    x = np.asarray(x, np.float32)
    lo, hi = float(np.min(x)), float(np.max(x))
    x = (x - lo) / max(hi - lo, 1e-8)
    if x.shape[0] == 1:
        ax.imshow(x[0], cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(np.moveaxis(x[:3], 0, -1))
    clean_axes(ax)


def fmt(x: float) -> str:
    return "nan" if not np.isfinite(x) else f"{x:.1e}"
