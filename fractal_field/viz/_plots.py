"""Figures of fields, their evolution to the fixed point, and solver convergence."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from .._solution import RESULTS, Solution
from ._colour import colour_wheel_legend, domain_colouring, magnitude_scale
from ._common import (
    as_field,
    clean_axes,
    finish,
    fmt,
    new_figure,
    scale_fields,
    scale_stacks,
    show_image,
)
from ._solve import compare_solvers, residual_curve, work_per_step


def default_columns(num_records: int, num_columns: int = 6) -> list[int]:
    """Record indices to show: roughly geometric from record 1 to the last one."""
    if num_records <= num_columns:
        return list(range(num_records))
    idx = np.geomspace(1, num_records - 1, num_columns).round().astype(int)
    idx = sorted(set(idx.tolist()))
    # Fill gaps left by rounding with the largest missing indices.
    for i in range(num_records - 1, 0, -1):
        if len(idx) >= num_columns:
            break
        if i not in idx:
            idx = sorted(idx + [i])
    return idx


def plot_evolution(
    trajectory,
    channels: Sequence[int] | None = None,
    steps: Sequence[int] | None = None,
    *,
    scales: Sequence[int] | None = None,
    residuals=None,
    every: int = 1,
    num_columns: int = 6,
    title: str | None = None,
    path: str | os.PathLike | None = None,
) -> Figure:
    """The field crystallising: a grid of selected iterations of a recorded solve.

    - `trajectory`: `(T, channels, h, w)` complex iterates (from `record_trajectory` /
      `model_trajectory`), or for a multi-scale field a tuple of them, finest first; record
      `i` is solver step `i * every`.
    - `channels`: which channels to show (default `(0, 1, 2)`, or `(0,)` per scale for a
      multi-scale field); each gets a **magnitude row** (`|z|`, one colour scale per channel)
      and a **phase row** (`domain_colouring`, one brightness scale per channel, set by the
      last record; key in the right-hand column).
    - `scales`: for a multi-scale field, which scales to show (default all), each with the
      rows of its `channels`.
    - `steps`: solver steps to show as columns (each rounded to the nearest record); default
      about `num_columns` geometrically spaced steps ending at the last record.
    - `residuals`: the residual trace; if given, each column title shows its residual.
    """
    stacks = scale_stacks(trajectory, scales)
    multi = isinstance(trajectory, tuple)
    if channels is None:
        channels = (0,) if multi else (0, 1, 2)
    rows = []  # (label, (T, h, w) stack of one channel)
    for s, traj in stacks:
        for c in [c for c in channels if c < traj.shape[1]] or [0]:
            rows.append((f"s{s} ch {c}" if multi else f"ch {c}", traj[:, c]))
    num_records = len(stacks[0][1])
    if steps is None:
        cols = default_columns(num_records, num_columns)
    else:
        cols = sorted({min(int(round(s / every)), num_records - 1) for s in steps})
    res = None if residuals is None else np.asarray(residuals)
    ncol, nrow = len(cols), 2 * len(rows)
    fig = new_figure(1.55 * ncol + 1.0, 1.5 * nrow + (0.5 if title else 0.2))
    grid = fig.add_gridspec(nrow, ncol + 1, width_ratios=[1] * ncol + [0.6])
    for k, (label, traj) in enumerate(rows):
        shown = traj[cols]
        vmax = float(np.nanmax(np.abs(shown))) or 1.0
        scale = magnitude_scale(traj[-1])
        for j, i in enumerate(cols):
            z = traj[i]
            ax_m = fig.add_subplot(grid[2 * k, j])
            im = ax_m.imshow(np.abs(z), cmap="magma", vmin=0, vmax=vmax)
            ax_p = fig.add_subplot(grid[2 * k + 1, j])
            ax_p.imshow(domain_colouring(z, scale=scale))
            for ax in (ax_m, ax_p):
                clean_axes(ax)
            if k == 0:
                step = i * every
                head = f"step {step}"
                if res is not None and step < len(res):
                    head += f"\nres {fmt(res[step])}"
                ax_m.set_title(head, fontsize=8)
            if j == 0:
                ax_m.set_ylabel(f"{label}: |z|", fontsize=8)
                ax_p.set_ylabel(f"{label}: phase", fontsize=8)
        cax_host = fig.add_subplot(grid[2 * k, ncol])
        cax_host.set_axis_off()
        cax = cax_host.inset_axes([0.05, 0.05, 0.18, 0.9])
        cbar = fig.colorbar(im, cax=cax)
        cbar.ax.tick_params(labelsize=6)
        wheel = fig.add_subplot(grid[2 * k + 1, ncol])
        colour_wheel_legend(wheel, scale=scale, label=k == 0)
    if title:
        fig.suptitle(title, fontsize=10)
    return finish(fig, path)


def _trace_and_work(value) -> tuple[np.ndarray, np.ndarray, float]:
    steps, r = residual_curve(value)
    wps = work_per_step(value) if isinstance(value, Solution) else 1.0
    return steps, r, wps


def _relative_norm(name, value, r, relative) -> float:
    if isinstance(relative, Mapping):
        norm = relative.get(name, r[0])
    elif relative == "fnorm" or (relative == "auto" and isinstance(value, Solution)):
        if not isinstance(value, Solution):
            raise ValueError("plot_residuals(relative='fnorm') needs Solution values.")
        # ||f(z*)|| of the returned value: residual / relative_residual.
        rel = float(value.stats.relative_residual)
        norm = float(value.stats.residual) / rel if rel > 0 else r[0]
    else:
        norm = r[0]
    return norm if norm and np.isfinite(norm) else 1.0


def plot_residuals(
    residual_traces: Mapping[str, Any],
    *,
    relative: str | Mapping[str, float] | None = "auto",
    x: str = "step",
    rtol: float | None = None,
    title: str | None = None,
    path: str | os.PathLike | None = None,
) -> Figure:
    """Residual per iteration (log scale) of one or several solves.

    - `residual_traces`: `{name: trace}`, each a residual trace array (NaNs past the end are
      dropped) or an `ff.Solution` solved with `residual_trace=True`.
    - `relative`: the second panel's normaliser. `"fnorm"`: `||f(z*)||` at the returned
      value, as in the solver's test `||f(z) - z|| <= atol + rtol ||f(z)||` (needs
      `Solution` values); `"initial"`: the initial residual; a mapping `{name: norm}`;
      `"auto"` (default): `"fnorm"` for `Solution` values, `"initial"` for arrays; `None`:
      absolute panel only.
    - `x`: `"step"` (solver steps; a Multigrid step is a V-cycle) or `"work"` (fine-grid
      map evaluations, needs `Solution` values; the fair axis across solvers).
    - `rtol`: draw this tolerance on the relative panel.
    """
    if x not in ("step", "work"):
        raise ValueError(f"plot_residuals(x={x!r}) must be 'step' or 'work'.")
    if not (relative is None or isinstance(relative, Mapping)) and relative not in (
        "auto",
        "fnorm",
        "initial",
    ):
        raise ValueError(f"plot_residuals(relative={relative!r}): see the docstring.")
    panels = 1 if relative is None else 2
    fig = new_figure(4.2 * panels, 3.2)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    for name, value in residual_traces.items():
        steps, r, wps = _trace_and_work(value)
        xs = steps if x == "step" else 1.0 + steps * wps
        line = axes[0].semilogy(xs, r, ".-", ms=3, label=name)[0]
        if panels == 2:
            norm = _relative_norm(name, value, r, relative)
            axes[1].semilogy(xs, r / norm, ".-", ms=3, color=line.get_color(), label=name)
    xlabel = "solver step" if x == "step" else "fine-grid map evaluations"
    axes[0].set_title("absolute residual $\\|f(z) - z\\|$", fontsize=9)
    if panels == 2:
        if isinstance(relative, Mapping):
            label = "given norm"
        elif relative == "initial" or not any(
            isinstance(v, Solution) for v in residual_traces.values()
        ):
            label = "initial residual"
        else:
            label = "$\\|f(z^*)\\|$"
        axes[1].set_title(f"relative residual (/ {label})", fontsize=9)
        if rtol is not None:
            axes[1].axhline(rtol, color="gray", ls="--", lw=0.8, label=f"rtol {rtol:g}")
    for ax in axes:
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return finish(fig, path)


def plot_solver_comparison(
    model_or_fn,
    x,
    solvers: Mapping[str, Any] | None = None,
    *,
    solutions: Mapping[str, Solution] | None = None,
    channel: int = 0,
    args=None,
    max_steps: int = 100,
    rtol: float = 1e-5,
    atol: float = 1e-7,
    title: str | None = None,
    path: str | os.PathLike | None = None,
) -> Figure:
    """The same input solved by each solver, side by side.

    Top rows: the final field's channel `channel` (domain colouring and `|z|`, shared
    scales), titled with steps, fine-grid work and relative residual. Bottom: the relative
    residual `||f(z) - z|| / ||f(z*)||` of each solve against fine-grid work.

    `model_or_fn`, `x`, `solvers`, `args`, `max_steps`, `rtol`, `atol`: as in
    `compare_solvers` (default solvers: Naive, Anderson, Multigrid). Pass `solutions`
    (`{name: Solution}` from `compare_solvers`) to plot solves you already have.
    """
    if solutions is None:
        solutions = compare_solvers(
            model_or_fn, x, solvers, args=args, max_steps=max_steps, rtol=rtol, atol=atol
        )
    names = list(solutions)
    fields = {
        n: as_field(np.asarray(jax.tree_util.tree_leaves(s.value)[0])) for n, s in solutions.items()
    }
    ref = fields[names[0]][channel]
    scale = magnitude_scale(ref)
    vmax = max(float(np.abs(f[channel]).max()) for f in fields.values()) or 1.0
    ncol = len(names)
    fig = new_figure(2.3 * ncol + 1.0, 7.4)
    grid = fig.add_gridspec(3, ncol + 1, height_ratios=[1, 1, 1.3], width_ratios=[1] * ncol + [0.5])
    for j, name in enumerate(names):
        sol, z = solutions[name], fields[name][channel]
        ok = "" if sol.result == RESULTS.successful else " (not converged)"
        ax = fig.add_subplot(grid[0, j])
        ax.imshow(domain_colouring(z, scale=scale))
        clean_axes(ax)
        ax.set_title(
            f"{name}{ok}\n{int(sol.stats.num_steps)} steps, "
            f"{float(sol.stats.num_fn_evals):.0f} fine evals\n"
            f"rel. res {fmt(float(sol.stats.relative_residual))}",
            fontsize=8,
        )
        ax2 = fig.add_subplot(grid[1, j])
        im = ax2.imshow(np.abs(z), cmap="magma", vmin=0, vmax=vmax)
        clean_axes(ax2)
        if j == 0:
            ax.set_ylabel(f"ch {channel}: phase", fontsize=8)
            ax2.set_ylabel(f"ch {channel}: |z|", fontsize=8)
    colour_wheel_legend(fig.add_subplot(grid[0, ncol]), scale=scale)
    host = fig.add_subplot(grid[1, ncol])
    host.set_axis_off()
    fig.colorbar(im, cax=host.inset_axes([0.05, 0.05, 0.2, 0.9])).ax.tick_params(labelsize=6)
    ax = fig.add_subplot(grid[2, :])
    for name in names:
        # Relative to ||f(z*)|| of the returned value, as in the titles (equal at the last step).
        steps, r, wps = _trace_and_work(solutions[name])
        r = r / _relative_norm(name, solutions[name], r, "fnorm")
        ax.semilogy(1.0 + steps * wps, r, ".-", ms=3, label=f"{name} ({wps:.2g} evals/step)")
    ax.set_xlabel("fine-grid map evaluations")
    ax.set_ylabel("relative residual\n$\\|f(z) - z\\| / \\|f(z^*)\\|$", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return finish(fig, path)


def first_of_each_class(labels, num_classes: int | None = None) -> list[int]:
    """Index of the first example of each class present in `labels`, in class order."""
    labels = np.asarray(labels)
    classes = range(num_classes) if num_classes is not None else np.unique(labels)
    return [int(np.flatnonzero(labels == c)[0]) for c in classes if np.any(labels == c)]


@eqx.filter_jit
def _solve_batch(model, x, kwargs):
    return jax.vmap(lambda xi: model(xi, **kwargs))(x)


def plot_fixed_point_gallery(
    model,
    images,
    labels=None,
    *,
    channel: int | None = None,
    scales: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    solver=None,
    max_steps: int | None = None,
    title: str | None = None,
    path: str | os.PathLike | None = None,
) -> Figure:
    """The fixed points of several inputs (e.g. one per class) as a gallery.

    - `images`: normalised model inputs `(N, c, H, W)` (as from `dataset.normalize`).
    - `labels`: optional true labels; each column is titled with the label and the model's
      prediction.
    - `channel`: the channel shown; default: the mean `|z|` over channels in the magnitude
      row, and the channel of largest mean `|z|` in the phase row.
    - `scales`: for a multi-scale model, which scales to show (default all), finest first.

    Rows: the input, then per scale the magnitude (one colour scale for all) and the domain
    colouring (one brightness scale for all).
    """
    x = jnp.asarray(images, jnp.float32)
    if x.ndim != 4:
        raise ValueError(f"images must be (N, c, H, W), got shape {x.shape}.")
    kwargs: dict[str, Any] = dict(throw=False)
    if solver is not None:
        kwargs["solver"] = solver
    if max_steps is not None:
        kwargs["max_steps"] = max_steps
    logits, sol = _solve_batch(model, x, kwargs)
    fields = scale_fields(sol.value, scales, batched=True)
    multi = isinstance(sol.value, tuple)
    pred = np.asarray(jnp.argmax(logits, -1))
    n = len(x)
    nrow = 1 + 2 * len(fields)
    fig = new_figure(1.45 * n + 1.0, 1.63 * nrow + (0.3 if title else 0.0))
    grid = fig.add_gridspec(nrow, n + 1, width_ratios=[1] * n + [0.7])
    fig.add_subplot(grid[0, n]).set_axis_off()
    name = lambda k: class_names[k] if class_names is not None else str(k)
    for j in range(n):
        ax0 = fig.add_subplot(grid[0, j])
        show_image(ax0, x[j])
        head = f"pred {name(int(pred[j]))}"
        if labels is not None:
            head = f"label {name(int(np.asarray(labels)[j]))}\n" + head
        ax0.set_title(head, fontsize=8)
        if j == 0:
            ax0.set_ylabel("input", fontsize=8)
    for k, (s, z) in enumerate(fields):
        mags = np.abs(z)
        if channel is None:
            mag = mags.mean(1)
            phase_ch = int(mags.mean((0, 2, 3)).argmax())
            mag_label = "mean |z|"
        else:
            if not 0 <= channel < z.shape[1]:
                raise ValueError(f"channel={channel}: scale {s} has {z.shape[1]} channels.")
            mag, phase_ch, mag_label = mags[:, channel], channel, f"ch {channel}: |z|"
        prefix = f"s{s} " if multi else ""
        scale = magnitude_scale(z[:, phase_ch])
        vmax = float(mag.max()) or 1.0
        r = 1 + 2 * k
        for j in range(n):
            ax1 = fig.add_subplot(grid[r, j])
            im = ax1.imshow(mag[j], cmap="magma", vmin=0, vmax=vmax)
            ax2 = fig.add_subplot(grid[r + 1, j])
            ax2.imshow(domain_colouring(z[j, phase_ch], scale=scale))
            for ax in (ax1, ax2):
                clean_axes(ax)
            if j == 0:
                ax1.set_ylabel(prefix + mag_label, fontsize=8)
                ax2.set_ylabel(f"{prefix}ch {phase_ch}: phase", fontsize=8)
        host = fig.add_subplot(grid[r, n])
        host.set_axis_off()
        fig.colorbar(im, cax=host.inset_axes([0.05, 0.05, 0.18, 0.9])).ax.tick_params(labelsize=6)
        colour_wheel_legend(fig.add_subplot(grid[r + 1, n]), scale=scale, label=k == 0)
    if title:
        fig.suptitle(title, fontsize=10)
    return finish(fig, path)
