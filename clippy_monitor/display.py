"""Downsampling for display that never hides a spike.

A divergence often starts with one bad step (paper 2.1, Figure 1: a sudden
jump; 4.1, Figure 4b: step-b).  Plain striding (``values[::k]``) drops it with
probability ``1 - 1/k``, so every plot of a long run goes through this module:

* :func:`minmax_envelope` -- for line plots: per bucket of consecutive steps,
  the samples holding the bucket's minimum and maximum, in step order.  Only
  real samples are returned, at their real steps, so a single-step spike keeps
  its step and its height.
* :func:`bucket_max` / :func:`bucket_min` -- for heatmaps ``[rows, steps]``:
  the maximum (norms, ratios: the worst is large) or minimum (clipping factors:
  the worst is small) over each bucket of columns; :func:`bucket_starts` gives
  the first column of each bucket, for the axis labels.

Buckets are contiguous runs of ``ceil`` or ``floor`` of ``n / buckets``
columns.  NaN is ignored unless a whole bucket is NaN (then the bucket is NaN);
``inf`` is kept.  Everything is O(n) NumPy (``ufunc.reduceat``): 32M values in
well under a second.  Pure NumPy, no plotting library: the post-mortem report,
the TensorBoard plugin and the Dash app share it.
"""

from __future__ import annotations

import numpy as np

__all__ = ["bucket_max", "bucket_min", "bucket_starts", "minmax_envelope", "nullable"]


def bucket_starts(n: int, max_buckets: int) -> np.ndarray:
    """First index of each of ``min(n, max_buckets)`` contiguous, near-equal buckets of ``range(n)``."""
    if max_buckets < 1:
        raise ValueError(f"max_buckets must be >= 1, got {max_buckets}")
    if n <= max_buckets:
        return np.arange(n, dtype=np.int64)
    return (np.arange(max_buckets, dtype=np.int64) * n) // max_buckets


def _reduce(ufunc: np.ufunc, matrix: np.ndarray, max_columns: int, axis: int) -> np.ndarray:
    values = np.asarray(matrix)
    n = values.shape[axis]
    if n <= max_columns:
        return values
    if not np.issubdtype(values.dtype, np.floating):
        values = values.astype(np.float64)
    return ufunc.reduceat(values, bucket_starts(n, max_columns), axis=axis)


def bucket_max(matrix: np.ndarray, max_columns: int, axis: int = -1) -> np.ndarray:
    """Maximum over buckets of ``axis`` (default: columns), NaN ignored; at most ``max_columns`` remain.

    For norms and ratios (‖g‖₂, ‖r/w‖∞): a one-step blow-up stays visible.
    Returned unchanged (not copied) when it is already small enough.
    """
    return _reduce(np.fmax, matrix, max_columns, axis)


def bucket_min(matrix: np.ndarray, max_columns: int, axis: int = -1) -> np.ndarray:
    """Minimum over buckets of ``axis`` (default: columns), NaN ignored; for clipping factors."""
    return _reduce(np.fmin, matrix, max_columns, axis)


def _first_index_of(values: np.ndarray, target: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Per bucket, the first index where ``values`` equals the bucket's ``target`` (bucket start if none)."""
    n = len(values)
    sizes = np.diff(np.append(starts, n))
    hit = values == np.repeat(target, sizes)
    index = np.where(hit, np.arange(n), n)
    first = np.minimum.reduceat(index, starts)
    return np.where(first < n, first, starts)


def minmax_envelope(
    steps: np.ndarray, values: np.ndarray, max_points: int
) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` samples of a line that keep every bucket's min and max.

    ``steps`` and ``values`` are 1-D and of equal length.  Each of
    ``max_points // 2`` buckets contributes the samples at its minimum and its
    maximum (one if they coincide), in step order; NaN is ignored unless the
    whole bucket is NaN.  Returns ``(steps, values)`` (copies of the inputs when
    they already fit).
    """
    steps = np.asarray(steps)
    values = np.asarray(values)
    if steps.shape != values.shape or values.ndim != 1:
        raise ValueError(f"steps {steps.shape} and values {values.shape} must be equal 1-D shapes")
    if max_points < 2:
        raise ValueError(f"max_points must be >= 2, got {max_points}")
    n = len(values)
    if n <= max_points:
        return steps.copy(), values.copy()
    starts = bucket_starts(n, max_points // 2)
    lo = _first_index_of(values, np.fmin.reduceat(values, starts), starts)
    hi = _first_index_of(values, np.fmax.reduceat(values, starts), starts)
    pairs = np.sort(np.stack([lo, hi], axis=1), axis=1).ravel()
    keep = np.concatenate([[True], pairs[1:] != pairs[:-1]])
    index = pairs[keep]
    return steps[index], values[index]


def nullable(values: np.ndarray, digits: int | None = None) -> list:
    """``values`` as a (nested) list for JSON, with None (a gap) where not finite.

    With ``digits``, finite values are rounded to that many significant digits
    (kept as they are where rounding would overflow, e.g. the largest float).
    """
    values = np.asarray(values, np.float64)
    finite = np.isfinite(values)
    if digits is None and finite.all():
        return values.tolist()
    out = values.astype(object)
    if digits is not None:
        out[finite] = [_rounded(v, digits) for v in values[finite].tolist()]
    out[~finite] = None
    return out.tolist()


def _rounded(value: float, digits: int) -> float:
    short = float(f"{value:.{digits}g}")
    return short if np.isfinite(short) else value


def vline(
    x: float, color: str, *, width: float | None = 1.5, dash: str | None = None, **shape
) -> dict:
    """A plotly shape: a vertical line at ``x`` across the plot (``xref`` "x", ``yref``
    "paper", unless ``shape`` says otherwise; other keys such as ``name`` go with it)."""
    line = _line_style(color, width, dash)
    base = {"type": "line", "xref": "x", "yref": "paper", "x0": x, "x1": x, "y0": 0, "y1": 1}
    return base | shape | {"line": line}


def hline(
    y: float, color: str, *, width: float | None = 1.0, dash: str | None = None, **shape
) -> dict:
    """A plotly shape: a horizontal line at ``y`` across the plot (``yref`` "y")."""
    line = _line_style(color, width, dash)
    base = {"type": "line", "xref": "paper", "yref": "y", "x0": 0, "x1": 1, "y0": y, "y1": y}
    return base | shape | {"line": line}


def _line_style(color: str, width: float | None, dash: str | None) -> dict:
    """Plotly's ``line`` of a shape; a width or dash left out takes plotly's default."""
    style = {"color": color}
    if width is not None:
        style["width"] = width
    if dash:
        style["dash"] = dash
    return style
