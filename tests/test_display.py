"""Display downsampling keeps every spike (clippy_monitor.display)."""

from __future__ import annotations

import numpy as np
import pytest

from clippy_monitor.display import bucket_max, bucket_min, bucket_starts, minmax_envelope


def test_bucket_starts_cover_everything_evenly():
    for n, k in [(10, 3), (3000, 64), (5, 10), (1, 1), (100_000, 600)]:
        starts = bucket_starts(n, k)
        assert starts[0] == 0 and len(starts) == min(n, k)
        sizes = np.diff(np.append(starts, n))
        assert sizes.min() >= 1 and sizes.max() - sizes.min() <= 1
    assert len(bucket_starts(0, 5)) == 0
    with pytest.raises(ValueError):
        bucket_starts(10, 0)


def test_envelope_keeps_every_bucket_extreme_and_single_step_spikes():
    rng = np.random.default_rng(0)
    steps = np.arange(100_000) + 7
    values = rng.normal(size=len(steps))
    spikes = [123, 45_678, 99_999]
    values[spikes] = [50.0, -40.0, 60.0]
    xs, ys = minmax_envelope(steps, values, 1000)
    assert len(xs) <= 1000 and np.all(np.diff(xs) > 0)
    for s in spikes:
        assert steps[s] in xs
    np.testing.assert_array_equal(ys, values[xs - 7])  # real points at their own steps
    starts = bucket_starts(len(values), 500)
    ends = np.append(starts[1:], len(values))
    for a, b in zip(starts, ends):
        inside = (xs >= steps[a]) & (xs <= steps[b - 1])
        assert ys[inside].max() == values[a:b].max()
        assert ys[inside].min() == values[a:b].min()


def test_envelope_small_input_unchanged_and_nan_buckets_leave_a_gap():
    steps, values = np.arange(5), np.array([1.0, np.nan, 3.0, 2.0, 0.0])
    xs, ys = minmax_envelope(steps, values, 10)
    np.testing.assert_array_equal(xs, steps)
    np.testing.assert_array_equal(ys, values)
    values = np.concatenate([np.ones(10), np.full(10, np.nan), np.arange(10.0)])
    values[3] = np.nan  # ignored: the bucket still has finite values
    xs, ys = minmax_envelope(np.arange(30), values, 6)
    assert np.isnan(ys[xs == 10]).all() and 10 in xs  # all-NaN bucket -> one NaN point
    assert 29 in xs and 20 in xs


def test_bucket_max_min_are_nan_ignoring_extremes_of_columns():
    rng = np.random.default_rng(1)
    matrix = rng.random((4, 1003)).astype(np.float32)
    matrix[2, 500] = 100.0
    matrix[1, 10] = np.nan
    matrix[3, 700] = np.inf
    hi, lo = bucket_max(matrix, 50), bucket_min(matrix, 50)
    assert hi.shape == lo.shape == (4, 50) and hi.dtype == np.float32
    starts = bucket_starts(1003, 50)
    ends = np.append(starts[1:], 1003)
    for j, (a, b) in enumerate(zip(starts, ends)):
        np.testing.assert_array_equal(hi[:, j], np.nanmax(matrix[:, a:b], axis=1))
        np.testing.assert_array_equal(lo[:, j], np.nanmin(matrix[:, a:b], axis=1))
    assert hi.max() == np.inf and 100.0 in hi
    np.testing.assert_array_equal(bucket_max(matrix, 5000), matrix)  # fewer columns: unchanged
    np.testing.assert_array_equal(bucket_max(matrix[0], 50), hi[0])  # 1-D works too
