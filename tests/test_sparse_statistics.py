"""Sparse (embedding) gradients keep one shape under XLA: the deduplicated rows are
zero-padded to the number of looked-up rows, and the statistics ignore the padding."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from clippy_monitor.monitor.statistics import (
    Thresholds,
    dense_gradient_values,
    layer_statistics,
    padded_gradient_values,
)
from clippy_monitor.record.format import LAYER_METRICS


def _slices(indices, values, rows=10):
    return tf.IndexedSlices(
        tf.constant(values, tf.float32),
        tf.constant(indices, tf.int64),
        tf.constant([rows, 2], tf.int64),
    )


def test_padding_keeps_the_looked_up_shape_and_every_statistic():
    # rows 3 and 1 looked up twice (row 1 sums to zero): 5 lookups, 3 distinct rows.
    grad = _slices([3, 1, 3, 7, 1], [[1.0, 0.0], [2.0, 2.0], [1.0, 0.0], [0.0, 0.0], [-2.0, -2.0]])
    padded, padding = padded_gradient_values(grad)
    assert padded.shape == (5, 2) and float(padding) == 4.0  # 2 padded rows x 2 columns
    exact = dense_gradient_values(grad)
    np.testing.assert_array_equal(padded.numpy()[:3], exact.numpy())

    w = tf.ones([10, 2])
    args = (w, w - 0.1, tf.constant(0.1), tf.constant(1.0), Thresholds())
    with_padding = layer_statistics(padded, *args, padding=padding).numpy()
    without = layer_statistics(exact, *args).numpy()
    np.testing.assert_allclose(with_padding, without, rtol=1e-6)
    assert with_padding[LAYER_METRICS.index("zero_grad_fraction")] == np.float32(
        5 / 6
    )  # [2, 0], [0, 0], [0, 0]


def test_padded_shape_does_not_depend_on_the_number_of_distinct_rows():
    f = tf.function(lambda g: padded_gradient_values(g)[0])
    a = f(_slices([0, 0, 0, 0], np.ones((4, 2))))
    b = f(_slices([0, 1, 2, 3], np.ones((4, 2))))
    assert a.shape == b.shape == (4, 2)


def test_measured_weights_are_the_touched_rows_padded_like_the_gradient():
    from clippy_monitor.monitor.statistics import measured_weights, touched_rows

    table = keras.Variable(
        np.arange(20, dtype=np.float32).reshape(10, 2)
    )  # what optimizer.apply receives
    grad = _slices([3, 1, 3, 7, 1], np.ones((5, 2)))
    rows = touched_rows(grad)
    np.testing.assert_array_equal(rows[0].numpy(), [3, 1, 7])
    np.testing.assert_array_equal(
        padded_gradient_values(grad, rows)[0].numpy(), padded_gradient_values(grad)[0].numpy()
    )
    seen = measured_weights(table, grad, rows).numpy()
    np.testing.assert_array_equal(seen, [[6, 7], [2, 3], [14, 15], [0, 0], [0, 0]])
    # A dense gradient sees the whole variable.
    assert touched_rows(tf.ones([10, 2])) is None
    np.testing.assert_array_equal(
        measured_weights(table, tf.ones([10, 2]), None).numpy(), table.numpy()
    )
