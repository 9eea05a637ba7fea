"""What a counterfactual replay needs: ``DivergenceMonitor(..., keep_replay=True)``.

Two things, so that ``clippy_monitor.replay`` can train the divergence again with
another optimizer and prove it sees the same data:

* **Batch fingerprints**: inside the train step, a float32 hash of the batch
  (:func:`batch_fingerprint`) is written into a device ring buffer at the step's
  row; a flush reads the buffer with the other rows (no host sync per step) and
  the record gets the per-step series ``batch_fingerprint``.
* **One snapshot** of the model's and the optimizer's variables before step-a of
  the first full divergence: snapshots are taken every ``every`` steps between
  steps (as ``.npz`` files in ``<logdir>/replay/``) and kept as the recovery
  ladder keeps its own (``SnapshotStore``: every unconfirmed one, the newest two
  confirmed healthy).  When a flush finds the first full divergence, the newest
  snapshot at or before its step-a stays, the others are deleted, and
  ``<logdir>/replay/replay.json`` (``replay_reading.KeptSnapshot``) says which it is.
  After that no snapshot is taken.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from clippy_monitor.monitor.recorder import replicated_variable
from clippy_monitor.monitor.recovery import RecoveryConfig
from clippy_monitor.monitor.rollback import SnapshotStore
from clippy_monitor.replay_reading import REPLAY_DIR, KeptSnapshot

_log = logging.getLogger(__name__)

_PRIME = 2147483647  # 2^31 - 1: a Lehmer generator's modulus (products stay below 2^62)
_MULTIPLIER = 48271


def _weights(count: tf.Tensor, salt: int) -> tf.Tensor:
    """``count`` pseudo-random float32 weights in [-0.5, 0.5), the same on every device."""
    index = tf.range(1, tf.cast(count, tf.int64) + 1, dtype=tf.int64)
    state = (index * _MULTIPLIER) % _PRIME
    state = ((state + 7919 * salt) * _MULTIPLIER) % _PRIME
    return tf.cast(state, tf.float32) / float(_PRIME) - 0.5


def batch_fingerprint(data: Any) -> tf.Tensor:
    """A float32 hash of a batch (every tensor of it: inputs, targets, sample weights).

    Per tensor, flattened to ``[rows, features]``: ``q^T X r`` with fixed pseudo-random
    weights ``q`` per row and ``r`` per feature (so a reordered batch differs too);
    NaN and infinities count as fixed finite values.  Traceable (the train step) and
    eager (a replay checking its batches) alike.
    """
    total = tf.zeros((), tf.float32)
    for salt, leaf in enumerate(tf.nest.flatten(data), start=1):
        if leaf is None:
            continue
        x = tf.cast(tf.convert_to_tensor(leaf), tf.float32)
        x = tf.reshape(x, [tf.shape(x)[0], -1]) if x.shape.rank else tf.reshape(x, [1, 1])
        x = tf.where(tf.math.is_nan(x), 7.0, x)
        x = tf.where(tf.math.is_inf(x), tf.sign(x) * 11.0, x)
        rows, features = tf.shape(x)[0], tf.shape(x)[1]
        per_row = tf.linalg.matvec(x, _weights(features, salt))
        total += tf.reduce_sum(per_row * _weights(rows, salt + 1000))
    return total


def same_fingerprint(a: float, b: float) -> bool:
    """Whether two fingerprints are of the same batch (float32 sums in another order)."""
    return abs(a - b) <= 1e-4 * (abs(a) + abs(b)) + 1e-6


class FingerprintBuffer:
    """A device ring buffer of ``capacity`` batch fingerprints, indexed by step."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.buffer = replicated_variable(tf.zeros([capacity]), "clippy_batch_fingerprints")

    def write(self, step: tf.Variable, data: Any) -> None:
        """In the train step, before the step's row is recorded: this batch's fingerprint."""
        index = tf.math.floormod(step, self.capacity)[None]
        value = batch_fingerprint(data)[None]
        self.buffer.scatter_update(tf.IndexedSlices(value, index))

    def read(self, steps: np.ndarray) -> np.ndarray:
        """The fingerprints of ``steps`` (host read; at most ``capacity`` recent steps)."""
        return self.buffer.numpy()[np.asarray(steps) % self.capacity]


class ReplayKeeper:
    """Keeps the snapshot before the first full divergence, in ``<logdir>/replay``."""

    def __init__(self, logdir: str, every: int, capacity: int) -> None:
        self.directory = Path(logdir) / REPLAY_DIR
        self.every = every
        self.kept = KeptSnapshot.read(self.directory)
        self.fingerprints = FingerprintBuffer(capacity)
        self.store = SnapshotStore(
            RecoveryConfig(snapshot_every=every, keep_snapshots=2, snapshot_dir=str(self.directory))
        )
        if self.kept is None:  # snapshots a former process left unconfirmed: no longer known
            for stale in self.directory.glob("snapshot-*.npz"):
                stale.unlink()
        self.since = every  # steps dispatched since the last snapshot
        self.names: tuple[list[str], list[str]] = ([], [])
        # take() runs between steps on the main thread, after_flush() maybe in Keras' callback thread.
        self._lock = threading.Lock()

    @property
    def done(self) -> bool:
        """Whether a snapshot was kept (or none could be): no more are taken."""
        return self.kept is not None

    def due(self) -> bool:
        return not self.done and self.since >= self.every

    def take(self, step: int, model_variables: Sequence[Any], optimizer_variables: Sequence[Any]):
        """Snapshot the state after ``step`` (between steps)."""
        self.since = 0
        last = self.store.snapshots[-1].step if self.store.snapshots else None
        if step < 0 or step == last:
            return
        with self._lock:
            if self.done:
                return
            self.names = ([v.path for v in model_variables], [v.path for v in optimizer_variables])
            self.store.take(step, list(model_variables) + list(optimizer_variables), None)

    def after_flush(self, last_step: int, events: Sequence[dict], pending: bool) -> None:
        """Confirm the snapshots up to ``last_step`` (nothing pending) or, at the first full
        divergence, keep the newest one at or before its step-a and delete the others."""
        with self._lock:
            if not self.done:
                self._after_flush(last_step, events, pending)

    def _after_flush(self, last_step: int, events: Sequence[dict], pending: bool) -> None:
        full = next((e for e in events if e.get("kind") == "full"), None)
        if full is None:
            if not pending:
                self.store.confirm(last_step)
            return
        step_a = full.get("step_a")
        chosen = self.store.before(step_a) if step_a is not None else None
        for snapshot in list(self.store.snapshots):
            if snapshot is not chosen:
                snapshot.discard()
        self.store.snapshots = [chosen] if chosen is not None else []
        if chosen is None:
            _log.warning(
                "keep_replay: no snapshot at or before step-a (%s) of the full divergence at "
                "step %s: nothing kept for a replay",
                step_a,
                full.get("step_c"),
            )
            self.kept = KeptSnapshot(
                -1,
                "",
                step_a,
                full["step_b"],
                full.get("step_c"),
                [],
                [],
                [],
                full.get("decided_at"),
            )
            self.kept.write(self.directory)
            return
        self.kept = KeptSnapshot(
            snapshot_step=chosen.step,
            file=chosen.path.name,
            step_a=step_a,
            step_b=int(full["step_b"]),
            step_c=full.get("step_c"),
            model_variables=self.names[0],
            optimizer_variables=self.names[1],
            shapes=[list(v.shape) for v in chosen.load()],
            decided_at=full.get("decided_at"),
        )
        self.kept.write(self.directory)
