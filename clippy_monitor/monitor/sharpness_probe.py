"""The monitor's sharpness probe: ``DivergenceMonitor(..., sharpness_every=N)``.

:func:`clippy_monitor.sharpness.hessian_top_eigenvalue` runs eagerly, on the host,
between steps; the batch it needs is only ever seen inside the compiled train
step.  So the train step keeps it: on the step before each multiple of N
(``(step + 1) % N == 0``) a ``tf.cond`` copies the batch into device variables;
on every other step the cond does nothing (one comparison of two scalars).
Before the next step is dispatched (``on_train_batch_begin``: main thread, no
step running) the monitor probes that
batch at the weights that step starts from and writes the values in that step's
row.  Row ``t`` thus holds the top eigenvalue of the loss on the most recent
training batch (step ``t - 1``'s) at the weights step ``t`` starts from, the
weights whose loss row ``t`` records.  With ``steps_per_execution`` k the host
sees the weights only between executions: they may be up to k - 1 steps newer
than the batch, and a probe falls on the first step of an execution.

A kept tensor lives in a buffer of fixed shape (padded, with its true shape
beside it), so the step also compiles under XLA, where a variable cannot change
shape.  The first step of each fit is kept too, and the buffers take their shape
from it (one host read of the shapes after the first step where they were made);
a larger batch later grows them, losing that probe.

Around an onset the probe can run densely (``onset_every``): when a flush finds the
detector with an episode open, or reports a divergence, the host calls
:meth:`SharpnessProbe.densify` and, until ``until``, batches are kept and probed every
``onset_every`` steps instead of every ``every``; then the period returns to ``every``.
The device keeps its period in a variable, so switching costs two assignments.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from clippy_monitor.sharpness import hessian_top_eigenvalue
from clippy_monitor.sharpness_reading import PRECONDITIONED, SHARPNESS

_log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Slot:
    """One tensor of the kept batch: a buffer at least its shape, and its shape."""

    buffer: tf.Variable
    shape: tf.Variable

    @classmethod
    def like(cls, tensor: tf.Tensor) -> _Slot:
        """Buffers for ``tensor`` (call eagerly): its static shape, unknown sizes 0."""
        static = [d or 0 for d in tensor.shape]
        buffer = tf.Variable(
            tf.zeros(static, tensor.dtype),
            shape=tf.TensorShape(None),
            validate_shape=False,
            trainable=False,
            name="clippy_kept_batch",
        )
        shape = tf.Variable(tf.zeros([len(static)], tf.int32), trainable=False)
        return cls(buffer, shape)

    def write(self, tensor: tf.Tensor) -> None:
        """Copy ``tensor``, cut and zero-padded to the buffer's shape, and its shape."""
        target = tf.shape(self.buffer)
        size = tf.minimum(tf.shape(tensor), target)
        part = tf.slice(tensor, tf.zeros_like(size), size)
        padding = tf.stack([tf.zeros_like(size), target - size], axis=1)
        self.buffer.assign(tf.pad(part, padding), read_value=False)
        self.shape.assign(tf.shape(tensor), read_value=False)

    def fits(self) -> bool:
        """Whether the kept tensor fitted in the buffer (host read)."""
        return bool(np.all(self.shape.numpy() <= tf.shape(self.buffer).numpy()))

    def grow(self) -> None:
        """Make the buffer the kept tensor's shape (host; its next write fits)."""
        self.buffer.assign(tf.zeros(self.shape.numpy(), self.buffer.dtype), read_value=False)

    def value(self) -> tf.Tensor:
        """The kept tensor, its padding cut off."""
        return tf.slice(self.buffer, tf.zeros_like(self.shape), self.shape)


