"""Box-counting (Minkowski-Bouligand) dimension of the occupied entries of an array."""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Sequence

import numpy as np

from ._threshold import Threshold, occupancy


@dataclasses.dataclass(frozen=True)
class BoxCounting:
    """A box-counting fit `log N(r) = D log(1/r) + intercept` (natural logarithms).

    `dimension` (also `D`): the slope; `intercept` and `r2` (coefficient of determination,
    1 for a perfect fit) of the least-squares line; `scales`: the box sizes `r` (in entries);
    `counts`: `N(r)`, the number of boxes holding at least one occupied entry.
    """

    dimension: float
    intercept: float
    r2: float
    scales: tuple[int, ...]
    counts: tuple[int, ...]

    @property
    def D(self) -> float:  # noqa: N802
        return self.dimension


def default_scales(shape: Sequence[int]) -> tuple[int, ...]:
    """Box sizes `1, b, b^2, ...` up to half the smallest side, with `b = 3` when every side is
    a multiple of 9 (triadic grids such as 243 = 3^5) and `b = 2` otherwise."""
    shape = tuple(int(s) for s in shape)
    base = 3 if all(s % 9 == 0 for s in shape) else 2
    top = min(shape) // 2
    scales, r = [], 1
    while r <= top:
        scales.append(r)
        r *= base
    return tuple(scales)


def check_scales(scales, shape: Sequence[int]) -> tuple[int, ...]:
    """Validate box sizes: at least two distinct integers in `1..min(shape)`, sorted."""
    shape = tuple(int(s) for s in shape)
    try:
        vals = [_as_int(s) for s in scales]
    except TypeError as e:
        raise TypeError(f"scales={scales!r} must be a sequence of integers: {e}") from None
    if len(vals) < 2 or len(set(vals)) != len(vals):
        raise ValueError(f"scales={vals} must hold at least two distinct box sizes.")
    if min(vals) < 1 or max(vals) > min(shape):
        raise ValueError(
            f"scales={vals}: box sizes must lie in 1..{min(shape)} (the smallest side of an "
            f"array of shape {shape})."
        )
    return tuple(sorted(vals))


def _as_int(s) -> int:
    if isinstance(s, bool | np.bool_):
        raise TypeError(f"{s!r} is not an integer")
    if isinstance(s, float | np.floating) and float(s).is_integer():
        return int(s)
    return operator.index(s)


def count_boxes(mask: np.ndarray, r: int) -> int:
    """Boxes of side `r` (a grid from index 0) holding an occupied entry. Partial boxes at the
    upper ends of axes whose length `r` does not divide count like full ones."""
    mask = np.asarray(mask, bool)
    if isinstance(r, bool) or int(r) != r or r < 1:
        raise ValueError(f"Box size r={r!r} must be an integer >= 1.")
    r = int(r)
    padded = [math.ceil(n / r) * r for n in mask.shape]
    if list(mask.shape) != padded:
        m = np.zeros(padded, bool)
        m[tuple(slice(0, n) for n in mask.shape)] = mask
        mask = m
    blocks = mask.reshape([v for n in padded for v in (n // r, r)])
    return int(np.count_nonzero(blocks.any(axis=tuple(range(1, 2 * mask.ndim, 2)))))


def fit_counts(scales: Sequence[int], counts: Sequence[int]) -> BoxCounting:
    """Least-squares line of `log N` on `log(1/r)`."""
    if min(counts) < 1:
        raise ValueError(f"No occupied entries (box counts {list(counts)}): nothing to fit.")
    xs = -np.log(np.asarray(scales, np.float64))
    ys = np.log(np.asarray(counts, np.float64))
    slope, intercept = np.polyfit(xs, ys, 1)
    ss_res = float(np.sum((ys - (slope * xs + intercept)) ** 2))
    ss_tot = float(np.sum((ys - ys.mean()) ** 2))
    # Constant counts (a single point) lie exactly on a flat line: r2 = 1.
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 1e-24 else 1.0
    return BoxCounting(
        float(slope) + 0.0,
        float(intercept),
        r2,
        tuple(int(s) for s in scales),
        tuple(int(c) for c in counts),
    )


def mask_dimension(mask: np.ndarray, scales=None) -> BoxCounting:
    """`box_counting_dimension` of an already thresholded boolean array."""
    if scales is None:
        scales = default_scales(mask.shape)
        if len(scales) < 2:
            raise ValueError(
                f"An array of shape {mask.shape} is too small for the default box sizes "
                f"({list(scales)}); its smallest side must be at least 4."
            )
    scales = check_scales(scales, mask.shape)
    return fit_counts(scales, [count_boxes(mask, r) for r in scales])


def box_counting_dimension(
    x,
    *,
    scales: Sequence[int] | None = None,
    threshold: Threshold = 0.0,
    component: str = "abs",
) -> BoxCounting:
    """The box-counting dimension of the set of occupied entries of `x` (any number of axes,
    real or complex).

    **Arguments:**

    - `x`: the array; complex values are measured by magnitude (`component="abs"`, or
      `"real"`/`"imag"` for `|Re x|`/`|Im x|`).
    - `scales`: box sizes `r` in entries, at least two distinct integers in `1..min(x.shape)`.
      Default: `1, 2, 4, ...` up to half the smallest side, or `1, 3, 9, ...` when every side
      is a multiple of 9. A box of side `r` is a hypercube on the grid anchored at index 0;
      when `r` does not divide a side, the last, partial box of that axis counts as a box.
    - `threshold`: which entries are occupied: a number `t >= 0` (`|x| > t`; default `0`, the
      non-zero entries), `"mean"` (`|x|` above its mean) or `Quantile(q)`.

    **Returns** a `BoxCounting`: the slope `D` of the least-squares line of `log N(r)` against
    `log(1/r)`, its intercept and `r2`, and the box sizes and counts.

    A dense random matrix reads as `D = 2` (an occupied fraction `p` of independent entries
    fills every box of side `r` once `p r^2 >> 1`): `D` says how the occupied set fills space,
    not whether the values are structured.
    """
    return mask_dimension(occupancy(x, threshold, component=component), scales)
