"""Sequential training and continuous evaluation (paper 3.1 and 5.1.2).

Days ``0 .. N-2`` are visited in time order; during day ``d`` every batch is
sampled uniformly from a moving window of the last ``window_days`` days
(``d - window_days + 1 .. d``).  The model is evaluated on the held-out last
day ``N-1`` several times per day -- AUC per binary task (``keras.metrics.AUC``),
RMSE per regression task -- and every run is recorded by a ``DivergenceMonitor``
in its own logdir, whose events say whether the run fully diverged.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from clippy_monitor.episodes import first_full
from clippy_monitor.monitor import DetectorConfig, DivergenceMonitor
from clippy_monitor.monitor.recovery import RecoveryConfig
from clippy_monitor.record import load_run
from clippy_monitor.testbed.data import DayLog, Features, Labels, subset
from clippy_monitor.testbed.models import Task

EVAL_FILE = "testbed_eval.json"


@dataclasses.dataclass(frozen=True)
class ProtocolConfig:
    """How one run visits the log.

    Attributes:
        batch_size: examples per step (the paper: 65k on TPUs).
        steps_per_day: training steps taken while the window ends at a given day.
        window_days: width of the moving time window batches are sampled from.
        evals_per_day: evaluations on the last day per training day (Figure 5's points).
        eval_rows: rows of the last day used for evaluation (all if larger).
        train_days: train on days ``0 .. train_days-1`` only (default: all but the last).
    """

    batch_size: int = 512
    steps_per_day: int = 150
    window_days: int = 2
    evals_per_day: int = 2
    eval_rows: int = 4096
    train_days: int | None = None

    def days(self, log: DayLog) -> int:
        n = log.num_days - 1
        return n if self.train_days is None else min(self.train_days, n)

    def total_steps(self, log: DayLog) -> int:
        return self.days(log) * self.steps_per_day


# --------------------------------------------------------------------------
# Learning rate and initial biases
# --------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="clippy_monitor")
class LinearWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """``peak * min(1, (step + 1) / warmup_steps)``: the usual ramp to a high learning rate (paper 3.2)."""

    def __init__(self, peak: float, warmup_steps: int) -> None:
        self.peak, self.warmup_steps = float(peak), int(warmup_steps)

    def __call__(self, step: Any) -> Any:
        ramp = (keras.ops.cast(step, "float32") + 1.0) / max(1, self.warmup_steps)
        return self.peak * keras.ops.minimum(1.0, ramp)

    def get_config(self) -> dict[str, Any]:
        return {"peak": self.peak, "warmup_steps": self.warmup_steps}


def output_biases(log: DayLog) -> dict[str, float]:
    """Per task, the output bias matching day 0's labels: log-odds of the base rate, or the mean."""
    _, labels = log.day(0)
    biases = {}
    for t in log.tasks:
        mean = float(np.mean(labels[t.name]))
        if t.kind == "binary":
            p = min(max(mean, 1e-3), 1 - 1e-3)
            mean = math.log(p / (1 - p))
        biases[t.name] = mean
    return biases


# --------------------------------------------------------------------------
# Data streams
# --------------------------------------------------------------------------
def _window(log: DayLog, d: int, width: int) -> tuple[Features, Labels]:
    days = [log.day(x) for x in range(max(0, d - width + 1), d + 1)]
    features = {k: np.concatenate([f[k] for f, _ in days]) for k in days[0][0]}
    labels = {k: np.concatenate([y[k] for _, y in days]) for k in days[0][1]}
    return features, labels


def window_batches(
    log: DayLog, config: ProtocolConfig, seed: int
) -> Iterator[tuple[Features, Labels]]:
    """Batches in training order: ``steps_per_day`` per day, each sampled from the moving window."""
    rng = np.random.default_rng([seed, 0xDA7A])
    for d in range(config.days(log)):
        features, labels = _window(log, d, config.window_days)
        n = len(features["dense"])
        for _ in range(config.steps_per_day):
            rows = rng.integers(0, n, config.batch_size)
            x, y = subset(features, labels, rows)
            yield x, {k: v[:, None] for k, v in y.items()}


def training_dataset(log: DayLog, config: ProtocolConfig, seed: int) -> tf.data.Dataset:
    """:func:`window_batches` as a prefetched ``tf.data.Dataset``."""
    spec = log.features
    signature = (
        {
            "categorical": tf.TensorSpec((None, spec.n_categorical), tf.int32),
            "dense": tf.TensorSpec((None, spec.n_dense), tf.float32),
        },
        {t.name: tf.TensorSpec((None, 1), tf.float32) for t in log.tasks},
    )
    return tf.data.Dataset.from_generator(
        lambda: window_batches(log, config, seed), output_signature=signature
    ).prefetch(2)


def evaluation_set(log: DayLog, config: ProtocolConfig) -> tuple[Features, Labels]:
    """The first ``eval_rows`` rows of the last day."""
    features, labels = log.day(log.num_days - 1)
    return subset(features, labels, slice(0, config.eval_rows))


# --------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------
def task_metrics(
    tasks: tuple[Task, ...], labels: Labels, predictions: dict[str, np.ndarray]
) -> dict[str, float]:
    """``{"auc/<task>": ...}`` for binary tasks, ``{"rmse/<task>": ...}`` for regression ones.

    Non-finite predictions (a diverged model) count as 0.5 for AUC -- a
    constant, uninformative score -- and make RMSE NaN.
    """
    out: dict[str, float] = {}
    for t in tasks:
        y, p = labels[t.name].reshape(-1), np.asarray(predictions[t.name], np.float64).reshape(-1)
        if t.kind == "binary":
            auc = keras.metrics.AUC(num_thresholds=1000)
            auc.update_state(
                y, np.clip(np.nan_to_num(p, nan=0.5, posinf=1.0, neginf=0.0), 0.0, 1.0)
            )
            out[f"auc/{t.name}"] = float(auc.result())
        else:
            out[f"rmse/{t.name}"] = (
                float(np.sqrt(np.mean((p - y) ** 2))) if np.all(np.isfinite(p)) else math.nan
            )
    return out


class ContinuousEvaluation(keras.callbacks.Callback):
    """Evaluate on the last day every ``every`` steps (paper 5.1.2); also writes
    TensorBoard scalars to ``<logdir>/eval`` and the curve to ``<logdir>/testbed_eval.json``,
    and gives each evaluation to ``monitor`` (``DivergenceMonitor.record_evaluation``:
    a run whose AUC falls to chance is a full divergence, reason ``auc_collapse``)."""

    def __init__(
        self,
        tasks: tuple[Task, ...],
        features: Features,
        labels: Labels,
        every: int,
        logdir: str | os.PathLike | None = None,
        monitor: DivergenceMonitor | None = None,
    ) -> None:
        super().__init__()
        self.monitor = monitor
        self.tasks, self.features, self.labels, self.every = tasks, features, labels, max(1, every)
        self.logdir = Path(logdir) if logdir is not None else None
        self.curve: list[dict[str, float]] = []  # [{"step": s, "auc/click": ..., ...}]
        self._predict: Any = None
        self._writer = (
            tf.summary.create_file_writer(str(self.logdir / "eval")) if self.logdir else None
        )
        self._step = 0

    def evaluate(self) -> dict[str, float]:
        if self._predict is None:
            self._predict = tf.function(lambda x: self.model(x, training=False))
        predictions = {k: v.numpy() for k, v in self._predict(self.features).items()}
        point = {"step": self._step, **task_metrics(self.tasks, self.labels, predictions)}
        self.curve.append(point)
        if self.monitor is not None and self.monitor.recorder is not None:
            self.monitor.record_evaluation({k: v for k, v in point.items() if k != "step"})
        if self._writer is not None:
            with self._writer.as_default(step=self._step):
                for name, value in point.items():
                    if name != "step":
                        tf.summary.scalar(f"eval/{name}", value)
            self._writer.flush()
        return point

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self._step += 1
        if self._step % self.every == 0:
            self.evaluate()

    def on_train_end(self, logs: dict | None = None) -> None:
        # Evaluate the final model after the monitor's last flush (it comes first in
        # the callbacks): a rollback there changes the weights the last batch's
        # evaluation saw.
        if self.curve and self.curve[-1]["step"] == self._step:
            self.curve.pop()
        self.evaluate()
        if self.logdir is not None:
            (self.logdir / EVAL_FILE).write_text(json.dumps(self.curve))


# --------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------
@dataclasses.dataclass
class RunResult:
    """What one sequential training run produced; ``diverged`` comes from its run record."""

    logdir: str
    curve: list[dict[str, float]]
    events: list[dict]
    steps: int
    wall_s: float

    @property
    def final(self) -> dict[str, float]:
        """Metrics of the last evaluation (the model after training on every day)."""
        return {k: v for k, v in self.curve[-1].items() if k != "step"} if self.curve else {}

    @property
    def diverged(self) -> bool:
        """A full divergence (paper 2.1, model-b) was recorded (by the loss detector or,
        reason ``auc_collapse``, by the evaluation AUC falling to chance)."""
        return any(e["kind"] == "full" for e in self.events)

    @property
    def full_event(self) -> dict | None:
        return first_full(self.events)


def recorded_outcome(logdir: str | os.PathLike) -> tuple[list[dict], int]:
    """(events, number of recorded steps) read back from a run record."""
    run = load_run(logdir)
    return list(run.events), len(run)


def divergence_action(recovery: RecoveryConfig | None, stop_on_divergence: bool) -> str | None:
    """The monitor's ``on_divergence``: ``"recover"`` with a ``recovery`` config, else stop or nothing."""
    if recovery is not None:
        return "recover"
    return "stop" if stop_on_divergence else None


def train_sequentially(
    model: keras.Model,
    log: DayLog,
    config: ProtocolConfig,
    logdir: str | os.PathLike,
    *,
    seed: int = 0,
    detector: DetectorConfig | None = None,
    stop_on_divergence: bool = True,
    recovery: RecoveryConfig | None = None,
    callbacks: list[keras.callbacks.Callback] | None = None,
    sharpness_every: int | None = None,
    keep_replay: bool = False,
) -> RunResult:
    """Train a compiled ``model`` sequentially over ``log`` (paper 5.1.2), monitored.

    With ``stop_on_divergence`` the run ends at the first day boundary after a
    full divergence (the record has already told the story; this saves CPU).
    With ``recovery`` the monitor runs the recovery ladder instead
    (``on_divergence="recover"``): bad steps are skipped, a full divergence is
    rolled back, and training goes on to the last day unless the ladder gives up.
    ``sharpness_every`` is passed to the monitor (records ``sharpness`` and
    ``preconditioned_sharpness`` every that many steps; None: not probed).
    ``keep_replay`` keeps what ``clippy_monitor.replay`` needs (docs/REPLAY.md).
    """
    logdir = Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    features, labels = evaluation_set(log, config)
    every = max(1, config.steps_per_day // max(1, config.evals_per_day))
    monitor = DivergenceMonitor(
        logdir,
        flush_every=config.steps_per_day,
        detector=detector,
        on_divergence=divergence_action(recovery, stop_on_divergence),
        recovery=recovery,
        sharpness_every=sharpness_every,
        keep_replay=keep_replay,
    )
    evaluation = ContinuousEvaluation(log.tasks, features, labels, every, logdir, monitor)
    start = time.perf_counter()
    try:
        model.fit(
            training_dataset(log, config, seed),
            epochs=config.days(log),
            steps_per_epoch=config.steps_per_day,
            callbacks=[monitor, evaluation, *(callbacks or [])],
            shuffle=False,  # the batches are already sampled from the moving window
            verbose=0,
        )
    finally:
        monitor.close()
    wall = time.perf_counter() - start
    events, steps = recorded_outcome(logdir)
    return RunResult(str(logdir), evaluation.curve, events, steps, wall)