class SharpnessProbe:
    """Keeps a training batch every ``every`` steps (device) and probes it (host).

    ``step``: the recorder's device step counter (the number of the step running).
    ``preconditioned``: also probe ``P^1/2 H P^1/2`` (the optimizer must support it).
    ``onset_every``: the period while :meth:`densify` holds (None: never denser).
    """

    def __init__(
        self,
        every: int,
        step: tf.Variable,
        preconditioned: bool,
        onset_every: int | None = None,
    ) -> None:
        self.every = every
        self.onset_every = onset_every
        self.preconditioned = preconditioned
        self._step = step
        self._period = every  # the host's copy of ``period``
        self._dense_until = -1  # densify's last ``until``
        self.kept_step = tf.Variable(tf.constant(-1, tf.int64), trainable=False)
        self.period = tf.Variable(tf.constant(every, tf.int64), trainable=False)
        # The next step to keep: the first of each fit (it sizes the buffers), then each
        # step before a multiple of ``every``; one comparison on the other steps.
        self.keep_at = tf.Variable(tf.constant(0, tf.int64), trainable=False)
        self._slots: list[_Slot | None] | None = None  # per leaf of the batch; None leaves
        self._structure: Any = None
        self._sized = False  # the buffers were checked against a kept batch
        self._last = -1  # the kept step probed last
        self._estimate = 0  # the host's count of the next step
        self._next_check = 0  # read the device once the count reaches it
        self.failed = False

    # ------------------------------------------------------------ device
    def keep(self, data: Any) -> None:
        """In the train step, before the update: keep ``data`` if the next step is due."""
        leaves = tf.nest.flatten(data)
        if not all(
            t is None or (isinstance(t, tf.Tensor) and t.shape.rank is not None) for t in leaves
        ):
            _log.warning(
                "the sharpness probe keeps dense tensors of known rank only (this batch has a "
                "sparse or ragged one): it is off for this run"
            )
            self.failed = True
            return
        if not self._same_layout(data, leaves):
            with tf.init_scope():
                self._slots = [None if t is None else _Slot.like(t) for t in leaves]
                self._structure = tf.nest.map_structure(lambda _: 0, data)
                self._sized = False
        step = tf.convert_to_tensor(self._step)

        def write() -> tf.Tensor:
            for slot, tensor in zip(self._slots, leaves):
                if slot is not None:
                    slot.write(tensor)
            self.kept_step.assign(step, read_value=False)
            period = tf.convert_to_tensor(self.period)
            after = (step + 1) // period * period + period - 1
            self.keep_at.assign(after, read_value=False)
            return tf.constant(True)

        tf.cond(step >= self.keep_at, write, lambda: tf.constant(False))

    def _same_layout(self, data: Any, leaves: list) -> bool:
        """Whether the buffers were made for a batch of this structure, ranks and dtypes."""
        if self._slots is None:
            return False
        try:
            tf.nest.assert_same_structure(self._structure, data)
        except (TypeError, ValueError):
            return False
        return all(
            (s is None) == (t is None)
            and (s is None or (s.buffer.dtype == t.dtype and s.shape.shape[0] == t.shape.rank))
            for s, t in zip(self._slots, leaves)
        )

    # -------------------------------------------------------------- host
    def start(self, step: int) -> None:
        """Training starts (or resumes) at ``step``: a probe is due at the first multiple
        of ``every`` from it on (at ``step`` itself only with the batch before it kept)."""
        self._estimate, self._last = step, -1
        self._set_period(self.every)
        self._dense_until = -1
        self._next_check = -(-step // self.every) * self.every
        self.keep_at.assign(step)

    def densify(self, next_step: int, until: int) -> None:
        """Probe every ``onset_every`` steps from ``next_step`` (the next step to run) until
        step ``until``; a later call extends the window.  No-op without ``onset_every``."""
        if self.onset_every is None or until <= next_step:
            return
        self._dense_until = max(self._dense_until, until)
        if self._period != self.onset_every:
            self._set_period(self.onset_every)
            self.keep_at.assign(next_step)  # keep the next step's batch: probed after it
            self._next_check = min(self._next_check, next_step + 1)

    def _relax(self, step: int) -> None:
        """Back to every ``every`` steps once the dense window has passed ``step``."""
        if self._period != self.every and step >= self._dense_until:
            self._set_period(self.every)
            self.keep_at.assign((step // self.every + 1) * self.every - 1)

    def _set_period(self, period: int) -> None:
        self._period = period
        self.period.assign(period)

    def take(self, dispatch: int) -> tuple[int, Any] | None:
        """Before ``dispatch`` steps are dispatched: ``(next step, kept batch)`` when a probe
        is due, else None.  Reads the device only once per ``every`` steps."""
        if self._slots is not None and not self._sized:
            self._size()
        estimate, self._estimate = self._estimate, self._estimate + dispatch
        if estimate < self._next_check:
            return None
        if self._slots is None:  # the train step has not run yet: nothing kept
            self._next_check = (estimate // self._period + 1) * self._period
            return None
        step, kept = int(self._step.numpy()), int(self.kept_step.numpy())
        self._estimate = step + dispatch
        self._relax(step)
        self._next_check = (step // self._period + 1) * self._period
        if kept <= self._last or not 0 < step - kept <= max(dispatch, 1):
            return None  # nothing new, or kept before a rollback, a resume or a gap
        self._last = kept
        if not self._size():
            return None
        leaves = [None if s is None else s.value() for s in self._slots]
        return step, tf.nest.pack_sequence_as(self._structure, leaves)

    def _size(self) -> bool:
        """Grow buffers too small for the kept batch (dropping it: False); mark them sized."""
        small = [s for s in self._slots if s is not None and not s.fits()]
        for slot in small:
            slot.grow()
        if small:
            self.kept_step.assign(-1)
        self._sized = True
        return not small

    def measure(self, model: keras.Model, batch: Any) -> dict[str, float]:
        """``{sharpness, preconditioned_sharpness}`` of ``model`` on ``batch`` (NaN where not
        measured); a probe that fails says why once and turns the probe off."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(batch)
        values = {SHARPNESS: np.nan, PRECONDITIONED: np.nan}
        try:
            values[SHARPNESS] = hessian_top_eigenvalue(model, x, y, sample_weight).value
            if self.preconditioned:
                values[PRECONDITIONED] = hessian_top_eigenvalue(
                    model, x, y, sample_weight, preconditioned=True
                ).value
        except (ValueError, TypeError, tf.errors.OpError) as err:
            _log.warning("the sharpness probe failed and is off for this run: %s", err)
            self.failed = True
        return values
