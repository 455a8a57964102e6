"""Animations of a recorded solve: GIF with Pillow, MP4 with ffmpeg."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ._colour import domain_colouring, magnitude_scale
from ._common import fmt, scale_stacks


def field_frames(
    trajectory,
    channel: int | Sequence[int] = 0,
    *,
    scales: Sequence[int] | None = None,
    scale: float | None = None,
    upscale: int | None = None,
    residuals=None,
    every: int = 1,
    caption: bool = True,
) -> list[np.ndarray]:
    """The domain-coloured frames of `trajectory` as `uint8 (height, width, 3)` arrays.

    Several channels are tiled left to right; for a multi-scale trajectory (a tuple of
    stacks, finest first) so are the chosen `scales` (default all), each drawn at the height
    of the first one. The brightness scale is fixed over all frames (default: `magnitude_scale`
    of the last record, per scale), so growth is visible. Each field pixel of the first scale
    becomes an `upscale x upscale` block (default: about 160 pixels high). A caption strip
    shows the step (and residual, if `residuals` is given).
    """
    stacks = scale_stacks(trajectory, scales)
    chans = [channel] if isinstance(channel, int) else list(channel)
    for s, traj in stacks:
        if max(chans) >= traj.shape[1] or min(chans) < 0:
            raise ValueError(f"channel={channel}: scale {s} has {traj.shape[1]} channels.")
    h0 = stacks[0][1].shape[-2]
    up = upscale or max(1, int(np.ceil(160 / h0)))
    height = h0 * up
    bright = [magnitude_scale(t[-1, chans]) if scale is None else scale for _, t in stacks]
    frames = []
    for i in range(len(stacks[0][1])):
        tiles = []
        for (_, traj), b in zip(stacks, bright, strict=True):
            for c in chans:
                tiles.append(_resize(domain_colouring(traj[i, c], scale=b), height))
                tiles.append(np.ones((height, max(2, up // 2), 3)))
        img = (np.concatenate(tiles[:-1], 1) * 255).round().astype(np.uint8)
        if caption:
            strip = Image.new("RGB", (img.shape[1], 16), "white")
            text = f"step {i * every}"
            if residuals is not None and i * every < len(residuals):
                text += f"  res {fmt(float(np.asarray(residuals)[i * every]))}"
            ImageDraw.Draw(strip).text((3, 2), text, fill="black")
            img = np.concatenate([img, np.asarray(strip)], 0)
        frames.append(img)
    return frames


def _resize(rgb: np.ndarray, height: int) -> np.ndarray:
    """Nearest-neighbour resize of an `(h, w, 3)` image to `height` rows (aspect kept)."""
    h, w = rgb.shape[:2]
    width = max(1, int(round(w * height / h)))
    return rgb[(np.arange(height) * h) // height][:, (np.arange(width) * w) // width]


def animate_field(
    trajectory,
    path: str | os.PathLike,
    channel: int | Sequence[int] = 0,
    fps: float = 8,
    *,
    scales: Sequence[int] | None = None,
    scale: float | None = None,
    upscale: int | None = None,
    residuals=None,
    every: int = 1,
    hold: float = 1.0,
) -> Path:
    """Write the field's evolution to `path` as an animation; returns the path.

    - `.gif`: with Pillow (no other dependency); loops forever, holding the last frame for
      `hold` extra seconds.
    - `.mp4`: with matplotlib's `FFMpegWriter`; needs `ffmpeg` on `PATH` (a clear error
      otherwise).

    Frames are `field_frames(trajectory, channel, scales=..., scale=..., upscale=...,
    residuals=..., every=...)`: the domain colouring of the chosen channel(s) (and scales,
    for a multi-scale field) at each record.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".gif", ".mp4"):
        raise ValueError(f"animate_field writes .gif or .mp4 files, not {path.name!r}.")
    if suffix == ".mp4" and shutil.which("ffmpeg") is None:
        raise RuntimeError(
            "Writing an .mp4 needs the `ffmpeg` program on PATH, which was not found. Install "
            "ffmpeg (e.g. `apt install ffmpeg` or `conda install ffmpeg`) or write a .gif."
        )
    if fps <= 0:
        raise ValueError(f"animate_field(fps={fps}) must be positive.")
    frames = field_frames(
        trajectory,
        channel,
        scales=scales,
        scale=scale,
        upscale=upscale,
        residuals=residuals,
        every=every,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".gif":
        images = [Image.fromarray(f) for f in frames]
        ms = max(20, int(round(1000 / fps)))
        durations = [ms] * (len(images) - 1) + [ms + int(1000 * hold)]
        images[0].save(path, save_all=True, append_images=images[1:], duration=durations, loop=0)
        return path
    return _write_mp4(frames, path, fps)


def _write_mp4(frames: list[np.ndarray], path: Path, fps: float) -> Path:
    from matplotlib.animation import FFMpegWriter

    from ._common import new_figure

    h, w = frames[0].shape[:2]
    fig = new_figure(w / 100, h / 100, dpi=100)
    fig.set_layout_engine(None)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    im = ax.imshow(frames[0])
    # Even frame sizes for the common H.264 encoders.
    writer = FFMpegWriter(fps=fps, extra_args=["-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2"])
    with writer.saving(fig, os.fspath(path), dpi=100):
        for f in frames:
            im.set_data(f)
            writer.grab_frame()
    return path
