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


def _pick_scales(items: list, scales, what: str) -> list[tuple[int, np.ndarray]]:
    n = len(items)
    scales = range(n) if scales is None else [int(s) for s in scales]
    bad = [s for s in scales if not 0 <= s < n]
    if bad or not scales:
        raise ValueError(f"scales={list(scales)}: the {what} has {n} scale(s), 0..{n - 1}.")
    return [(s, items[s]) for s in scales]


def scale_stacks(trajectory, scales=None) -> list[tuple[int, np.ndarray]]:
    """`[(scale, (T, C, h, w) stack)]` for the chosen `scales` (default all) of a trajectory: a
    multi-scale one is a tuple of stacks, finest first (as `model_trajectory` records it); a
    single field is scale 0."""
    if isinstance(trajectory, tuple):
        stacks = [as_field_stack(t) for t in trajectory]
        if len({len(t) for t in stacks}) > 1:
            raise ValueError(
                f"The scales' trajectories have different lengths {[len(t) for t in stacks]}."
            )
    else:
        stacks = [as_field_stack(trajectory)]
    return _pick_scales(stacks, scales, "trajectory")


def scale_fields(z, scales=None, *, batched: bool = False) -> list[tuple[int, np.ndarray]]:
    """The same for one state (`(C, h, w)`, or `(N, C, h, w)` if `batched`) or a tuple of
    them, finest first."""
    fields = list(z) if isinstance(z, tuple) else [z]
    ndim = 4 if batched else 3
    out = []
    for f in fields:
        f = np.asarray(f)
        if f.ndim != ndim:
            raise ValueError(f"Expected fields with {ndim} axes; got shape {f.shape}.")
        out.append(f)
    return _pick_scales(out, scales, "state")


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
