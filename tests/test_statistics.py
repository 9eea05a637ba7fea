"""What the per-layer statistics mean where the step is not simply the gradient
(a clipping optimizer's sigma, float32 weights read back to find r), and the
recorder's restore of a saved detector state."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from clippy_monitor.monitor.statistics import Thresholds, layer_statistics
from clippy_monitor.record.format import LAYER_METRICS


def _linf(w: np.ndarray, w_after: np.ndarray, lr: float, applied: float) -> float:
    stats = layer_statistics(
        tf.zeros_like(w), w, w_after, tf.constant(lr), tf.constant(applied), Thresholds()
    )
    return float(stats[LAYER_METRICS.index("update_weight_linf")])


def test_update_weight_linf_float32_error_is_within_the_documented_bound():
    """docs/RECORD_FORMAT.md: r is read back from float32 weights, so its relative
    error is at most 2^-24 / rho, rho = eta * sigma * ||r/w||_inf the largest relative step."""
    rng = np.random.default_rng(0)
    w = rng.uniform(0.5, 2.0, 4096).astype(np.float32) * rng.choice([-1, 1], 4096).astype(
        np.float32
    )
    direction = rng.standard_normal(4096)
    lr, sigma = 0.05, 0.25
    for rho in (1e-2, 1e-4, 1e-5, 1e-6):
        r = (
            direction
            / np.max(np.abs(direction) / np.abs(w.astype(np.float64)))
            * rho
            / (lr * sigma)
        )
        w_after = (w - np.float32(lr) * np.float32(sigma) * r.astype(np.float32)).astype(np.float32)
        exact = np.max(np.abs(r) / np.abs(w.astype(np.float64)))
        error = abs(_linf(w, w_after, lr, sigma) - exact) / exact
        assert error <= 2.0**-24 / rho * 1.5 + 1e-6, (rho, error)


def test_update_weight_linf_is_nan_where_the_step_was_scaled_to_nothing():
    w = np.array([1.0, 2.0], np.float32)
    stats = layer_statistics(
        tf.constant([1.0, 1.0]), w, w, tf.constant(0.1), tf.constant(0.0), Thresholds()
    )
    assert np.isnan(float(stats[LAYER_METRICS.index("update_weight_linf")]))
    assert np.isnan(float(stats[LAYER_METRICS.index("clippy_factor")]))


def test_a_damaged_saved_detector_state_restarts_the_detector(caplog):
    """A resumed monitor reads the detector state from the record: inf there must not reach training."""
    from clippy_monitor.monitor.recorder import StepRecorder

    recorder = StepRecorder(["a/kernel", "b/kernel"], [], capacity=4, xla=False)
    fresh = recorder.saved_state().copy()
    state = fresh + 1.0
    recorder.start_at(7, state)
    np.testing.assert_array_equal(
        recorder.saved_state(), state
    )  # a sound state is restored as saved
    state[1] = np.inf
    with caplog.at_level("WARNING"):
        recorder.start_at(7, state)
    np.testing.assert_array_equal(recorder.saved_state(), fresh)
    assert int(recorder.step.numpy()) == 7
    assert any("not finite" in r.getMessage() for r in caplog.records)
