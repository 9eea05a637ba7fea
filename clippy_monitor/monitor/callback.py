"""``DivergenceMonitor``: the one callback a user adds to ``model.fit``.

How it sees what Keras callbacks never see: at ``on_train_begin`` it wraps, on
the instances only, ``model.optimizer.apply`` (to see gradients and weights
before and after the update) and the compiled losses (to see each task's loss),
then rebuilds the train function so the recording runs inside it.  Nothing in
the user's model, compile call or optimizer changes, and everything is undone
at ``on_train_end``.  Every touch of Keras internals is in ``keras_hooks``.

A model with its own ``train_step`` is covered as long as it updates through
``self.optimizer.apply``/``apply_gradients`` (as Keras' own does).  Its loss is
the one ``self.compute_loss`` returns, or one passed to ``monitor.record_loss``
before the update; failing both, the ``"loss"`` entry of the logs the train step
returns.  With none of the three, loss-based detection is off for the run (said
once in the log): a loss the monitor cannot see never becomes a divergence.
``clippy_monitor.monitor.distributed`` shows a custom ``strategy.run`` loop.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from clippy_monitor.episodes import Event
from clippy_monitor.evaluations import (
    AUC_COLLAPSE,
    AucRule,
    Evaluation,
    as_metric,
    auc_collapse,
    is_auc,
)
from clippy_monitor.monitor import keras_hooks
from clippy_monitor.monitor.detectors import (
    DetectorConfig,
    DivergenceDetector,
    EventTracker,
)
from clippy_monitor.monitor.recorder import SKIP_SERIES, StepRecorder
from clippy_monitor.monitor.recovery import RecoveryConfig
from clippy_monitor.monitor.replay_keeper import ReplayKeeper
from clippy_monitor.monitor.rollback import RollbackLadder, Snapshot, Trigger
from clippy_monitor.monitor.sharpness_probe import SharpnessProbe
from clippy_monitor.monitor.skipping import Cooldown, SkipGuard, apply_unless, global_grad_norm
from clippy_monitor.monitor.statistics import (
    Thresholds,
    measured_weights,
    padded_gradient_values,
    touched_rows,
)
from clippy_monitor.record.format import LAYER_METRICS
from clippy_monitor.record.writer import (
    RunWriter,
    detector_state_at,
    recorded_events,
    resume_point,
    saved_states,
)
from clippy_monitor.replay_reading import FINGERPRINT
from clippy_monitor.sharpness import check_preconditioner
from clippy_monitor.sharpness_reading import SERIES as SHARPNESS_SERIES

_log = logging.getLogger(__name__)


def _global(value: tf.Tensor, reduce: str) -> tf.Tensor:
    """All-reduce across replicas when running on several (identity otherwise)."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return value
    return ctx.all_reduce(reduce, value)


def _check_options(
    flush_every: int,
    on_divergence: str | None,
    recovery: Any,
    skip_bad_steps: bool | None,
    sharpness_every: Any,
    sharpness_onset_every: Any,
    replay_snapshot_every: int,
    first_step: int | None,
) -> None:
    """``DivergenceMonitor``'s arguments that cannot work, as one clear error."""
    if flush_every < 1:
        raise ValueError(f"flush_every must be >= 1, got {flush_every}")
    _check_every("sharpness_every", sharpness_every)
    _check_every("sharpness_onset_every", sharpness_onset_every)
    if sharpness_onset_every is not None and sharpness_every is None:
        raise ValueError("sharpness_onset_every needs sharpness_every (the probe's usual period)")
    if on_divergence not in (None, "stop", "recover"):
        raise ValueError(f"on_divergence must be None, 'stop' or 'recover', got {on_divergence!r}")
    if recovery is not None and not isinstance(recovery, RecoveryConfig):
        raise TypeError(f"recovery must be a RecoveryConfig, got {type(recovery).__name__}")
    if replay_snapshot_every < 1:
        raise ValueError(f"replay_snapshot_every must be >= 1, got {replay_snapshot_every}")
    skipping = on_divergence == "recover" if skip_bad_steps is None else skip_bad_steps
    if first_step is not None and (on_divergence == "recover" or skipping):
        raise ValueError("first_step cannot be combined with recovery or skip_bad_steps")


def _is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the record: under a multi-worker strategy only the
    chief (task ``chief``, or ``worker`` 0 when the cluster has no chief) does."""
    resolver = getattr(strategy, "cluster_resolver", None)
    task_type = getattr(resolver, "task_type", None)
    if not task_type or task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type == "worker" and resolver.task_id == 0 and not has_chief


def _check_every(name: str, value: Any) -> None:
    """``value`` is None or an int >= 1 (ValueError naming ``name`` otherwise)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")


