"""Training curves from a training workdir's `metrics.jsonl` and `eval.jsonl`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ._common import finish, new_figure


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The rows of a JSON-lines file; unreadable lines (e.g. one being written) are skipped."""
    rows = []
    path = Path(path)
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _by_key(rows: list[dict], key: str) -> list[dict]:
    """Keep the last row for each value of `key` (a resumed run re-logs some steps), sorted."""
    last = {}
    for r in rows:
        if key in r:
            last[r[key]] = r
    return [last[k] for k in sorted(last)]


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over at most `window` points (fewer at the start), with the
    window capped at a tenth of the curve so that short runs are not flattened."""
    window = min(window, max(1, len(y) // 10))
    if window <= 1:
        return y
    c = np.concatenate([[0.0], np.cumsum(np.nan_to_num(y))])
    i = np.arange(1, len(y) + 1)
    lo = np.maximum(0, i - window)
    return (c[i] - c[lo]) / (i - lo)


def _column(rows, key):
    return np.array([float(r.get(key, np.nan)) for r in rows])


def plot_training(
    workdir: str | os.PathLike,
    *,
    smooth: int = 25,
    title: str | None = None,
    path: str | os.PathLike | None = None,
) -> Figure:
    """Loss, accuracy and solver steps over training, from a workdir written by `ff.train`.

    Panels: training loss; training accuracy (per step) and test accuracy (per epoch, from
    `eval.jsonl`); forward and backward solver steps per step (and the test mean steps).
    Per-step curves are drawn faintly with a `smooth`-step moving average on top. Steps
    logged twice by a resumed run count once (the last).
    """
    workdir = Path(workdir)
    metrics = _by_key(read_jsonl(workdir / "metrics.jsonl"), "step")
    evals = _by_key(read_jsonl(workdir / "eval.jsonl"), "epoch")
    if not metrics and not evals:
        raise FileNotFoundError(f"No metrics.jsonl or eval.jsonl with rows in {workdir}.")
    fig = new_figure(12.0, 3.3)
    ax_loss, ax_acc, ax_steps = fig.subplots(1, 3)
    step = _column(metrics, "step")

    def curve(ax, key, label, color):
        y = _column(metrics, key)
        if not np.isfinite(y).any():
            return
        ax.plot(step, y, color=color, alpha=0.25, lw=0.7)
        ax.plot(step, _smooth(y, smooth), color=color, lw=1.5, label=label)

    curve(ax_loss, "loss", "train loss", "C0")
    loss = _column(metrics, "loss")
    loss = loss[np.isfinite(loss) & (loss > 0)]
    if len(loss) and loss.max() > 10 * loss.min():
        ax_loss.set_yscale("log")
    ax_loss.set_title("loss", fontsize=9)
    curve(ax_acc, "acc", "train (batch)", "C0")
    if evals:
        ev_step = _column(evals, "step")
        x = ev_step if np.isfinite(ev_step).all() else _column(evals, "epoch")
        ax_acc.plot(x, _column(evals, "accuracy"), "o-", color="C3", label="test")
        if np.isfinite(_column(evals, "mean_steps")).any():
            ax_steps.plot(x, _column(evals, "mean_steps"), "o-", color="C3", label="test fwd")
    ax_acc.set_title("accuracy", fontsize=9)
    curve(ax_steps, "fwd_steps", "forward", "C0")
    curve(ax_steps, "bwd_steps", "backward", "C1")
    ax_steps.set_title("solver steps per sample", fontsize=9)
    for ax in (ax_loss, ax_acc, ax_steps):
        ax.set_xlabel("training step")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return finish(fig, path)
