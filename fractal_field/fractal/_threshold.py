"""Which entries of an array count as occupied: magnitude, then a threshold."""

from __future__ import annotations

import dataclasses

import numpy as np

_COMPONENTS = ("abs", "real", "imag")


@dataclasses.dataclass(frozen=True)
class Quantile:
    """A relative threshold: occupied where the value exceeds its `q`-quantile (`0 <= q < 1`)."""

    q: float

    def __post_init__(self):
        if not 0.0 <= float(self.q) < 1.0:
            raise ValueError(f"Quantile(q={self.q}) must satisfy 0 <= q < 1.")


Threshold = float | str | Quantile


def magnitude(x, component: str = "abs") -> np.ndarray:
    """`|x|` (`component="abs"`, the default), `|Re x|` (`"real"`) or `|Im x|` (`"imag"`) as a
    float64 numpy array; raises on empty, non-numeric or non-finite input."""
    if component not in _COMPONENTS:
        raise ValueError(f"component={component!r} must be one of {_COMPONENTS}.")
    a = np.asarray(x)
    if a.dtype == bool:
        a = a.astype(np.float64)
    if not (np.issubdtype(a.dtype, np.number)):
        raise TypeError(f"Expected a numeric array, got dtype {a.dtype}.")
    if a.size == 0:
        raise ValueError(f"The array is empty (shape {a.shape}): nothing to measure.")
    if not np.all(np.isfinite(a)):
        bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
        raise ValueError(f"The array has {bad} non-finite value(s) (nan or inf).")
    if component == "real":
        a = np.real(a)
    elif component == "imag":
        a = np.imag(a)
    return np.abs(a).astype(np.float64)


def threshold_value(v: np.ndarray, threshold: Threshold) -> float:
    """The cut `t` for magnitudes `v`: entries with `v > t` are occupied."""
    if isinstance(threshold, Quantile) or threshold == "mean":
        if float(v.max()) == float(v.min()):
            raise ValueError(
                f"The array is constant (|x| = {float(v.max()):g} everywhere): a relative "
                f"threshold ({threshold!r}) selects nothing. Use an absolute threshold."
            )
        if isinstance(threshold, Quantile):
            return float(np.quantile(v, threshold.q))
        return float(v.mean())
    if isinstance(threshold, str):
        raise ValueError(
            f"threshold={threshold!r}: use a number (absolute), 'mean' or fractal.Quantile(q)."
        )
    t = float(threshold)
    if not np.isfinite(t) or t < 0:
        raise ValueError(f"threshold={threshold} must be a finite number >= 0.")
    return t


def occupancy(x, threshold: Threshold = 0.0, *, component: str = "abs") -> np.ndarray:
    """The boolean mask of occupied entries of `x`: its magnitude (see `magnitude`) above
    `threshold`, which is a number `t >= 0` (absolute: `|x| > t`; the default `0` keeps the
    non-zero entries), `"mean"` (`|x|` above its mean) or `Quantile(q)` (above its
    `q`-quantile). Relative thresholds raise on constant input."""
    v = magnitude(x, component)
    return v > threshold_value(v, threshold)