class DivergenceMonitor(keras.callbacks.Callback):
    """Record per-layer statistics at every step and detect loss divergence.

    Args:
        logdir: directory of the run record (also a TensorBoard logdir).
        flush_every: steps between host reads of the device buffer; at most this
            many steps are lost if the process is killed.
        thresholds: thresholds of the would-apply GC / AGC / Clippy factors.
        detector: ``DetectorConfig`` of the micro / full divergence detector.
        on_divergence: ``None`` (record only), ``"stop"``: stop training at the
            first flush after a full divergence, or ``"recover"``: the recovery
            ladder (skip bad steps, roll back to a healthy snapshot, give up after
            ``max_rollbacks``; ``monitor.recovery``).
        recovery: ``RecoveryConfig`` of the ladder (defaults: docs/RECOVERY.md).
        skip_bad_steps: skip bad steps on the device (rung 1 alone); on by
            default with ``on_divergence="recover"``.
        tensorboard: also write standard TensorBoard scalars.
        xla: compile the per-step reductions with XLA.  ``"auto"`` (default) does
            so on GPUs and TPUs, where one fused launch beats many small kernel
            launches; on a CPU, XLA's reductions are sequential loops and lose to
            TensorFlow's vectorised, threaded kernels even on a 25k-parameter
            model (docs/BENCHMARKS.md).  The once-per-flush detector pass always
            uses XLA where it is available.
        sharpness_every: every this many steps, measure the top eigenvalue of the
            loss Hessian on the latest training batch (``clippy_monitor.sharpness``;
            also preconditioned by the optimizer's step where it supports that), into
            the series ``sharpness`` and ``preconditioned_sharpness`` (NaN on the other
            steps).  The probe runs between steps; a step it is not due on pays one
            scalar comparison.  Off (None) by default; single-replica only
            (``monitor.sharpness_probe``).
        sharpness_onset_every: with ``sharpness_every``, probe every this many steps
            instead while the detector has an onset open (an episode after step-b not
            yet recovered or decided), and for ``flush_every`` steps after; the host
            checks the detector every ``recovery.check_every`` steps at most (it lowers
            ``flush_every`` to that), so dense probing starts within that many steps
            of the onset's confirmation.  Off (None) by default.
        keep_replay: keep what ``clippy_monitor.replay`` needs: the series
            ``batch_fingerprint`` (a hash of each batch, computed in the step) and, in
            ``<logdir>/replay/``, the snapshot of the weights and optimizer state taken
            before step-a of the first full divergence (``monitor.replay_keeper``);
            single-replica only.
        replay_snapshot_every: with ``keep_replay``, steps between those snapshots.
        first_step: number the first step this (instead of ``optimizer.iterations``):
            a replay's record lines up with the original's steps.  Not with recovery.
        auc_rule: when the evaluation AUCs given to :meth:`record_evaluation` (or
            Keras' ``val_*auc*`` logs) call a run fully diverged (``evaluations.AucRule``).
    """

    async_safe = True  # never needs the logs on the host per batch

    def __init__(
        self,
        logdir: str | os.PathLike,
        flush_every: int = 1000,
        thresholds: Thresholds | None = None,
        detector: DetectorConfig | None = None,
        on_divergence: str | None = None,
        tensorboard: bool = True,
        xla: bool | str = "auto",
        recovery: RecoveryConfig | None = None,
        skip_bad_steps: bool | None = None,
        sharpness_every: int | None = None,
        sharpness_onset_every: int | None = None,
        keep_replay: bool = False,
        replay_snapshot_every: int = 100,
        first_step: int | None = None,
        auc_rule: AucRule | None = None,
    ) -> None:
        super().__init__()
        _check_options(
            flush_every,
            on_divergence,
            recovery,
            skip_bad_steps,
            sharpness_every,
            sharpness_onset_every,
            replay_snapshot_every,
            first_step,
        )
        self.logdir = os.fspath(logdir)
        self.recovery = recovery or RecoveryConfig()
        self.skip_bad_steps = (
            on_divergence == "recover" if skip_bad_steps is None else skip_bad_steps
        )
        self._ladder = RollbackLadder(self.recovery) if on_divergence == "recover" else None
        if self._ladder is not None or sharpness_onset_every is not None:
            flush_every = min(flush_every, self.recovery.check_every)
        self.flush_every = flush_every
        self.thresholds = thresholds or Thresholds()
        self.detector_config = detector or DetectorConfig()
        self.on_divergence = on_divergence
        self.tensorboard = tensorboard
        self.xla = xla
        self.sharpness_every = sharpness_every
        self.sharpness_onset_every = sharpness_onset_every
        self._probe: SharpnessProbe | None = None
        self.keep_replay = keep_replay
        self.replay_snapshot_every = replay_snapshot_every
        self.first_step = first_step
        self.auc_rule = auc_rule or AucRule()
        self.events: list[dict] = []
        self._init_state()

    def _init_state(self) -> None:
        """The monitor's working state, before the first ``fit``."""
        self._replay: ReplayKeeper | None = None
        self.recorder: StepRecorder | None = None
        self._writer: RunWriter | None = None
        self._tracker: EventTracker | None = None
        self._detector_columns: list[int] = []  # of DivergenceDetector.OUTPUT_NAMES in the series
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self._pending_write: concurrent.futures.Future | None = None
        self._captured: dict[str, Any] = {}
        # Per replica thread, while a train step is traced: whether its update ran
        # without a captured loss (then the step's logs may still hold one).
        self._trace = threading.local()
        self._patches = keras_hooks.KerasPatches()
        self._steps_since_flush = 0
        self._batch_begin = 0
        self._start_unchecked = False
        self._monitored_train_function: Any = None
        self._monitored_key: tuple | None = None
        self._user_train_function: Any = None
        self._guard: SkipGuard | None = None
        self._cooldown: Cooldown | None = None
        self._flush_states: list[tuple[int, np.ndarray]] = []  # (last step, saved state)
        self._pending_trigger: Trigger | None = None  # seen by a flush, acted on between steps
        self._since_snapshot = self.recovery.snapshot_every  # steps dispatched since the last
        self._evaluations: list[Evaluation] = []  # given to record_evaluation
        self._auc_collapsed = False  # the AUC rule fired (once per record)
        self._unwritten: list[dict] = []  # events recorded before the writer existed

    # ------------------------------------------------------------ set-up
    def _tasks(self) -> list[str]:
        names = keras_hooks.compiled_output_names(self.model)
        return names if len(names) > 1 else []

    def _use_xla(self) -> bool:
        if self.xla != "auto":
            return bool(self.xla)
        return any(d.device_type in ("GPU", "TPU") for d in tf.config.list_logical_devices())

    def _build(self) -> None:
        variables = self.model.trainable_variables
        if not variables:
            raise ValueError(
                f"DivergenceMonitor({self.logdir}): the model has no trainable variables when training begins "
                "(a subclassed model not built yet?); call the model on one batch, or model.build(), before fit"
            )
        tasks = self._tasks()
        spe = int(getattr(self.model, "steps_per_execution", 1) or 1)
        probing = self._probing()
        replay_series = (FINGERPRINT,) if self._keeping_replay() else ()
        with self.model.distribute_strategy.scope():
            recorder = StepRecorder(
                [v.path for v in variables],
                tasks,
                self.flush_every + 2 * spe,
                self.thresholds,
                self.detector_config,
                self._use_xla(),
                skipping=self.skip_bad_steps,
                track_offset=self._ladder is not None,
                host_series=(SHARPNESS_SERIES if probing else ()) + replay_series,
            )
            if replay_series:
                self._replay = ReplayKeeper(
                    self.logdir, self.replay_snapshot_every, recorder.capacity
                )
            if self.skip_bad_steps:
                self._guard = SkipGuard(self.recovery)
            if self._ladder is not None:
                self._cooldown = Cooldown(self.recovery)
            probe = (
                SharpnessProbe(
                    self.sharpness_every,
                    recorder.step,
                    self._preconditioned(),
                    self.sharpness_onset_every,
                )
                if probing
                else None
            )
        meta = self._meta(recorder, tasks, probing, bool(replay_series))
        # Under a multi-worker strategy every worker records (the step's collectives
        # need all of them) and reads its buffer (events, on_divergence), but only
        # the chief writes.
        # A writer refused here (another process holds the record) leaves the monitor
        # unbuilt, so that a later fit tries again rather than training unrecorded.
        if _is_chief(self.model.distribute_strategy):
            self._writer = RunWriter(self.logdir, meta, tensorboard=self.tensorboard)
            self._writer.add_events(self._unwritten)
            self._unwritten = []
        self.recorder = recorder
        if self.first_step is not None:
            iterations = int(self.model.optimizer.iterations.numpy())
            recorder.iteration_offset = self.first_step - iterations
        self._probe = probe
        self._tracker = EventTracker(recorder.series)
        self._detector_columns = [
            recorder.series.index(name) for name in DivergenceDetector.OUTPUT_NAMES
        ]

    def _meta(
        self, recorder: StepRecorder, tasks: list[str], probing: bool, keeping_replay: bool
    ) -> dict:
        """The run record's meta (docs/RECORD_FORMAT.md)."""
        return {
            "layers": recorder.layers,
            "layer_metrics": list(LAYER_METRICS),
            "series": recorder.series,
            "tasks": tasks,
            "thresholds": self.thresholds.to_dict(),
            "detector": self.detector_config.to_dict(),
            "detector_state_size": recorder.state_size,
            "optimizer": keras.saving.serialize_keras_object(self.model.optimizer),
            "flush_every": self.flush_every,
            "on_divergence": self.on_divergence,
            "recovery": self.recovery.to_dict() if self.skip_bad_steps or self._ladder else None,
            "sharpness_every": self.sharpness_every if probing else None,
            "sharpness_onset_every": self.sharpness_onset_every if probing else None,
            "replay_snapshot_every": self.replay_snapshot_every if keeping_replay else None,
            "versions": {"keras": keras.__version__, "tensorflow": tf.__version__},
        }

    def _single_replica(self, option: str, asked: bool) -> bool:
        """Whether ``option`` (single-replica only) is on: asked for, and one replica (else
        said once)."""
        if not asked:
            return False
        if self.model.distribute_strategy.num_replicas_in_sync > 1:
            _log.warning(
                "DivergenceMonitor(%s): %s is not supported under a multi-replica strategy "
                "(the batch is split across replicas): it is off for this run",
                self.logdir,
                option,
            )
            return False
        return True

    def _probing(self) -> bool:
        """Whether to probe sharpness."""
        return self._single_replica("sharpness_every", self.sharpness_every is not None)

    def _keeping_replay(self) -> bool:
        """Whether to keep a replay's snapshot and fingerprints."""
        return self._single_replica("keep_replay", self.keep_replay)

    def _preconditioned(self) -> bool:
        """Whether the optimizer's step makes a preconditioned sharpness (else said once)."""
        try:
            check_preconditioner(keras_hooks.innermost(self.model.optimizer))
        except ValueError as err:
            _log.info(
                "DivergenceMonitor(%s): %s; preconditioned_sharpness stays NaN", self.logdir, err
            )
            return False
        return True

    def on_train_begin(self, logs: dict | None = None) -> None:
        first_time = self.recorder is None
        if first_time:
            self._build()
        self._sync_start(first_time)
        if self._probe is not None:
            self._probe.start(self.recorder.next_unread_step)
        self._start_unchecked = True
        self._install_hooks()
        # Trace the monitored train function once and reuse it in later fit() calls
        # (sequential training calls fit per day); restore the user's at the end.
        self._user_train_function = self.model.train_function
        key = (id(self.model), self.model.steps_per_execution, self.model.jit_compile)
        if self._monitored_train_function is not None and self._monitored_key == key:
            self.model.train_function = self._monitored_train_function
        else:
            self.model.make_train_function(force=True)
            self._monitored_train_function, self._monitored_key = self.model.train_function, key

    def _sync_start(self, force: bool) -> None:
        """Number the next step ``optimizer.iterations`` (plus the steps skipped or rolled
        back so far); on resume, restore the detector state."""
        iterations = int(self.model.optimizer.iterations.numpy())
        start = iterations + self.recorder.iteration_offset
        if not force and start == self.recorder.next_unread_step:
            return
        if self.recorder.track_offset:
            start, state = self._resume_by_iterations(iterations)
        else:
            last, state = resume_point(self.logdir)
            if last is not None and start <= last:
                state = detector_state_at(self.logdir, start - 1)
        self.recorder.start_at(start, state)
        if not self._evaluations:
            self._reload_evaluations(start)

    def _reload_evaluations(self, start: int) -> None:
        """Resuming a record (a new monitor, or a new process): the evaluations recorded
        before ``start`` feed the AUC rule again, and an AUC collapse already recorded
        before it is not written twice."""
        events = recorded_events(self.logdir)
        found = (Evaluation.from_record(e) for e in events)
        self._evaluations = sorted(
            (e for e in found if e is not None and e.step < start), key=lambda e: e.step
        )
        self._auc_collapsed = any(
            e.get("reason") == AUC_COLLAPSE
            and isinstance(e.get("step_c"), int)
            and e["step_c"] < start
            for e in events
        )

    def _resume_by_iterations(self, iterations: int) -> tuple[int, np.ndarray | None]:
        """The record step and saved state after which the optimizer stood at ``iterations``:
        the newest chunk whose saved offset puts it at or before them."""
        found: tuple[int, np.ndarray | None] = (iterations, None)
        for last, state in saved_states(self.logdir):
            offset = int(round(float(state[-1])))
            if last + 1 - offset <= iterations:
                found = (iterations + offset, state)
        return found

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self._batch_begin = batch
        if self._start_unchecked:
            # A callback after this one (BackupAndRestore) may have restored the
            # optimizer in its on_train_begin: read the step again before the first one.
            self._start_unchecked = False
            self._sync_start(False)
            if self._probe is not None:
                self._probe.start(self.recorder.next_unread_step)
        if self._ladder is not None:
            self._between_steps()
            spe = int(self.model.steps_per_execution or 1)
            self._steps_since_flush += spe
            self._since_snapshot += spe
        if self._probe is not None and not self._probe.failed:
            self._probe_sharpness()
        if self._replay is not None:
            self._replay_snapshot()

    def _replay_snapshot(self) -> None:
        """Between steps: the replay's snapshot when due (one host read of the state)."""
        if self._replay.due():
            step = int(self.recorder.step.numpy()) - 1
            self._replay.take(step, self.model.variables, self.model.optimizer.variables)
        self._replay.since += int(self.model.steps_per_execution or 1)

    def _probe_sharpness(self) -> None:
        """Between steps: probe the kept batch when due, for the row of the next step."""
        due = self._probe.take(int(self.model.steps_per_execution or 1))
        if due is None:
            return
        step, batch = due
        # The probe traces model.compute_loss, which the hooks capture: keep what they hold.
        captured = {k: list(v) if isinstance(v, list) else v for k, v in self._captured.items()}
        try:
            values = self._probe.measure(self.model, batch)
        finally:
            self._captured.clear()
            self._captured.update(captured)
        self.recorder.set_host_values(step, values)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self._ladder is not None:
            return  # the ladder flushes in on_train_batch_begin, between steps
        self._steps_since_flush += batch - self._batch_begin + 1
        if self._steps_since_flush >= self.flush_every:
            self.flush()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.flush()
        validation = {k: v for k, v in (logs or {}).items() if k.startswith("val_") and is_auc(k)}
        if validation and self.recorder is not None:
            self.record_evaluation(validation)

    def record_evaluation(
        self, metrics: Mapping[str, Any], step: int | None = None
    ) -> Event | None:
        """Record one evaluation of the model (``{"auc/click": 0.71, "rmse/watch": 1.2}``)
        after training step ``step`` (default: the last step taken) as an ``"evaluation"``
        event, and apply :attr:`auc_rule` (``evaluations.auc_collapse``) to the evaluations
        given so far.  The first time it fires, a ``full`` event with reason
        ``auc_collapse`` is recorded and returned; else None.  ``on_divergence`` acts on
        loss divergences only: stopping at an evaluation would cut the loss detector's
        account of the same divergence short.

        Values that are not finite numbers are recorded as ``null``; only metrics named
        like an AUC (``auc`` in the name) count for the rule.  Keras' ``val_*auc*`` logs
        are recorded this way at the end of each epoch.
        """
        if step is None:
            if self.recorder is None:
                raise ValueError("record_evaluation before training: pass step=")
            step = int(self.recorder.step.numpy()) - 1
        if isinstance(step, bool) or int(step) != step or step < 0:
            raise ValueError(f"record_evaluation: step must be an integer >= 0, got {step!r}")
        evaluation = Evaluation(int(step), {str(k): as_metric(v) for k, v in metrics.items()})
        self._evaluations.append(evaluation)
        records, collapse = [evaluation.to_record()], None
        if not self._auc_collapsed:
            collapse = auc_collapse(self._evaluations, self.auc_rule)
        if collapse is not None:
            self._auc_collapsed = True
            records.append(collapse.to_record())
            _log.warning(
                "DivergenceMonitor(%s): %s fell to chance at step %d (full divergence, %s)",
                self.logdir,
                collapse.series,
                collapse.step_c,
                collapse.reason,
            )
        self._record_actions(records)
        return collapse

    def on_train_end(self, logs: dict | None = None) -> None:
        self.flush()
        if self._ladder is not None:
            self._between_steps()  # a divergence seen by the last flush: end on the snapshot
        self._wait_for_writes()
        self._sync_offset()
        self._remove_hooks()
        self.model.train_function = self._user_train_function

    # ------------------------------------------------------------- flush
    def flush(self) -> None:
        """Read the device buffer once and append it to the run record (in a thread)."""
        self._steps_since_flush = 0
        if self.recorder is None:
            return
        steps, layer_stats, series, state, lost = self.recorder.read_new_rows()
        if lost:
            _log.warning(
                "DivergenceMonitor(%s): %d steps were overwritten before a flush; lower flush_every",
                self.logdir,
                lost,
            )
        if len(steps) == 0:
            return
        applied = self._applied_rows(series)
        events = self._tracker.update(
            steps[applied],
            series[applied][:, self._detector_columns],
            series[applied][:, self.recorder.series.index("loss")],
        )
        self.events.extend(events)
        if self._probe is not None and self._tracker.pending_event() is not None:
            self._probe.densify(int(steps[-1]) + 1, int(steps[-1]) + self.flush_every)
        if self._replay is not None:
            series[:, self.recorder.series.index(FINGERPRINT)] = self._replay.fingerprints.read(
                steps
            )
            pending = self._tracker.pending_event() is not None
            self._replay.after_flush(int(steps[-1]), events, pending)
        self._wait_for_writes()
        if self._writer is not None:
            self._pending_write = self._pool.submit(
                self._write, steps, layer_stats, series, state, events
            )
        if self.on_divergence == "stop" and any(e["kind"] == "full" for e in events):
            self.model.stop_training = True
        if self._ladder is not None and not self._ladder.gave_up:
            self._watch(steps, series, state, events)

    def _applied_rows(self, series: np.ndarray) -> np.ndarray:
        """Rows of steps whose update was applied (the detector skips the others)."""
        if not self.skip_bad_steps:
            return np.ones(len(series), bool)
        return series[:, self.recorder.series.index(SKIP_SERIES[0])] < 0.5

    def _sync_offset(self) -> None:
        """Record step - ``optimizer.iterations``, read while no step runs."""
        if self.recorder is not None:
            iterations = int(self.model.optimizer.iterations.numpy())
            self.recorder.iteration_offset = self.recorder.next_unread_step - iterations

    # ----------------------------------------------------------- recovery
    # With the ladder on, the monitor flushes, snapshots and rolls back in
    # on_train_batch_begin: on the main thread, before Keras dispatches the next step,
    # so nothing races a step, and the monitor stays async-safe (no per-step host sync;
    # Keras may run on_train_batch_end in another thread while the next step runs).
    def _watch(
        self, steps: np.ndarray, series: np.ndarray, state: np.ndarray, events: list[dict]
    ) -> None:
        """After a flush: note a trigger to act on, or confirm the snapshots as healthy."""
        trigger = self._trigger(steps, series, events)
        if trigger is not None:
            self._pending_trigger = self._pending_trigger or trigger
            return
        last = int(steps[-1])
        self._flush_states = (self._flush_states + [(last, state)])[-64:]
        if self._pending_trigger is None and self._tracker.pending_event() is None:
            self._ladder.store.confirm(last)

    def _trigger(self, steps: np.ndarray, series: np.ndarray, events: list[dict]) -> Trigger | None:
        """A full divergence in this flush, or ``max_consecutive_skips`` skips in a row."""
        full = [e for e in events if e["kind"] == "full"]
        if full:
            reason = f"full divergence ({full[0].get('reason')})"
            return Trigger(int(steps[-1]), full[0].get("step_a"), reason)
        # Only non-finite steps are skipped past max_consecutive_skips (SkipGuard.decide).
        streak = int(self._guard.streak.numpy()) if self._guard is not None else 0
        if streak > self.recovery.max_consecutive_skips:
            # The streak ends at the last row read; step-a is the step before it began.
            step_a = int(steps[-1]) - streak
            return Trigger(int(steps[-1]), step_a, f"{streak} steps skipped in a row")
        return None

    def _between_steps(self) -> None:
        """No step runs now: flush when due, then act on a trigger or take a snapshot."""
        if self._steps_since_flush >= self.flush_every:
            self.flush()
        if self._ladder.gave_up:
            return
        if self._pending_trigger is not None:
            self.flush()  # every row up to now is read before the state changes
            trigger = dataclasses.replace(
                self._pending_trigger, step=self.recorder.next_unread_step - 1
            )
            self._pending_trigger = None
            self._record_actions([self._act(trigger)])
            self._since_snapshot = 0
        elif self._since_snapshot >= self.recovery.snapshot_every:
            self._take_snapshot()

    def _take_snapshot(self) -> None:
        """Snapshot the state after the last finished step (one host read of the state)."""
        step = int(self.recorder.step.numpy()) - 1
        if step < 0 or not self._ladder.snapshot_due(step):
            return
        saved = [s for last, s in self._flush_states if last <= step]
        variables = self.model.variables + self.model.optimizer.variables
        self._ladder.store.take(step, variables, saved[-1] if saved else None)
        self._since_snapshot = 0

    def _act(self, trigger: Trigger) -> dict:
        """Roll back to the ladder's target snapshot, or give up; the record's event."""
        self._wait_for_writes()  # the evidence is on disk before the state changes
        snapshot = self._ladder.target(trigger)
        if snapshot is None:
            event, message = self._ladder.give_up_event(trigger, self.logdir)
            _log.error("%s", message)
            self.model.stop_training = True
            return event
        return self._roll_back(trigger, snapshot)

    def _record_actions(self, actions: list[dict]) -> None:
        """Write the ladder's (or an evaluation's) events at once, after the rows that
        caused them; before the writer exists, when it is created."""
        self.events.extend(actions)
        self._wait_for_writes()
        if self._writer is not None:
            self._writer.add_events(actions)
        elif self.recorder is None:
            self._unwritten.extend(actions)

    def _roll_back(self, trigger: Trigger, snapshot: Snapshot) -> dict:
        """Restore ``snapshot``; restart the detector from its state; begin the cool-down."""
        variables = self.model.variables + self.model.optimizer.variables
        for variable, value in zip(variables, snapshot.load()):
            variable.assign(value)
        next_step = self.recorder.next_unread_step
        self._flush_states = [(s, d) for s, d in self._flush_states if s <= snapshot.step]
        self.recorder.start_at(next_step, snapshot.detector_state)
        self._tracker = EventTracker(self.recorder.series)
        if self._guard is not None:
            self._guard.reset()
        self._cooldown.begin(next_step)
        self._sync_offset()
        event = self._ladder.rollback_event(trigger, snapshot)
        _log.warning(
            "DivergenceMonitor(%s): %s; rolled back from step %d to the snapshot after step %d "
            "(%d batches skipped), learning rate x%g rising to x1 over %d steps",
            self.logdir,
            trigger.reason,
            trigger.step,
            snapshot.step,
            event["batches_skipped"],
            self.recovery.cooldown_lr_factor,
            self.recovery.cooldown_steps,
        )
        return event

    def _write(self, steps, layer_stats, series, state, events) -> None:
        self._writer.append(steps, layer_stats, series, state)
        if events:
            self._writer.add_events(events)

    def _wait_for_writes(self) -> None:
        if self._pending_write is not None:
            self._pending_write.result()  # re-raises a writer error here
            self._pending_write = None

    def close(self) -> None:
        """Finish pending writes and close the record (also done at interpreter exit)."""
        self._wait_for_writes()
        if self._writer is not None:
            self._writer.close()

    # ------------------------------------------------------------- hooks
    def record_loss(self, loss: tf.Tensor, task_losses: Sequence[tf.Tensor] | None = None) -> None:
        """For custom train steps: the loss of this step (call before the optimizer update).

        Under ``tf.distribute``, pass this replica's loss scaled for distribution, as
        ``tf.nn.compute_average_loss`` over the global batch or a Keras loss does, so
        that the replicas' losses sum to the global loss; that sum is recorded.
        """
        self._captured["loss"] = loss
        if task_losses is not None:
            self._captured["tasks"] = list(task_losses)

    def _losses(self) -> list[tf.Tensor]:
        self._trace.loss_missing = "loss" not in self._captured
        if (
            self._trace.loss_missing
            and not getattr(self._trace, "in_train_step", False)
            and self.recorder.loss_measured[0]
        ):
            self._loss_not_seen(0)  # a custom loop that did not call record_loss
        tasks = self._captured.get("tasks", [])
        losses = [self._captured.get("loss")] + [
            tasks[i] if i < len(tasks) else None for i in range(len(self.recorder.tasks))
        ]
        for i, loss in enumerate(losses[1:], start=1):
            if loss is None and self.recorder.loss_measured[i]:
                self._loss_not_seen(i)
        nan = tf.constant(np.nan, tf.float32)  # recorded where a loss was not seen
        return [
            nan
            if loss is None
            else _global(keras_hooks.unscale_loss(tf.cast(loss, tf.float32)), "mean")
            for loss in losses
        ]

    def _loss_not_seen(self, index: int) -> None:
        """Turn off detection on a loss the train step never shows (said once)."""
        self.recorder.loss_measured[index] = False
        name = self.recorder.series[index]
        _log.warning(
            "DivergenceMonitor(%s): %r is not measured, so loss-based detection on it is off for this run: "
            "the train step does not compute it with compute_loss%s, and monitor.record_loss did not receive it. "
            "Non-finite gradients and dead layers are still detected.",
            self.logdir,
            name,
            " nor return it as 'loss' in its logs" if index == 0 else "",
        )

    def _monitored_apply(
        self, apply: Any, grads: Sequence[Any], trainable_variables: Sequence[Any] | None = None
    ) -> Any:
        optimizer = self.model.optimizer
        variables = (
            list(trainable_variables)
            if trainable_variables is not None
            else self.model.trainable_variables
        )
        grads = list(grads)
        # Read the captured losses before the update: under MirroredStrategy the
        # replicas share self._captured and switch threads at the update's merge call.
        losses = self._losses()
        scale = keras_hooks.loss_scale(optimizer)
        learning_rate = tf.convert_to_tensor(optimizer.learning_rate)
        stat_grads = [
            tf.zeros(v.shape, v.dtype) if g is None else g for g, v in zip(grads, variables)
        ]
        if scale is not None:
            stat_grads = [
                g / tf.cast(scale, g.dtype)
                if not isinstance(g, tf.IndexedSlices)
                else tf.IndexedSlices(
                    g.values / tf.cast(scale, g.values.dtype), g.indices, g.dense_shape
                )
                for g in stat_grads
            ]
        stat_grads = [_global(g, "sum") for g in stat_grads]
        rows = [
            touched_rows(g) for g in stat_grads
        ]  # of the global gradient: the rows every replica updates
        before = [measured_weights(v, g, r) for v, g, r in zip(variables, stat_grads, rows)]
        # Once per step, shared by the skip rung and the recorder (sparse rows summed).
        padded = [padded_gradient_values(g, r) for g, r in zip(stat_grads, rows)]
        result, skip = self._apply_or_skip(apply, grads, trainable_variables, padded, losses[0])
        with tf.control_dependencies([result] if isinstance(result, tf.Operation) else []):
            after = [measured_weights(v, g, r) for v, g, r in zip(variables, stat_grads, rows)]
        inner = keras_hooks.innermost(optimizer)
        factors = getattr(inner, "clipping_factors", [])
        applied = (
            [tf.convert_to_tensor(f) for f in factors]
            if len(factors) == len(variables)
            else [tf.ones(())] * len(variables)
        )
        overflow_skips = keras_hooks.skips_overflowed_steps(optimizer)
        self.recorder.record(
            stat_grads,
            before,
            after,
            learning_rate,
            applied,
            losses,
            overflow_skips,
            skip=skip,
            padded=padded,
        )
        return result

    def _apply_or_skip(
        self, apply: Any, grads: list, trainable_variables: Any, padded: list, loss: tf.Tensor
    ) -> tuple[Any, list[tf.Tensor]]:
        """Apply the update, unless the skip rung finds the step bad; ``(apply's result,
        the step's SKIP_SERIES values)`` (none without the rung)."""
        if self._guard is None:
            return apply(grads, trainable_variables), []
        grad_norm = global_grad_norm(padded)
        skipped, relearn, bound = self._guard.decide(grad_norm, loss)
        apply_unless(skipped, apply, grads, trainable_variables)
        self._guard.update(grad_norm, skipped, relearn)
        return None, [tf.cast(skipped, tf.float32), bound]

    def _install_hooks(self) -> None:
        if self._patches.installed:
            return
        keras_hooks.check_keras_version()
        self._patches.wrap_apply(self.model.optimizer, self._monitored_apply)
        if self._cooldown is not None:
            step, cooldown = self.recorder.step, self._cooldown
            self._patches.scale_learning_rate(
                keras_hooks.innermost(self.model.optimizer),
                lambda: cooldown.multiplier(step),
            )
        self._patches.wrap_compute_loss(self.model, self._capture_loss)
        self._patches.wrap_train_step(self.model, self._monitored_train_step)
        self._patches.wrap_task_losses(
            self.model, self.recorder.tasks, self._reset_task_losses, self._capture_task_loss
        )

    def _capture_loss(self, loss: tf.Tensor) -> None:
        self._captured["loss"] = loss

    def _reset_task_losses(self, count: int) -> None:
        self._captured["tasks"] = [None] * count

    def _capture_task_loss(self, index: int, loss: tf.Tensor) -> None:
        self._captured["tasks"][index] = loss

    def _monitored_train_step(self, train_step: Any, *args: Any, **kwargs: Any) -> Any:
        """The user's train step; if its update saw no loss, the ``"loss"`` it returns."""
        self._captured.pop("loss", None)  # a loss from an earlier trace is another graph's
        if self._probe is not None and args:
            self._probe.keep(args[0])
        if self._replay is not None and args:
            self._replay.fingerprints.write(self.recorder.step, args[0])
        self._trace.loss_missing, self._trace.in_train_step = False, True
        try:
            logs = train_step(*args, **kwargs)
        finally:
            self._trace.in_train_step = False
        if not self._trace.loss_missing:
            return logs
        loss = logs.get("loss") if isinstance(logs, dict) else None
        if loss is not None:
            self.recorder.replace_loss(_global(tf.cast(loss, tf.float32), "mean"))
        elif self.recorder.loss_measured[0]:
            self._loss_not_seen(0)
        return logs

    def _remove_hooks(self) -> None:
        self._patches.remove()
        self._captured.clear()
