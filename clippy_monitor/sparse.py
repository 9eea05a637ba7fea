"""Sparse (``IndexedSlices``) gradients, shared by the optimizers and the monitor.

Embedding lookups on TensorFlow give ``tf.IndexedSlices`` gradients: the looked-up
rows (``values``), which row each is (``indices``), possibly repeated.
"""

from __future__ import annotations

from typing import Any


def is_sparse(grad: Any) -> bool:
    """True for a ``tf.IndexedSlices`` gradient (embedding lookups on TensorFlow)."""
    return hasattr(grad, "indices") and hasattr(grad, "values")


def dense_values(grad: Any) -> Any:
    """The stored values of a gradient (``IndexedSlices.values`` or the tensor)."""
    return grad.values if is_sparse(grad) else grad


def deduplicate(gradient: Any, unique: Any = None) -> Any:
    """Sum the rows of an ``IndexedSlices`` gradient that share an index.

    An embedding looked up twice in a batch yields a repeated index; Keras 2 (and
    so TFRS) summed them before ``update_step``, which keeps the per-row
    accumulator update and sigma exact.  Keras 3 passes them through, so we do it.
    ``unique``: ``tf.unique(gradient.indices)`` if the caller already has it.
    """
    import tensorflow as tf  # IndexedSlices only exist on the TensorFlow backend.

    unique, positions = tf.unique(gradient.indices) if unique is None else unique
    values = tf.math.unsorted_segment_sum(gradient.values, positions, tf.shape(unique)[0])
    return tf.IndexedSlices(values, unique, gradient.dense_shape)
