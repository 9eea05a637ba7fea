"""The rule module: hand-computed values and Hypothesis properties of Clippy's bound."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from keras import ops

from clippy_monitor import clipping


def _np(x) -> np.ndarray:
    return np.asarray(ops.convert_to_numpy(x))


# --------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------
def test_l2_norm() -> None:
    assert _np(clipping.l2_norm(np.array([3.0, 4.0], np.float32))) == pytest.approx(5.0)
    # [[1, 2], [2, 4]]: sqrt(1 + 4 + 4 + 16) = 5
    assert _np(clipping.l2_norm(np.array([[1.0, 2.0], [2.0, 4.0]], np.float32))) == pytest.approx(
        5.0
    )
    assert _np(clipping.l2_norm(np.zeros(3, np.float32))) == 0.0


def test_unitwise_norm_dense_kernel_is_per_output_column() -> None:
    # Dense kernel [in=2, out=3]; column norms: sqrt(9+16)=5, sqrt(0+1)=1, sqrt(36+64)=10.
    kernel = np.array([[3.0, 0.0, 6.0], [4.0, 1.0, -8.0]], np.float32)
    norm = _np(clipping.unitwise_norm(kernel))
    assert norm.shape == (1, 3)
    np.testing.assert_allclose(norm, [[5.0, 1.0, 10.0]], rtol=1e-6)


def test_unitwise_norm_conv_kernel_reduces_all_but_last_axis() -> None:
    kernel = np.ones((2, 2, 3, 4), np.float32)  # 12 ones per output channel
    norm = _np(clipping.unitwise_norm(kernel))
    assert norm.shape == (1, 1, 1, 4)
    np.testing.assert_allclose(norm, np.full((1, 1, 1, 4), math.sqrt(12.0)), rtol=1e-6)


def test_unitwise_norm_bias_is_one_unit() -> None:
    norm = _np(clipping.unitwise_norm(np.array([3.0, -4.0], np.float32)))
    assert norm.shape == (1,)
    np.testing.assert_allclose(norm, [5.0], rtol=1e-6)


def test_grad_weight_ratio() -> None:
    assert _np(clipping.grad_weight_ratio(2.0, 4.0)) == pytest.approx(0.5)
    # ||w|| = 0 is floored at AGC_EPS = 1e-3: 2 / 1e-3 = 2000.
    assert _np(clipping.grad_weight_ratio(2.0, 0.0)) == pytest.approx(2000.0)
    assert clipping.AGC_EPS == 1e-3
    # A norm below the floor is floored too.
    assert _np(clipping.grad_weight_ratio(1.0, 1e-5)) == pytest.approx(1000.0)


def test_update_weight_ratio_and_linf() -> None:
    r = np.array([0.1, -0.2, 0.05], np.float32)
    w = np.array([1.0, -0.5, 0.0], np.float32)
    # |r|/max(|w|, 1e-3) = [0.1, 0.4, 0.05/1e-3 = 50]
    np.testing.assert_allclose(_np(clipping.update_weight_ratio(r, w)), [0.1, 0.4, 50.0], rtol=1e-6)
    assert _np(clipping.update_weight_linf(r, w)) == pytest.approx(50.0, rel=1e-6)
    # Without the zero weight the max is the 0.4 coordinate.
    assert _np(clipping.update_weight_linf(r[:2], w[:2])) == pytest.approx(0.4, rel=1e-6)


# --------------------------------------------------------------------------
# Factors
# --------------------------------------------------------------------------
def test_gc_factor() -> None:
    assert _np(clipping.gc_factor(5.0, 0.1)) == pytest.approx(0.02)  # 0.1 / 5
    assert _np(clipping.gc_factor(0.05, 0.1)) == 1.0  # norm under the threshold
    assert _np(clipping.gc_factor(0.0, 0.1)) == 1.0  # g = 0: nothing to clip
    assert _np(clipping.gc_factor(1.0)) == pytest.approx(clipping.DEFAULT_GC_CLIPNORM)


def test_agc_factor() -> None:
    # min(1, 0.1 * 4 / 2) = 0.2
    assert _np(clipping.agc_factor(2.0, 4.0, 0.1)) == pytest.approx(0.2)
    # ||w|| = 0 floored at 1e-3: 0.1 * 1e-3 / 2 = 5e-5
    assert _np(clipping.agc_factor(2.0, 0.0, 0.1)) == pytest.approx(5e-5)
    # ||g|| = 0 -> 1
    assert _np(clipping.agc_factor(0.0, 4.0, 0.1)) == 1.0
    # small gradient: 0.1 * 4 / 0.1 = 4 -> 1
    assert _np(clipping.agc_factor(0.1, 4.0, 0.1)) == 1.0
    # unit-wise norms broadcast: per unit [min(1, 1e-3*5/0.5), min(1, 1e-3*1e-3/0.1)]
    np.testing.assert_allclose(
        _np(
            clipping.agc_factor(
                np.array([[0.5, 0.1]], np.float32), np.array([[5.0, 0.0]], np.float32)
            )
        ),
        [[0.01, 1e-5]],
        rtol=1e-5,
    )


def test_agc_factor_is_min_one_over_ratio() -> None:
    for g, w in [(2.0, 4.0), (2.0, 0.0), (3.0, 1e-4)]:
        expected = min(1.0, 0.1 / float(_np(clipping.grad_weight_ratio(g, w))))
        assert _np(clipping.agc_factor(g, w, 0.1)) == pytest.approx(expected, rel=1e-6)


def test_lamb_trust_ratio() -> None:
    assert _np(clipping.lamb_trust_ratio(3.0, 6.0)) == pytest.approx(0.5)
    assert _np(clipping.lamb_trust_ratio(6.0, 3.0)) == pytest.approx(2.0)  # may exceed 1
    assert _np(clipping.lamb_trust_ratio(0.0, 3.0)) == 1.0
    assert _np(clipping.lamb_trust_ratio(3.0, 0.0)) == 1.0
    assert _np(clipping.lamb_trust_ratio(0.0, 0.0)) == 1.0


def test_clippy_threshold() -> None:
    w = np.array([1.0, -2.0, 0.0], np.float32)
    # 0.5|w| + 0.01
    np.testing.assert_allclose(
        _np(clipping.clippy_threshold(w, 0.5, 0.01)), [0.51, 1.01, 0.01], rtol=1e-6
    )
    # + 0.1 * |p| with p = [4, 0.5, 1]
    p = np.array([4.0, 0.5, 1.0], np.float32)
    np.testing.assert_allclose(
        _np(clipping.clippy_threshold(w, 0.5, 0.01, preconditioner=p, lambda_acc=0.1)),
        [0.91, 1.06, 0.11],
        rtol=1e-6,
    )
    # lambda_acc = 0 ignores the preconditioner
    np.testing.assert_allclose(
        _np(clipping.clippy_threshold(w, 0.5, 0.01, preconditioner=p, lambda_acc=0.0)),
        [0.51, 1.01, 0.01],
        rtol=1e-6,
    )
    # paper defaults: lambda_rel = 0.5, lambda_abs = 1e-2
    np.testing.assert_allclose(_np(clipping.clippy_threshold(w)), [0.51, 1.01, 0.01], rtol=1e-6)


def test_clippy_excess_and_sigma() -> None:
    delta = np.array([0.0, 0.02, -2.02, 0.0], np.float32)
    threshold = np.array([0.5, 0.01, 1.01, 0.0], np.float32)
    # delta = 0 never counts (even with threshold 0); else |delta| / threshold -> max 2
    assert _np(clipping.clippy_excess(delta, threshold)) == pytest.approx(2.0, rel=1e-6)
    assert _np(clipping.clippy_sigma(clipping.clippy_excess(delta, threshold))) == pytest.approx(
        0.5, rel=1e-6
    )
    # threshold 0 with delta != 0 -> infinite excess -> sigma 0
    assert (
        _np(clipping.clippy_excess(np.array([0.3, -1.0], np.float32), np.zeros(2, np.float32)))
        == np.inf
    )
    assert _np(clipping.clippy_sigma(np.float32(np.inf))) == 0.0
    # a zero step: excess 0, sigma 1
    assert (
        _np(
            clipping.clippy_sigma(
                clipping.clippy_excess(np.zeros(3, np.float32), np.ones(3, np.float32))
            )
        )
        == 1.0
    )
    # homogeneous: the excess of delta / s is excess / s (the monitor divides sigma out after the max)
    assert _np(clipping.clippy_excess(delta / 4.0, threshold)) == pytest.approx(0.5, rel=1e-6)
    # threshold_positive skips the masking and agrees where every threshold is > 0
    positive = np.array([0.5, 0.01, 1.01, 0.3], np.float32)
    assert _np(clipping.clippy_excess(delta, positive, threshold_positive=True)) == _np(
        clipping.clippy_excess(delta, positive)
    )


def test_clippy_factor() -> None:
    w = np.array([1.0, -2.0, 0.0], np.float32)
    # thresholds [0.51, 1.01, 0.01]; scales [5.1, 5.05, 0.01/0.02 = 0.5]
    delta = np.array([0.1, -0.2, 0.02], np.float32)
    assert _np(clipping.clippy_factor(delta, w, 0.5, 0.01)) == pytest.approx(0.5, rel=1e-6)
    # scales [5.1, 5.05, 2] -> 1
    assert (
        _np(clipping.clippy_factor(np.array([0.1, -0.2, 0.005], np.float32), w, 0.5, 0.01)) == 1.0
    )
    # with lambda_acc * p: thresholds [0.91, 1.06, 0.11] -> scale 0.11/0.22 = 0.5
    p = np.array([4.0, 0.5, 1.0], np.float32)
    delta = np.array([0.1, -0.2, 0.22], np.float32)
    assert _np(clipping.clippy_factor(delta, w, 0.5, 0.01, p, 0.1)) == pytest.approx(0.5, rel=1e-6)
    # lambda_abs = 0 and w_i = 0 with delta_i != 0 forces sigma = 0
    assert _np(clipping.clippy_factor(np.array([0.1, 0.0, 1e-4], np.float32), w, 0.5, 0.0)) == 0.0
    # all-zero step -> 1
    assert _np(clipping.clippy_factor(np.zeros(3, np.float32), w, 0.5, 0.0)) == 1.0


# --------------------------------------------------------------------------
# Properties of Clippy's bound
# --------------------------------------------------------------------------
_F32 = {"width": 32, "allow_nan": False, "allow_infinity": False, "allow_subnormal": False}
_SHAPES = hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=6)


@st.composite
def _clippy_case(draw, with_preconditioner: bool):
    shape = draw(_SHAPES)
    delta = draw(hnp.arrays(np.float32, shape, elements=st.floats(-10.0, 10.0, **_F32)))
    w = draw(hnp.arrays(np.float32, shape, elements=st.floats(-10.0, 10.0, **_F32)))
    lambda_rel = draw(st.floats(0.0, 2.0, **_F32))
    lambda_abs = draw(st.floats(2.0**-12, 1.0, **_F32))
    if with_preconditioner:
        p = draw(hnp.arrays(np.float32, shape, elements=st.floats(0.0, 100.0, **_F32)))
        lambda_acc = draw(st.floats(0.0, 1.0, **_F32))
    else:
        p, lambda_acc = None, 0.0
    return delta, w, lambda_rel, lambda_abs, p, lambda_acc


def _check_bound(delta, w, lambda_rel, lambda_abs, p, lambda_acc) -> None:
    sigma = float(_np(clipping.clippy_factor(delta, w, lambda_rel, lambda_abs, p, lambda_acc)))
    # The threshold in float32, summed in the module's order (lambda_abs + |w| lambda_rel [+ |p| lambda_acc]).
    threshold = np.float32(lambda_abs) + np.abs(w) * np.float32(lambda_rel)
    if p is not None and lambda_acc != 0.0:
        threshold = threshold + np.abs(p) * np.float32(lambda_acc)
    np.testing.assert_allclose(
        _np(clipping.clippy_threshold(w, lambda_rel, lambda_abs, p, lambda_acc)),
        threshold,
        rtol=1e-6,
    )

    assert 0.0 < sigma <= 1.0
    step = np.abs(np.float64(sigma) * delta.astype(np.float64))
    assert np.all(step <= threshold.astype(np.float64) * (1 + 1e-6)), (step, threshold)
    # sigma is 1 exactly when no coordinate exceeds its threshold.
    assert (sigma == 1.0) == bool(np.all(np.abs(delta) <= threshold))
    if sigma < 1.0:  # the binding coordinate sits on the bound
        assert np.max(step / threshold) == pytest.approx(1.0, rel=1e-6)


@settings(max_examples=50, deadline=None)
@given(_clippy_case(with_preconditioner=False))
def test_clippy_factor_bounds_every_coordinate(case) -> None:
    _check_bound(*case)


@settings(max_examples=50, deadline=None)
@given(_clippy_case(with_preconditioner=True))
def test_clippy_factor_bounds_every_coordinate_with_preconditioner(case) -> None:
    _check_bound(*case)
