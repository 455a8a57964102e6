"""Figures of Kronecker layer graphs: the adjacency and the data flow of each path."""

from __future__ import annotations

import os

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch, PathPatch
from matplotlib.path import Path

from .._kron_graph import check_adjacency
from ._common import finish, new_figure


def _graph(graph, order, names):
    """`(adjacency, weights or None, path words per node)` of a `KroneckerNet` or a matrix."""
    if hasattr(graph, "path_names"):
        adj = graph.adjacency(order)
        weights = None if graph.weights is None else np.asarray(graph.edge_matrix(order))
        return adj, weights, graph.path_names(order)
    adj = check_adjacency(graph)
    if names is None:
        names = [str(i) for i in range(len(adj))]
    if len(names) != len(adj):
        raise ValueError(f"{len(names)} node names for a {len(adj)}-node adjacency.")
    return adj, None, [tuple(n) if not isinstance(n, tuple) else n for n in names]


def plot_kron_graph(
    graph,
    order: int | None = None,
    *,
    names=None,
    title: str | None = None,
    path: str | os.PathLike | None = None,
) -> Figure:
    """The adjacency of a Kronecker layer graph and the data flow of each of its paths.

    `graph` is a `ff.KroneckerNet` (drawn at `order`, default its own; edges coloured by
    their weights if it has learnt ones) or a lower-triangular adjacency with node `names`
    (words; letter `p` of a word is the layer path `p` runs). Left: the matrix, node words on
    the diagonal. Right: one row per path, its layers in node order, each edge an arc from the
    node it leaves to the node it enters.
    """
    adj, weights, words = _graph(graph, order, names)
    v = len(adj)
    k = len(words[0])
    labels = ["".join(w) for w in words]
    width = max(4.0, 0.42 * v + 1.5)
    fig = new_figure(4.2 + width, max(3.4, 1.3 * k + 1.4))
    ax_m, ax_f = fig.subplots(1, 2, width_ratios=[4.2, width])
    shown = (
        np.where(adj == 1, 1.0, np.nan) if weights is None else np.where(adj == 1, weights, np.nan)
    )
    np.fill_diagonal(shown, np.nan)
    im = ax_m.imshow(
        shown,
        cmap="viridis" if weights is not None else "Greys",
        vmin=0 if weights is None else None,
    )
    ax_m.set_xticks(range(v), labels, rotation=90, fontsize=max(4, 9 - v // 10))
    ax_m.set_yticks(range(v), labels, fontsize=max(4, 9 - v // 10))
    for i in range(v):
        ax_m.add_patch(
            FancyBboxPatch(
                (i - 0.4, i - 0.4), 0.8, 0.8, boxstyle="round,pad=0", fc="tab:orange", ec="none"
            )
        )
    ax_m.set_title("adjacency (row reads the marked columns)", fontsize=9)
    if weights is not None:
        fig.colorbar(im, ax=ax_m, shrink=0.7, label="edge weight")

    colours = ["tab:blue", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    edges = [(j, i) for i in range(v) for j in range(i) if adj[i, j]]
    span = max((i - j for j, i in edges), default=1)
    for p in range(k):
        y0 = -3.4 * p
        for j, i in edges:
            h = 0.35 + 1.2 * (i - j) / span
            curve = Path(
                [(j, y0 + 0.3), ((i + j) / 2, y0 + 0.3 + 2 * h), (i, y0 + 0.3)],
                [Path.MOVETO, Path.CURVE3, Path.CURVE3],
            )
            lw = (
                0.8
                if weights is None
                else 0.3 + 2.5 * abs(weights[i, j]) / (np.nanmax(np.abs(weights)) + 1e-12)
            )
            ax_f.add_patch(
                PathPatch(curve, fc="none", ec=colours[p % len(colours)], lw=lw, alpha=0.55)
            )
        for n, w in enumerate(words):
            ax_f.add_patch(
                FancyBboxPatch(
                    (n - 0.3, y0 - 0.3),
                    0.6,
                    0.6,
                    boxstyle="round,pad=0.02",
                    fc="white",
                    ec=colours[p % len(colours)],
                )
            )
            ax_f.text(n, y0, w[p], ha="center", va="center", fontsize=9)
        ax_f.text(-0.8, y0, f"path {p + 1}", ha="right", va="center", fontsize=9)
    ax_f.set_xlim(-2.6, v - 0.4)
    ax_f.set_ylim(-3.4 * (k - 1) - 0.8, 3.4)
    ax_f.set_xticks(range(v), labels, rotation=90, fontsize=max(4, 9 - v // 10))
    ax_f.set_yticks([])
    for side in ("left", "right", "top"):
        ax_f.spines[side].set_visible(False)
    ax_f.set_title("data flow of each path (layers in node order; arcs: edges)", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return finish(fig, path)


def plot_edge_weights(
    net,
    order: int | None = None,
    *,
    title: str | None = None,
    path: str | os.PathLike | None = None,
) -> Figure:
    """Learnt edge weights of a `ff.KroneckerNet`: each base graph's weights (diagonal
    entries: a factor staying on its node) and the products they give at `order`."""
    if getattr(net, "weights", None) is None:
        raise ValueError("The network has no learnt edge weights (edge_weights=None).")
    bases = [
        np.where(np.asarray(a) == 1, np.asarray(w), np.nan)
        for a, w in zip(net.adjacencies, net.weights, strict=True)
    ]
    adj = net.adjacency(order)
    full = np.where(adj == 1, np.asarray(net.edge_matrix(order)), np.nan)
    np.fill_diagonal(full, np.nan)
    labels = net.labels(order)
    fig = new_figure(3.0 * len(bases) + 4.5, 4.0)
    axes = fig.subplots(1, len(bases) + 1, width_ratios=[3.0] * len(bases) + [4.5])
    for ax, w, names in zip(axes, bases, net.names, strict=False):
        im = ax.imshow(w, cmap="coolwarm", vmin=-np.nanmax(np.abs(w)), vmax=np.nanmax(np.abs(w)))
        for (i, j), x in np.ndenumerate(w):
            if np.isfinite(x):
                ax.text(j, i, f"{x:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(names)), names)
        ax.set_yticks(range(len(names)), names)
        ax.set_title("base weights", fontsize=9)
    lim = np.nanmax(np.abs(full)) if np.isfinite(full).any() else 1.0
    im = axes[-1].imshow(full, cmap="coolwarm", vmin=-lim, vmax=lim)
    axes[-1].set_xticks(
        range(len(labels)), labels, rotation=90, fontsize=max(4, 9 - len(labels) // 10)
    )
    axes[-1].set_yticks(range(len(labels)), labels, fontsize=max(4, 9 - len(labels) // 10))
    axes[-1].set_title(f"edge weights at order {net.order if order is None else order}", fontsize=9)
    fig.colorbar(im, ax=axes[-1], shrink=0.7)
    if title:
        fig.suptitle(title, fontsize=10)
    return finish(fig, path)
