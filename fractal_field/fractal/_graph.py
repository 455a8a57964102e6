"""The segment graph: features of the tiles of `T_r` and exponential-kernel edges between the
tiles of consecutive layers."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ._segment import as_matrix, segment, segment_dimensions
from ._threshold import Threshold, magnitude

FEATURES = ("dimension", "mean_abs", "entropy")


def _entropy(tile: np.ndarray) -> float:
    """Shannon entropy of `p = |w| / sum |w|` over the tile's entries, divided by `log n`
    (so in `[0, 1]`; 1 for uniform magnitudes; 0 for one entry or an all-zero tile)."""
    v = np.abs(tile).ravel().astype(np.float64)
    total = v.sum()
    if v.size < 2 or total == 0:
        return 0.0
    p = v[v > 0] / total
    return float(-(p * np.log(p)).sum() / np.log(v.size))


def segment_features(
    w, r: int, *, threshold: Threshold = "mean", component: str = "abs"
) -> np.ndarray:
    """`(num_tiles, 3)` features of the tiles of `T_r(w)`, row-major: box-counting dimension
    (`segment_dimensions`; `0` where a tile has none), mean `|w|` and normalised entropy of
    `|w|` (see `FEATURES`)."""
    a = as_matrix(w)
    dims = segment_dimensions(a, r, threshold=threshold, component=component).ravel()
    tiles = segment(magnitude(a, component), r)
    feats = [(d, float(t.mean()), _entropy(t)) for d, t in zip(dims, tiles, strict=True)]
    return np.nan_to_num(np.asarray(feats, np.float64), nan=0.0)


def kernel_adjacency(
    a: np.ndarray, b: np.ndarray, *, gamma: float = 1.0, s: float = 1.0
) -> np.ndarray:
    """`e_ij = gamma * exp(-||a_i - b_j|| / s)` (Euclidean norm) between the rows of `a`
    `(n, f)` and `b` `(m, f)`: an `(n, m)` matrix."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"Features must be (n, f) and (m, f) with the same f; got {a.shape} and {b.shape}."
        )
    if not (gamma > 0 and s > 0):
        raise ValueError(f"gamma={gamma} and s={s} must be > 0.")
    dist = np.sqrt(np.maximum(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1), 0.0))
    return gamma * np.exp(-dist / s)


def segment_graph(
    weights: Sequence,
    r: int,
    *,
    gamma: float = 1.0,
    s: float = 1.0,
    threshold: Threshold = "mean",
    component: str = "abs",
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The segment graph of a stack of layers `weights` (tensors, in order).

    Returns `(features, edges)`: `features[l]` from `segment_features(weights[l], r)` and
    `edges[l] = kernel_adjacency(features[l], features[l + 1], gamma=gamma, s=s)` between
    consecutive layers."""
    if len(weights) < 2:
        raise ValueError(f"A segment graph needs at least two layers, got {len(weights)}.")
    feats = [segment_features(w, r, threshold=threshold, component=component) for w in weights]
    pairs = zip(feats[:-1], feats[1:], strict=True)
    edges = [kernel_adjacency(a, b, gamma=gamma, s=s) for a, b in pairs]
    return feats, edges
