"""The device buffer: one row per training step, written inside the compiled step.

``StepRecorder.record`` runs in the train function (also under XLA and
``tf.distribute``): it computes the step's statistics, advances the divergence
detector and writes one row into ring buffers that live on the device.  The
host reads the buffers once per flush (``read_new_rows``), never per step.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import tensorflow as tf

from clippy_monitor.monitor.detectors import DetectorConfig, DivergenceDetector
from clippy_monitor.monitor.statistics import Thresholds, padded_gradient_values, step_statistics
from clippy_monitor.record.format import LAYER_METRICS


def series_names(tasks: Sequence[str]) -> list[str]:
    """Per-step series, in buffer order: total loss, task losses, lr, global grad norm, detector."""
    return ["loss", *(f"loss/{t}" for t in tasks), "learning_rate", "grad_norm", *DivergenceDetector.OUTPUT_NAMES]


def _device_variable(initial_value: Any, name: str) -> tf.Variable:
    # ONLY_FIRST_REPLICA: under tf.distribute every replica computes the same
    # (all-reduced) row; the first replica's write is kept on all devices.
    return tf.Variable(
        initial_value,
        trainable=False,
        name=name,
        synchronization=tf.VariableSynchronization.ON_WRITE,
        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
    )


class StepRecorder:
    """Ring buffers of ``capacity`` steps plus the detector state, on the device."""

    def __init__(
        self,
        layers: Sequence[str],
        tasks: Sequence[str],
        capacity: int,
        thresholds: Thresholds = Thresholds(),
        detector_config: DetectorConfig = DetectorConfig(),
        xla: bool = True,
    ) -> None:
        self.layers = list(layers)
        self.tasks = list(tasks)
        self.series = series_names(tasks)
        self.capacity = capacity
        self.thresholds = thresholds
        self.detector = DivergenceDetector(1 + len(tasks), detector_config)
        n_layers, n_metrics = len(self.layers), len(LAYER_METRICS)
        self.step = _device_variable(tf.constant(0, tf.int64), "clippy_step")
        self.layer_buffer = _device_variable(tf.zeros([capacity, n_metrics, n_layers]), "clippy_layer_buffer")
        self.series_buffer = _device_variable(tf.zeros([capacity, len(self.series)]), "clippy_series_buffer")
        self.detector_state = _device_variable(self.detector.initial_state(), "clippy_detector_state")
        self._host_step = 0  # first step not yet read by the host
        # The statistics and the detector are a few hundred small ops; compiled
        # with XLA they run as one fused kernel launch per step instead of one
        # executor dispatch per op, which is what made them cost on small models.
        self._compute_row = tf.function(self._row, jit_compile=xla, autograph=False)

    # ---------------------------------------------------------------- device
    def record(
        self,
        grads: Sequence[Any],
        weights_before: Sequence[tf.Tensor],
        weights_after: Sequence[tf.Tensor],
        learning_rate: tf.Tensor,
        applied_factors: Sequence[tf.Tensor],
        losses: Sequence[tf.Tensor],
        overflow_skips: bool = False,
    ) -> None:
        """Write the row of this step (call inside the train function, after the update).

        ``losses`` is ``[total, *task_losses]`` as scalars, already global (not per replica).
        ``overflow_skips``: the optimizer uses a dynamic loss scale (``LossScaleOptimizer``),
        which skips a step whose scaled gradients overflow and lowers the scale.  Such a
        step is routine, not a divergence: the row still shows the non-finite gradients,
        but the detector sees them as "not measured" (a non-finite loss still counts).
        """
        # tf.unique (sparse) stays outside XLA; padding keeps the shapes XLA sees fixed.
        grads, paddings = zip(*[padded_gradient_values(g) for g in grads]) if grads else ((), ())
        stats, row, state = self._compute_row(
            list(grads), list(paddings), list(weights_before), list(weights_after), tf.cast(learning_rate, tf.float32),
            [tf.cast(f, tf.float32) for f in applied_factors], tf.stack([tf.cast(l, tf.float32) for l in losses]),
            self.detector_state.read_value(), bool(overflow_skips),
        )
        # scatter_update, not scatter_nd_update: distributed (mirrored) variables
        # implement only the former.
        index = tf.math.floormod(self.step, self.capacity)[None]
        self.layer_buffer.scatter_update(tf.IndexedSlices(stats[None], index))
        self.series_buffer.scatter_update(tf.IndexedSlices(row[None], index))
        self.detector_state.assign(state)
        self.step.assign_add(1)

    def _row(self, grads, paddings, weights_before, weights_after, learning_rate, applied_factors, loss_vector,
             detector_state, overflow_skips=False):
        """Pure function of one step: (layer stats, per-step series row, new detector state)."""
        stats = step_statistics(grads, weights_before, weights_after, learning_rate, applied_factors, self.thresholds, paddings)
        grad_norm = tf.sqrt(tf.reduce_sum(tf.square(stats[LAYER_METRICS.index("grad_norm")])))
        nonfinite = tf.reduce_sum(stats[LAYER_METRICS.index("nonfinite_count")])
        grads_finite = tf.equal(nonfinite, 0.0)
        detector_norm = grad_norm
        if overflow_skips:  # a skipped overflow step: gradients "not measured" (-1)
            detector_norm = tf.where(grads_finite, grad_norm, -1.0)
            grads_finite = tf.constant(True)
        state, outputs = self.detector.step(detector_state, loss_vector, detector_norm, grads_finite)
        row = tf.concat([loss_vector, tf.stack([learning_rate, grad_norm]), outputs], axis=0)
        return stats, row, state

    # ------------------------------------------------------------------ host
    def start_at(self, step: int, detector_state: np.ndarray | None = None) -> None:
        """Set the step counter (e.g. from ``optimizer.iterations`` on resume) and detector state."""
        self.step.assign(step)
        self._host_step = step
        self.detector_state.assign(self.detector.initial_state() if detector_state is None else detector_state)

    def read_new_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
        """Rows written since the last read: (steps, layer_stats, series, detector_state, lost).

        One device-to-host transfer.  ``lost`` counts rows overwritten before they
        were read (only if the host flushed less often than ``capacity`` steps).
        """
        end = int(self.step.numpy())
        layer_buffer, series_buffer, state = self.layer_buffer.numpy(), self.series_buffer.numpy(), self.detector_state.numpy()
        start = max(self._host_step, end - self.capacity)
        lost = start - self._host_step
        steps = np.arange(start, end, dtype=np.int64)
        rows = steps % self.capacity
        self._host_step = end
        return steps, layer_buffer[rows], series_buffer[rows], state, lost
