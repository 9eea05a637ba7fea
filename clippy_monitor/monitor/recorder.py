"""The device buffer: one row per training step, written inside the compiled step.

``StepRecorder.record`` runs in the train function (also under XLA and
``tf.distribute``): it measures the step (``step_reductions``: a few passes per
variable) and writes one row into ring buffers that live on the device.  Once
per flush, ``read_new_rows`` turns the buffered rows into statistics and runs
the divergence detector over them, still on the device, in one compiled call
(``finish_statistics`` and ``DivergenceDetector.scan``), and brings the result to
the host: one transfer per flush, never one per step.  The detector therefore
sees every step, in order, exactly as if it ran inside the step, at no per-step
cost; its state lives on the host between flushes (and in the run record).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from clippy_monitor.monitor.detectors import DetectorConfig, DivergenceDetector, dead_layer_signal
from clippy_monitor.monitor.statistics import (
    RAW_METRICS,
    Thresholds,
    finish_statistics,
    global_gradient,
    padded_gradient_values,
    step_reductions,
)
from clippy_monitor.record.format import LAYER_METRICS
from clippy_monitor.recovered import SKIP_BOUND, SKIPPED

_log = logging.getLogger(__name__)


#: Per-step series of the skip rung (``monitor.skipping``), recorded when it is on:
#: 1.0 where the update was skipped, else 0.0; the norm bound the step was checked against.
SKIP_SERIES = (SKIPPED, SKIP_BOUND)


def series_names(tasks: Sequence[str], skipping: bool = False) -> list[str]:
    """Per-step series, in record order: total loss, task losses, lr, global grad norm,
    detector, and with ``skipping`` the ``SKIP_SERIES``."""
    return [
        "loss",
        *(f"loss/{t}" for t in tasks),
        "learning_rate",
        "grad_norm",
        *DivergenceDetector.OUTPUT_NAMES,
        *(SKIP_SERIES if skipping else ()),
    ]


def replicated_variable(initial_value: Any, name: str) -> tf.Variable:
    """A non-trainable device variable that every replica writes alike.

    ``ONLY_FIRST_REPLICA``: under ``tf.distribute`` every replica computes the same
    (all-reduced) value; the first replica's write is kept on all devices.
    """
    return tf.Variable(
        initial_value,
        trainable=False,
        name=name,
        synchronization=tf.VariableSynchronization.ON_WRITE,
        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
    )


class StepRecorder:
    """Ring buffers of ``capacity`` steps on the device, and the detector state on the host."""

    def __init__(
        self,
        layers: Sequence[str],
        tasks: Sequence[str],
        capacity: int,
        thresholds: Thresholds | None = None,
        detector_config: DetectorConfig | None = None,
        xla: bool = True,
        skipping: bool = False,
        track_offset: bool = False,
        host_series: Sequence[str] = (),
    ) -> None:
        self.layers = list(layers)
        self.tasks = list(tasks)
        self.skipping = skipping
        # Record step - optimizer.iterations: skipped steps and rollbacks move it. Saved
        # with each chunk (``saved_state``) when tracked, so a resumed run numbers right.
        self.track_offset = track_offset or skipping
        self.iteration_offset = 0
        # Series measured on the host (the sharpness probe), after the device's: NaN in a
        # row unless ``set_host_values`` gave that step a value before its flush.
        self.host_series = list(host_series)
        self.series = series_names(tasks, skipping) + self.host_series
        self._host_values: dict[int, dict[str, float]] = {}
        self.capacity = capacity
        self.thresholds = thresholds or Thresholds()
        self.detector = DivergenceDetector(1 + len(tasks), detector_config or DetectorConfig())
        self.step = replicated_variable(tf.constant(0, tf.int64), "clippy_step")
        self.raw_buffer = replicated_variable(
            tf.zeros([capacity, len(RAW_METRICS), len(self.layers)]), "clippy_raw_buffer"
        )
        # Per step: total loss, task losses, learning rate (and the SKIP_SERIES).
        self.loss_buffer = replicated_variable(
            tf.zeros([capacity, 2 + len(tasks) + (len(SKIP_SERIES) if skipping else 0)]),
            "clippy_loss_buffer",
        )
        self.detector_state = self.detector.initial_state().numpy()
        # Layers that have had a gradient below the dead-layer share, carried across
        # flushes and saved with the detector state (``saved_state``).
        self.alive = np.zeros(len(self.layers), bool)
        self._host_step = 0  # first step not yet read by the host
        self._overflow_skips = False
        # Per loss series (total, tasks): False where the train step never shows that
        # loss (set while tracing); the detector then ignores the series.
        self.loss_measured = [True] * (1 + len(self.tasks))
        # The per-variable passes are many small ops; compiled with XLA they run as
        # one launch per step instead of one executor dispatch per op.
        self._reduce = tf.function(self._reductions, jit_compile=xla, autograph=False)
        # XLA makes the detector's loop over the buffered steps one kernel; the
        # graph executor is the fallback where XLA is unavailable.
        self._finish_fns = {
            jit: tf.function(self._finish, jit_compile=jit, autograph=False)
            for jit in (True, False)
        }
        self._finish_xla = True

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
        rows: Sequence[Any] | None = None,
        skip: Sequence[tf.Tensor] = (),
        padded: Sequence[tuple[tf.Tensor, tf.Tensor]] | None = None,
    ) -> None:
        """Write the row of this step (call inside the train function, after the update).

        ``losses`` is ``[total, *task_losses]`` as scalars, already global (not per replica).
        ``overflow_skips``: the optimizer uses a dynamic loss scale (``LossScaleOptimizer``),
        which skips a step whose scaled gradients overflow and lowers the scale.  Such a
        step is routine, not a divergence: the row still shows the non-finite gradients,
        but the detector sees them as "not measured" (a non-finite loss still counts).
        ``rows``: each gradient's ``touched_rows``, if the caller already has them.
        ``skip``: with skipping on, ``(skipped, bound)`` of this step (``SKIP_SERIES``).
        ``padded``: each gradient's ``padded_gradient_values``, if the caller already has
        them (then ``rows`` is not needed).
        """
        self._overflow_skips = bool(
            overflow_skips
        )  # set while tracing; read when _finish is traced
        if padded is None:
            rows = [None] * len(grads) if rows is None else rows
            padded = [padded_gradient_values(g, r) for g, r in zip(grads, rows)]
        # tf.unique (sparse) stays outside XLA; padding keeps the shapes XLA sees fixed.
        grads, paddings = zip(*padded) if padded else ((), ())
        raw = self._reduce(
            list(grads),
            list(paddings),
            list(weights_before),
            list(weights_after),
            [tf.cast(f, tf.float32) for f in applied_factors],
        )
        row = tf.stack([tf.cast(v, tf.float32) for v in [*losses, learning_rate, *skip]])
        # scatter_update, not scatter_nd_update: distributed (mirrored) variables
        # implement only the former.
        index = tf.math.floormod(self.step, self.capacity)[None]
        self.raw_buffer.scatter_update(tf.IndexedSlices(raw[None], index))
        self.loss_buffer.scatter_update(tf.IndexedSlices(row[None], index))
        self.step.assign_add(1)

    def replace_loss(self, loss: tf.Tensor) -> None:
        """Overwrite the total loss of the step just recorded (call after ``record``).

        For a train step whose loss the monitor only sees in the logs it returns.
        """
        index = tf.math.floormod(self.step - 1, self.capacity)[None]
        row = tf.gather(self.loss_buffer, index)
        row = tf.concat([tf.reshape(tf.cast(loss, tf.float32), [1, 1]), row[:, 1:]], axis=1)
        self.loss_buffer.scatter_update(tf.IndexedSlices(row, index))

    def _reductions(self, grads, paddings, weights_before, weights_after, applied_factors):
        return step_reductions(
            grads, weights_before, weights_after, applied_factors, self.thresholds, paddings
        )

    def _finish(
        self, start: tf.Tensor, count: tf.Tensor, state: tf.Tensor, alive: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
        """All ``capacity`` rows from ring position ``start`` on, the first ``count`` of them
        new: (layer statistics, per-step series, detector state and alive layers after the new rows)."""
        rows = tf.math.floormod(start + tf.range(self.capacity), self.capacity)
        raw = tf.gather(self.raw_buffer, rows)
        base = tf.gather(self.loss_buffer, rows)
        n = 1 + len(self.tasks)
        losses, learning_rate, skip = base[:, :n], base[:, n], base[:, n + 1 :]
        # A skipped step changed nothing: the detector does not see it.
        valid = tf.range(self.capacity) < count
        if self.skipping:
            valid &= skip[:, 0] < 0.5
        # An unseen loss (recorded as NaN) must never read as a divergence: the
        # detector gets a constant, so only its gradient tests remain.
        detector_losses = tf.where(tf.constant(self.loss_measured)[None, :], losses, 0.0)
        stats = finish_statistics(raw, learning_rate, self.thresholds)
        grad_norm, grads_finite = global_gradient(raw)
        detector_norm = grad_norm
        if self._overflow_skips:  # a skipped overflow step: gradients "not measured" (-1)
            detector_norm = tf.where(grads_finite, grad_norm, -1.0)
            grads_finite = tf.ones_like(grads_finite)
        zero_share = stats[:, LAYER_METRICS.index("zero_grad_fraction")]
        dead, alive = dead_layer_signal(
            zero_share, alive, self.detector.config.dead_layer_share, valid
        )
        state, outputs = self.detector.scan(
            state, detector_losses, detector_norm, grads_finite, valid, dead_layer=dead
        )
        series = tf.concat(
            [losses, learning_rate[:, None], grad_norm[:, None], outputs, skip], axis=1
        )
        return stats, series, state, alive

    # ------------------------------------------------------------------ host
    @property
    def state_size(self) -> int:
        """Length of ``saved_state``: the detector state, one 0/1 per layer (``alive``),
        and, when tracked, the ``iteration_offset``."""
        return self.detector.state_size + len(self.layers) + int(self.track_offset)

    @property
    def next_unread_step(self) -> int:
        """The first step ``read_new_rows`` has not returned yet."""
        return self._host_step

    def saved_state(self) -> np.ndarray:
        """float32 ``[state_size]``: what the run record saves with each chunk, so that a
        resumed run continues both the detector and the dead-layer test where they were."""
        offset = [float(self.iteration_offset)] if self.track_offset else []
        return np.concatenate(
            [self.detector_state, self.alive.astype(np.float32), np.float32(offset)]
        )

    def start_at(self, step: int, saved_state: np.ndarray | None = None) -> None:
        """Set the step counter (e.g. from ``optimizer.iterations`` on resume) and the
        ``saved_state`` of the record's chunk before it (None: a fresh start)."""
        self.step.assign(step)
        self._host_step = step
        self._host_values.clear()
        if saved_state is None:
            self.detector_state = self.detector.initial_state().numpy()
            self.alive = np.zeros(len(self.layers), bool)
            return
        saved_state = np.asarray(saved_state, np.float32).reshape(self.state_size)
        if not np.all(np.isfinite(saved_state)):
            # The detector never writes inf or NaN into its state: the record was damaged.
            _log.warning(
                "the record's detector state before step %d is not finite; the detector starts afresh",
                step,
            )
            self.start_at(step)
            return
        size, layers = self.detector.state_size, len(self.layers)
        self.detector_state = saved_state[:size].copy()
        self.alive = saved_state[size : size + layers] > 0.5
        if self.track_offset:
            self.iteration_offset = int(round(float(saved_state[-1])))

    def set_host_values(self, step: int, values: dict[str, float]) -> None:
        """Values of ``host_series`` for ``step`` (which may not have run yet), written
        into its row when a flush reads it."""
        self._host_values.setdefault(step, {}).update(values)

    def _with_host_values(self, steps: np.ndarray, series: np.ndarray) -> np.ndarray:
        """``series`` (the device's columns) with the ``host_series`` columns appended."""
        if not self.host_series:
            return series
        host = np.full((len(steps), len(self.host_series)), np.nan, series.dtype)
        first = int(steps[0]) if len(steps) else 0
        # A copy of the keys: the main thread may add a step while a flush runs elsewhere.
        for step in [s for s in list(self._host_values) if s < first + len(steps)]:
            values = self._host_values.pop(step, {})
            if step >= first:
                for name, value in values.items():
                    host[step - first, self.host_series.index(name)] = value
        return np.concatenate([series, host], axis=1)

    def read_new_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
        """Rows written since the last read: (steps, layer_stats, series, saved_state, lost).

        One compiled call on the device and one device-to-host transfer.  ``lost``
        counts rows overwritten before they were read (only if the host flushed less
        often than ``capacity`` steps).
        """
        end = int(self.step.numpy())
        start = max(self._host_step, end - self.capacity)
        lost = start - self._host_step
        steps = np.arange(start, end, dtype=np.int64)
        self._host_step = end
        if len(steps) == 0:
            empty = np.zeros((0, len(LAYER_METRICS), len(self.layers)), np.float32)
            return (
                steps,
                empty,
                np.zeros((0, len(self.series)), np.float32),
                self.saved_state(),
                lost,
            )
        args = (
            tf.constant(start % self.capacity),
            tf.constant(len(steps)),
            tf.constant(self.detector_state),
            tf.constant(self.alive),
        )
        try:
            stats, series, state, alive = self._finish_fns[self._finish_xla](*args)
        except (
            tf.errors.UnimplementedError,
            tf.errors.InvalidArgumentError,
            tf.errors.InternalError,
        ) as err:
            if not self._finish_xla:
                raise
            _log.warning(
                "XLA unavailable for the monitor's flush (%s); using the graph executor", err
            )
            self._finish_xla = False
            stats, series, state, alive = self._finish_fns[False](*args)
        self.detector_state = state.numpy()
        self.alive = alive.numpy()
        series = self._with_host_values(steps, series.numpy()[: len(steps)])
        if self.skipping:  # a skipped step did not advance optimizer.iterations
            skipped = series[:, self.series.index(SKIPPED)] > 0.5
            self.iteration_offset += int(np.count_nonzero(skipped))
        return steps, stats.numpy()[: len(steps)], series, self.saved_state(), lost
