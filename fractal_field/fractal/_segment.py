"""The fractal transformation `T_r` (segmenting a weight grid into `r x r` tiles) and the
discrete-scale-invariance (DSI) report."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from ._box import default_scales, mask_dimension
from ._threshold import Threshold, occupancy


def as_matrix(w) -> np.ndarray:
    """A weight tensor as the 2-D grid the segmentation acts on (numpy, dtype kept).

    Leading axes of size 1 are dropped (our cell's `(1, out, in, 3, 3)`); a vector becomes one
    row `(1, n)`; a matrix is kept; a convolution kernel in Equinox's layout
    `(out, in, kh, kw)` (or any tensor with more axes) becomes `(out, in * kh * kw)`: one row
    per output channel, its input channels and taps flattened (C order).
    """
    a = np.asarray(w)
    while a.ndim > 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 0:
        raise ValueError("A scalar has no grid to segment.")
    if a.ndim == 1:
        return a[None, :]
    return a.reshape(a.shape[0], -1)


def segment_grid(shape: Sequence[int], r: int) -> tuple[int, int]:
    """`(rows, cols)` of tiles `T_r` cuts a `shape` grid into: `ceil(m / r) x ceil(n / r)`."""
    if isinstance(r, bool) or int(r) != r or r < 1:
        raise ValueError(f"Segment size r={r!r} must be an integer >= 1.")
    m, n = shape
    return math.ceil(m / r), math.ceil(n / r)


def segment(w, r: int) -> list[np.ndarray]:
    """The fractal transformation `T_r`: the `r x r` tiles of `as_matrix(w)`, row-major. Tiles
    at the lower and right edges are smaller when `r` does not divide the side (nothing is
    dropped): `ceil(m / r) * ceil(n / r)` tiles in all."""
    a = as_matrix(w)
    rows, cols = segment_grid(a.shape, r)
    return [a[i * r : (i + 1) * r, j * r : (j + 1) * r] for i in range(rows) for j in range(cols)]


def segment_dimensions(
    w,
    r: int,
    *,
    threshold: Threshold = "mean",
    component: str = "abs",
) -> np.ndarray:
    """Box-counting dimension of each tile of `T_r(w)`, shape `segment_grid(..., r)`.

    Occupancy is decided once on the whole tensor (`threshold`, see `occupancy`), then each
    tile is box-counted at its default box sizes (`default_scales`). A tile with no occupied
    entry, or one too small for two box sizes (smallest side < 4), gets `nan`.
    """
    mask = occupancy(as_matrix(w), threshold, component=component)
    rows, cols = segment_grid(mask.shape, r)
    out = np.full((rows, cols), np.nan)
    for i in range(rows):
        for j in range(cols):
            tile = mask[i * r : (i + 1) * r, j * r : (j + 1) * r]
            if len(default_scales(tile.shape)) >= 2 and tile.any():
                out[i, j] = mask_dimension(tile).dimension
    return out


def dsi_scales(r0: int, lam: int, num: int) -> tuple[int, ...]:
    """`r_k = r0 * lam^k`, `k = 0..num-1`."""
    for name, v, lo in (("r0", r0, 1), ("lam", lam, 2), ("num", num, 2)):
        if isinstance(v, bool) or int(v) != v or v < lo:
            raise ValueError(f"{name}={v!r} must be an integer >= {lo}.")
    return tuple(int(r0) * int(lam) ** k for k in range(int(num)))


@dataclasses.dataclass(frozen=True)
class ScaleInvariance:
    """The DSI report of one tensor.

    `scales`: the segment sizes `r_k`; `dimensions`: per scale, the mean `D` over the tiles
    that have one; `segments`: per scale, the `(rows, cols)` array of tile dimensions;
    `spread`: `max - min` of `dimensions`; `tol`; `holds`: `spread <= tol`.
    """

    scales: tuple[int, ...]
    dimensions: tuple[float, ...]
    segments: tuple[np.ndarray, ...]
    spread: float
    tol: float
    holds: bool

    def to_dict(self) -> dict:
        """JSON-ready (tile dimensions as nested lists, `None` for `nan`)."""
        return dict(
            scales=list(self.scales),
            dimensions=[_num(d) for d in self.dimensions],
            segments=[[[_num(v) for v in row] for row in s] for s in self.segments],
            spread=_num(self.spread),
            tol=self.tol,
            holds=self.holds,
        )


def _num(v) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def scale_invariance(
    w,
    *,
    r0: int = 4,
    lam: int = 2,
    num: int = 3,
    tol: float = 0.1,
    threshold: Threshold = "mean",
    component: str = "abs",
) -> ScaleInvariance:
    """Discrete scale invariance of `w`: segment it at `r_k = r0 * lam^k` (`k < num`), take
    the mean tile dimension `D(r_k)` at each scale (`segment_dimensions`) and call the tensor
    scale-invariant when `max_k D(r_k) - min_k D(r_k) <= tol` (default 0.1).

    Scales at which no tile has a dimension give `nan`; then the invariance does not hold.
    """
    scales = dsi_scales(r0, lam, num)
    if not (isinstance(tol, int | float) and tol >= 0):
        raise ValueError(f"tol={tol!r} must be a number >= 0.")
    segs = tuple(segment_dimensions(w, r, threshold=threshold, component=component) for r in scales)
    dims = tuple(float(np.nanmean(s)) if np.isfinite(s).any() else math.nan for s in segs)
    spread = float(max(dims) - min(dims)) if all(map(math.isfinite, dims)) else math.nan
    return ScaleInvariance(scales, dims, segs, spread, float(tol), bool(spread <= tol))
