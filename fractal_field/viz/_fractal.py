"""Figures of fractality: box-counting fits, scale-invariance curves, the segment graph and
phase-flow diagrams."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from ._common import finish, new_figure
from ._training import read_jsonl


def _named(x, default: str) -> dict:
    return dict(x) if isinstance(x, Mapping) else {default: x}


def plot_box_counting(
    results, *, title: str | None = None, path: str | os.PathLike | None = None
) -> Figure:
    """`log N(r)` against `log(1/r)` with each fitted line, for one `fractal.BoxCounting` or a
    `{label: BoxCounting}` mapping."""
    results = _named(results, "")
    fig = new_figure(4.6, 3.6)
    ax = fig.subplots()
    for i, (name, res) in enumerate(results.items()):
        xs = -np.log(np.asarray(res.scales, float))
        ys = np.log(np.asarray(res.counts, float))
        label = f"{name}: D = {res.dimension:.3f}" if name else f"D = {res.dimension:.3f}"
        ax.plot(xs, ys, "o", color=f"C{i}", label=label)
        ax.plot(xs, res.dimension * xs + res.intercept, "-", color=f"C{i}", lw=1)
    ax.set_xlabel("log(1/r)")
    ax.set_ylabel("log N(r)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    return finish(fig, path)


def plot_scale_invariance(
    reports, *, title: str | None = None, path: str | os.PathLike | None = None
) -> Figure:
    """Mean tile dimension `D(r_k)` against the segment size `r_k`, one line per
    `fractal.ScaleInvariance` (`{label: report}`), with each report's tolerance band around
    its mean `D`."""
    reports = _named(reports, "")
    fig = new_figure(5.0, 3.6)
    ax = fig.subplots()
    for i, (name, rep) in enumerate(reports.items()):
        d = np.asarray(rep.dimensions, float)
        verdict = "DSI holds" if rep.holds else "DSI fails"
        ax.plot(rep.scales, d, "o-", color=f"C{i}", label=f"{name} ({verdict})".strip())
        if np.isfinite(d).all():
            mid = 0.5 * (d.max() + d.min())
            ax.axhspan(mid - rep.tol / 2, mid + rep.tol / 2, color=f"C{i}", alpha=0.08)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("segment size r_k")
    ax.set_ylabel("mean box-counting D of the segments")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    return finish(fig, path)


def plot_segment_graph(
    features: Sequence[np.ndarray],
    edges: Sequence[np.ndarray],
    *,
    layer_names: Sequence[str] | None = None,
    max_edges: int = 400,
    title: str | None = None,
    path: str | os.PathLike | None = None,
) -> Figure:
    """The segment graph from `fractal.segment_graph`: one column of nodes per layer (its tiles,
    coloured by their dimension), and the `max_edges` strongest edges between consecutive
    layers drawn with opacity proportional to their weight."""
    if len(edges) != len(features) - 1:
        raise ValueError(f"{len(features)} layers need {len(features) - 1} edge matrices.")
    fig = new_figure(2.2 + 1.8 * len(features), 4.2)
    ax = fig.subplots()
    pos = [np.linspace(1, 0, len(f)) if len(f) > 1 else np.array([0.5]) for f in features]
    top = max((float(e.max()) for e in edges if e.size), default=1.0) or 1.0
    for k, e in enumerate(edges):
        flat = np.argsort(e, axis=None)[::-1][:max_edges]
        for i, j in zip(*np.unravel_index(flat, e.shape), strict=True):
            alpha = float(np.clip(e[i, j] / top, 0, 1)) * 0.6
            ax.plot([k, k + 1], [pos[k][i], pos[k + 1][j]], color="0.3", lw=0.5, alpha=alpha)
    dims = np.concatenate([f[:, 0] for f in features])
    norm = Normalize(float(dims.min()), float(max(dims.max(), dims.min() + 1e-6)))
    sc = None
    for k, f in enumerate(features):
        sc = ax.scatter(np.full(len(f), k), pos[k], c=f[:, 0], cmap="viridis", norm=norm, s=18)
    fig.colorbar(sc, ax=ax, label="segment D")
    names = list(layer_names) if layer_names else [f"layer {k}" for k in range(len(features))]
    ax.set_xticks(range(len(features)), names, fontsize=7, rotation=15)
    ax.set_yticks([])
    ax.set_xlim(-0.3, len(features) - 0.7)
    if title:
        ax.set_title(title, fontsize=9)
    return finish(fig, path)


def read_phase_flow(source) -> list[dict]:
    """Phase-flow records: a list of them, a `fractal.jsonl` file or a training workdir."""
    if isinstance(source, list | tuple):
        return list(source)
    p = Path(source)
    rows = read_jsonl(p / "fractal.jsonl" if p.is_dir() else p)
    if not rows:
        raise FileNotFoundError(f"No phase-flow records in {p}.")
    last = {r["step"]: r for r in rows if "step" in r}  # a resumed run re-logs some steps
    return [last[s] for s in sorted(last)]


def plot_phase_flow(
    source,
    *,
    layers: Sequence[str] | None = None,
    segments: bool = False,
    title: str | None = None,
    path: str | os.PathLike | None = None,
) -> Figure:
    """Phase-flow diagrams: each layer's gradient norm against the loss over training, points
    coloured by epoch, arrows from each record to the next.

    `source`: records from `fractal.log_phase_flow` (a list, a `fractal.jsonl` or a workdir);
    `layers`: parameter paths to show (default: every parameter with more than one
    segment, else all); `segments=True` also draws each segment's own path faintly.
    """
    recs = read_phase_flow(source)
    held = recs[0]["layers"]
    names = list(layers) if layers else [n for n, v in held.items() if len(v["norms"]) > 1]
    names = names or list(held)
    missing = [n for n in names if n not in recs[0]["layers"]]
    if missing:
        raise ValueError(f"Unknown layers {missing}; the records hold {list(recs[0]['layers'])}.")
    loss = np.array([r["loss"] for r in recs])
    epoch = np.array([r.get("epoch", 0) for r in recs], float)
    norm = Normalize(epoch.min(), max(epoch.max(), epoch.min() + 1))
    fig = new_figure(3.4 * len(names) + 0.8, 3.3)
    axes = np.atleast_1d(fig.subplots(1, len(names)))
    sc = None
    for ax, name in zip(axes, names, strict=True):
        g = np.array([r["layers"][name]["norm"] for r in recs])
        if segments:
            seg = np.array([r["layers"][name]["norms"] for r in recs])
            ax.plot(loss, seg, color="0.6", lw=0.4, alpha=0.4)
        for i in range(len(recs) - 1):
            ax.annotate(
                "",
                xy=(loss[i + 1], g[i + 1]),
                xytext=(loss[i], g[i]),
                arrowprops=dict(arrowstyle="->", color="0.35", lw=0.7),
            )
        sc = ax.scatter(loss, g, c=epoch, cmap="plasma", norm=norm, s=14, zorder=3)
        ax.set_xlabel("loss")
        ax.set_ylabel("||dL/dW||")
        ax.set_title(name, fontsize=8)
        ax.grid(True, alpha=0.3)
    fig.colorbar(sc, ax=list(axes), label="epoch")
    if title:
        fig.suptitle(title, fontsize=9)
    return finish(fig, path)
