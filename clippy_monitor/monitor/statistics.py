"""Per-layer statistics of a training step, computed on the device (paper 4.1, Figure 4b).

For every trainable variable ("layer") we record ``LAYER_METRICS`` from the
gradient ``g``, the weights before and after the step, the learning rate ``eta``
and the factor ``sigma`` the optimizer applied.  The update direction before
clipping (paper eq. 4, 5) is recovered from the weights,
``r = (w_t - w_{t+1}) / (eta * sigma)``, so it is right for any optimizer whose
step is ``eta * sigma * r`` (every bundled one; sigma = 1 for the others).
All formulas come from ``clippy_monitor.clipping``.

Two halves, so the train step does only what needs the tensors:

* ``step_reductions`` (in the train step): the ``RAW_METRICS`` of each variable,
  fourteen element-wise passes over its entries in all;
* ``finish_statistics`` (once per flush, over all buffered steps at once): every
  formula that turns those scalars into ``LAYER_METRICS``.

Without XLA each op is a kernel launch, so per-variable scalar arithmetic in the
step cost more than the passes themselves; it now runs once per flush.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
import tensorflow as tf

from clippy_monitor import clipping
from clippy_monitor.record.format import LAYER_METRICS
from clippy_monitor.sparse import deduplicate


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """The thresholds at which the *would-apply* factors are evaluated (stored with the run).

    Defaults: figure 4b's GC and AGC thresholds and section 5.1.3's Clippy thresholds.
    """

    gc_clipnorm: float = clipping.DEFAULT_GC_CLIPNORM
    agc_clipping: float = clipping.DEFAULT_AGC_CLIPPING
    lambda_rel: float = clipping.DEFAULT_LAMBDA_REL
    lambda_abs: float = clipping.DEFAULT_LAMBDA_ABS

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def dense_gradient_values(grad: Any) -> tf.Tensor:
    """The gradient entries that exist: dense tensor, or the summed rows of IndexedSlices."""
    if isinstance(grad, tf.IndexedSlices):
        return deduplicate(grad).values
    return tf.convert_to_tensor(grad)


def padded_gradient_values(
    grad: Any, rows: tuple[tf.Tensor, tf.Tensor] | None = None
) -> tuple[tf.Tensor, tf.Tensor]:
    """``(values, padding)``: a dense gradient and 0, or the summed rows of an
    IndexedSlices gradient zero-padded back to the length of ``grad.values``.

    The number of distinct rows changes at every step, the number of looked-up
    rows does not (batch size x lookups); padding to it keeps the shape the
    statistics see fixed, so XLA compiles them once instead of once per step.
    ``padding`` (float32 scalar) is the number of padded entries; zero rows
    change no norm and ``layer_statistics`` leaves them out of the zero fraction.
    ``rows``: the gradient's ``touched_rows``, if the caller already has them.
    """
    if not isinstance(grad, tf.IndexedSlices):
        return tf.convert_to_tensor(grad), tf.zeros((), tf.float32)
    values = deduplicate(grad, rows).values
    padded = _pad_rows(values, tf.shape(grad.values)[0])
    missing = tf.shape(padded)[0] - tf.shape(values)[0]
    return padded, tf.cast(missing * tf.reduce_prod(tf.shape(values)[1:]), tf.float32)


def touched_rows(grad: Any) -> tuple[tf.Tensor, tf.Tensor] | None:
    """``tf.unique(grad.indices)`` of an ``IndexedSlices`` gradient: the distinct rows
    it touches and where each lookup falls among them; None for a dense gradient.
    Computed once a step and shared by ``measured_weights`` and ``padded_gradient_values``."""
    return tuple(tf.unique(grad.indices)) if isinstance(grad, tf.IndexedSlices) else None


def measured_weights(
    variable: Any, grad: Any, rows: tuple[tf.Tensor, tf.Tensor] | None
) -> tf.Tensor:
    """The weights the statistics measure, read now: the whole variable, or, for a
    sparse gradient, only the ``rows`` it touches, zero-padded like its values.

    A sparse update moves only those rows (SGD, Adagrad, the bundled optimizers),
    so the step metrics stay exact, and ``weight_norm`` is the norm of the rows
    that the step used, the rows AGC and Clippy bound.  (An optimizer that moves
    every row, such as Adam's momentum, is measured on the touched rows only.)
    Reading only them keeps the monitor's cost in proportion to the batch, not to
    the embedding table.  Zero rows change no statistic.
    """
    if rows is None:
        return tf.identity(variable.value)
    return _pad_rows(tf.gather(variable.value, rows[0]), tf.shape(grad.indices)[0])


def _pad_rows(x: tf.Tensor, rows: tf.Tensor) -> tf.Tensor:
    """``x`` zero-padded along its first axis to ``rows`` rows."""
    paddings = tf.concat(
        [[[0, rows - tf.shape(x)[0]]], tf.zeros([tf.rank(x) - 1, 2], tf.int32)], axis=0
    )
    return tf.pad(x, paddings)


#: What the train step records per layer: the scalars that need a pass over the
#: variable.  Norms are kept as TF's ``L2Loss``, ``||x||_2^2 / 2`` (one kernel;
#: the rest waits for the flush).  ``step_weight_linf`` and ``clippy_excess`` are
#: measured on the step actually taken, eta * sigma * r; both are positively
#: homogeneous in it, so ``finish_statistics`` divides eta and sigma out after the max.
RAW_METRICS = (
    "grad_l2_loss",
    "weight_l2_loss",
    "step_weight_linf",
    "clippy_excess",
    "applied_factor",
    "entries",
    "nonfinite_count",
    "nonzero_count",
)


def step_reductions(
    grads: Sequence[Any],
    weights_before: Sequence[tf.Tensor],
    weights_after: Sequence[tf.Tensor],
    applied_factors: Sequence[tf.Tensor],
    thresholds: Thresholds,
    paddings: Sequence[Any] | None = None,
) -> tf.Tensor:
    """float32 ``[len(RAW_METRICS), num_layers]`` of one step.

    ``grads`` are dense (``dense_gradient_values`` of an IndexedSlices gradient, or
    ``padded_gradient_values`` with its ``padding``: trailing zero entries that
    are not part of the gradient); for sparse gradients the gradient metrics cover
    the touched rows only.
    """
    paddings = [0.0] * len(grads) if paddings is None else paddings
    grads = [tf.cast(g, tf.float32) for g in grads]
    per_layer = [
        _layer_reductions(g, wb, wa, f, thresholds, p)
        for g, wb, wa, f, p in zip(grads, weights_before, weights_after, applied_factors, paddings)
    ]
    # One stack of every scalar (one kernel): [layers, metrics] -> [metrics, layers].
    measured = tf.reshape(tf.stack([v for layer in per_layer for v in layer]), [len(grads), -1])
    grad_l2_loss = measured[:, RAW_METRICS.index("grad_l2_loss")]
    counts = _entry_counts(grads, tf.math.is_finite(tf.reduce_sum(grad_l2_loss)))
    return tf.transpose(tf.concat([measured, counts], axis=1))


def _entry_counts(grads: Sequence[tf.Tensor], all_finite: tf.Tensor) -> tf.Tensor:
    """``[layers, 2]``: the non-finite and the non-zero entries of each gradient.

    Usually every gradient is finite and its non-zero count is ``2 L2Loss(sign(g))``:
    two passes instead of the three of compare, cast and sum.  Only a step with
    a non-finite entry somewhere (``sum ||g||^2`` is then non-finite) counts entry
    by entry, as sign(NaN) is NaN.  Padded entries are zeros, never counted.
    """

    def finite() -> tf.Tensor:
        nonzero = 2.0 * tf.stack([tf.nn.l2_loss(tf.sign(g)) for g in grads])
        return tf.stack([tf.zeros_like(nonzero), nonzero], axis=1)

    def exact() -> tf.Tensor:
        count = lambda mask: tf.reduce_sum(tf.cast(mask, tf.float32))  # noqa: E731
        return tf.stack(
            [
                tf.stack([count(tf.logical_not(tf.math.is_finite(g))), count(tf.not_equal(g, 0.0))])
                for g in grads
            ]
        )

    return tf.cond(all_finite, finite, exact)


def _layer_reductions(
    g: tf.Tensor,
    weight_before: tf.Tensor,
    weight_after: tf.Tensor,
    applied_factor: tf.Tensor,
    thresholds: Thresholds,
    padding: Any,
) -> list[tf.Tensor]:
    """The ``RAW_METRICS`` of one variable up to ``entries``; the counts come from ``_entry_counts``."""
    w = tf.cast(weight_before, tf.float32)
    step = w - tf.cast(weight_after, tf.float32)  # eta * sigma * r: the step taken
    threshold = clipping.clippy_threshold(w, thresholds.lambda_rel, thresholds.lambda_abs)
    return [
        tf.nn.l2_loss(g),
        tf.nn.l2_loss(w),
        clipping.update_weight_linf(step, w),
        clipping.clippy_excess(step, threshold, threshold_positive=thresholds.lambda_abs > 0),
        tf.cast(applied_factor, tf.float32),
        tf.cast(tf.size(g), tf.float32) - tf.cast(padding, tf.float32),
    ]


def finish_statistics(
    raw: tf.Tensor, learning_rate: tf.Tensor, thresholds: Thresholds
) -> tf.Tensor:
    """``LAYER_METRICS`` from ``RAW_METRICS``: ``[..., len(RAW_METRICS), L]`` and a
    learning rate of shape ``[...]`` -> float32 ``[..., len(LAYER_METRICS), L]``.

    ``update_weight_linf`` (``||r/w||_inf``) and ``clippy_factor`` are measured on
    the *unclipped* update, as in the paper (eq. 4): when the optimizer already
    clipped by ``applied_factor`` sigma, it is divided back out with eta.  A layer
    whose step was scaled to nothing (sigma = 0) has no observable r: NaN.
    """
    r = _raw(raw)
    lr = tf.convert_to_tensor(learning_rate, tf.float32)[..., None]
    grad_norm, weight_norm = _norm(r["grad_l2_loss"]), _norm(r["weight_l2_loss"])
    applied = r["applied_factor"]
    unclipped = lambda x: tf.where(applied > 0, x / tf.where(applied > 0, applied, 1.0), np.nan)  # noqa: E731
    values = {
        "grad_norm": grad_norm,
        "weight_norm": weight_norm,
        "grad_weight_ratio": clipping.grad_weight_ratio(grad_norm, weight_norm),
        "update_weight_linf": unclipped(r["step_weight_linf"] / lr),
        "gc_factor": clipping.gc_factor(grad_norm, thresholds.gc_clipnorm),
        "agc_factor": clipping.agc_factor(grad_norm, weight_norm, thresholds.agc_clipping),
        "clippy_factor": clipping.clippy_sigma(unclipped(r["clippy_excess"])),
        "applied_factor": applied,
        "nonfinite_count": r["nonfinite_count"],
        "zero_grad_fraction": (r["entries"] - r["nonzero_count"]) / tf.maximum(r["entries"], 1.0),
    }
    return tf.stack([tf.cast(values[name], tf.float32) for name in LAYER_METRICS], axis=-2)


def global_gradient(raw: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """``(||g||_2 over all layers, every gradient entry finite)`` of each step of
    ``raw`` ``[..., len(RAW_METRICS), L]``: what the divergence detector reads."""
    r = _raw(raw)
    return _norm(tf.reduce_sum(r["grad_l2_loss"], axis=-1)), tf.equal(
        tf.reduce_sum(r["nonfinite_count"], axis=-1), 0.0
    )


def _raw(raw: tf.Tensor) -> dict[str, tf.Tensor]:
    raw = tf.convert_to_tensor(raw, tf.float32)
    return {name: raw[..., i, :] for i, name in enumerate(RAW_METRICS)}


def _norm(l2_loss: tf.Tensor) -> tf.Tensor:
    """``||x||_2`` from ``L2Loss(x) = ||x||_2^2 / 2`` (``clipping.l2_norm``)."""
    return tf.sqrt(2.0 * l2_loss)


def step_statistics(
    grads: Sequence[Any],
    weights_before: Sequence[tf.Tensor],
    weights_after: Sequence[tf.Tensor],
    learning_rate: tf.Tensor,
    applied_factors: Sequence[tf.Tensor],
    thresholds: Thresholds,
    paddings: Sequence[Any] | None = None,
) -> tf.Tensor:
    """float32 ``[len(LAYER_METRICS), num_layers]`` of one step: both halves at once."""
    raw = step_reductions(
        grads, weights_before, weights_after, applied_factors, thresholds, paddings
    )
    return finish_statistics(raw, learning_rate, thresholds)


def layer_statistics(
    grad: Any,
    weight_before: tf.Tensor,
    weight_after: tf.Tensor,
    learning_rate: tf.Tensor,
    applied_factor: tf.Tensor,
    thresholds: Thresholds,
    padding: Any = 0.0,
) -> tf.Tensor:
    """float32 ``[len(LAYER_METRICS)]`` for one variable at one step."""
    return step_statistics(
        [grad],
        [weight_before],
        [weight_after],
        learning_rate,
        [applied_factor],
        thresholds,
        [padding],
    )[:, 0]
