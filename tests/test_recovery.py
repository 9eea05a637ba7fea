"""The recovery ladder (issue 15): skip a bad step on the device, roll back, give up.

(a) a NaN step and a 1000x step are skipped and leave every weight and optimizer
variable bit-identical to a run that never saw them (graph, XLA,
steps_per_execution=8); (b) under MirroredStrategy both replicas skip alike;
(c) a rollback restores the snapshot exactly and the record stays readable with
steps strictly increasing; (d) kill -9 during or right after a rollback leaves a
readable record; (e) max_rollbacks stops training with one message; (f) a
healthy run has no skips and no rollbacks; and a burst of corrupted inputs ends,
with recovery, within 10% of ClippyAdagrad's held-out loss.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from clippy_monitor import ClippyAdagrad, DivergenceMonitor, load_run
from clippy_monitor.monitor.recovery import RecoveryConfig
from clippy_monitor.recovered import read_recovery

BATCH = 16
NAN_STEP, BIG_STEP = 10, 17
SMALL_WINDOW = RecoveryConfig(skip_min_history=4, skip_window=8)


def _data(batches: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(BATCH * batches, 4)).astype("float32")
    return x, x.sum(axis=1, keepdims=True)


def _model(optimizer: keras.optimizers.Optimizer, **compile_kwargs) -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile(optimizer=optimizer, loss="mse", **compile_kwargs)
    return model


def _state(model: keras.Model) -> list[np.ndarray]:
    return [v.numpy().copy() for v in model.variables + model.optimizer.variables]


def _corrupt(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A NaN label at NAN_STEP, labels x1000 at BIG_STEP; and the mask of the clean rows."""
    x, y = x.copy(), y.copy()
    y[NAN_STEP * BATCH] = np.nan
    y[BIG_STEP * BATCH : (BIG_STEP + 1) * BATCH] *= 1000.0
    clean = np.ones(len(x), bool)
    for step in (NAN_STEP, BIG_STEP):
        clean[step * BATCH : (step + 1) * BATCH] = False
    return x, y, clean


def _optimizer(name: str) -> keras.optimizers.Optimizer:
    if name == "adam_schedule":  # moments and an iteration-dependent learning rate
        return keras.optimizers.Adam(keras.optimizers.schedules.ExponentialDecay(0.01, 5, 0.9))
    return keras.optimizers.Adagrad(0.1)


# ----------------------------------------------------------------------------- (a)
@pytest.mark.parametrize(
    "optimizer, jit, spe",
    [("adagrad", False, 1), ("adam_schedule", True, 1), ("adagrad", False, 8)],
    ids=["graph", "xla-adam-schedule", "steps_per_execution=8"],
)
def test_bad_steps_are_skipped_as_if_never_seen(tmp_path, optimizer, jit, spe):
    x, y = _data(24)
    xb, yb, clean = _corrupt(x, y)
    states, runs = [], []
    for name, (xs, ys) in {"bad": (xb, yb), "clean": (x[clean], y[clean])}.items():
        model = _model(_optimizer(optimizer), jit_compile=jit, steps_per_execution=spe)
        monitor = DivergenceMonitor(
            tmp_path / name, skip_bad_steps=True, recovery=SMALL_WINDOW, tensorboard=False
        )
        model.fit(xs, ys, batch_size=BATCH, shuffle=False, verbose=0, callbacks=[monitor])
        states.append(_state(model))
        runs.append(load_run(tmp_path / name))
    for got, want in zip(*states):
        np.testing.assert_array_equal(got, want)  # bit-identical, iterations included
    bad = runs[0]
    np.testing.assert_array_equal(bad.steps, np.arange(24))
    np.testing.assert_array_equal(np.flatnonzero(bad.series("skipped")), [NAN_STEP, BIG_STEP])
    assert not np.any(runs[1].series("skipped"))
    bound = bad.series("skip_bound")
    assert np.all(np.isinf(bound[:4])) and np.isfinite(bound[BIG_STEP])
    assert bad.series("grad_norm")[BIG_STEP] > bound[BIG_STEP]
    recovery = read_recovery(bad)
    assert recovery.skipped_steps == (NAN_STEP, BIG_STEP)
    assert recovery.skip_reasons == ("non_finite_loss", "above_bound")
    assert not bad.events  # a skipped step is not a divergence


# ----------------------------------------------------------------------------- (b)
def test_mirrored_replicas_skip_the_same_steps(tmp_path, mirrored_strategy):
    x, y = _data(24)
    xb, yb, _ = _corrupt(x, y)
    with mirrored_strategy.scope():
        model = _model(keras.optimizers.Adagrad(0.1))
    monitor = DivergenceMonitor(
        tmp_path, skip_bad_steps=True, recovery=SMALL_WINDOW, tensorboard=False
    )
    model.fit(xb, yb, batch_size=BATCH, shuffle=False, verbose=0, callbacks=[monitor])
    run = load_run(tmp_path)
    np.testing.assert_array_equal(np.flatnonzero(run.series("skipped")), [NAN_STEP, BIG_STEP])
    assert int(model.optimizer.iterations.numpy()) == 22
    for variable in model.variables + model.optimizer.variables:
        first, second = mirrored_strategy.experimental_local_results(variable.value)
        np.testing.assert_array_equal(first.numpy(), second.numpy(), err_msg=variable.path)
        assert np.all(np.isfinite(first.numpy()))


def test_a_new_monitor_resumes_numbering_after_skipped_steps(tmp_path):
    """A run that skipped steps, resumed by a new monitor (a new process): the record
    continues where it stopped rather than rewinding to optimizer.iterations."""
    x, y = _data(24)
    xb, yb, _ = _corrupt(x, y)
    model = _model(keras.optimizers.Adagrad(0.1))
    for _ in range(2):  # two "processes": a fresh monitor on the same record each time
        monitor = DivergenceMonitor(
            tmp_path, skip_bad_steps=True, recovery=SMALL_WINDOW, tensorboard=False
        )
        model.fit(xb, yb, batch_size=BATCH, shuffle=False, verbose=0, callbacks=[monitor])
        monitor.close()
    run = load_run(tmp_path)
    np.testing.assert_array_equal(run.steps, np.arange(48))  # no rewind, no row replaced
    np.testing.assert_array_equal(
        np.flatnonzero(run.series("skipped")), [NAN_STEP, BIG_STEP, 24 + NAN_STEP, 24 + BIG_STEP]
    )
    assert int(model.optimizer.iterations.numpy()) == 48 - 4


# ----------------------------------------------------------------------------- (c)
ROLLBACK_CONFIG = RecoveryConfig(snapshot_every=5, check_every=5, cooldown_steps=10)


class _StateHistory(keras.callbacks.Callback):
    """The model's state after every step; and, at each rollback, whether it was restored exactly."""

    def __init__(self, monitor: DivergenceMonitor) -> None:
        super().__init__()
        self.monitor, self.after, self.restored = monitor, {}, []

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        # After the monitor's on_train_batch_begin, where it rolls back.
        rollbacks = [e for e in self.monitor.events if e["kind"] == "rollback"]
        if len(rollbacks) > len(self.restored):
            want = self.after[rollbacks[-1]["snapshot_step"]]
            now = _state(self.model)
            self.restored.append(all(np.array_equal(a, b) for a, b in zip(want, now)))

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.after[batch] = _state(self.model)


def test_rollback_restores_the_snapshot_exactly(tmp_path, caplog):
    x, y = _data(60)
    x[30 * BATCH] = np.nan  # applied (skipping off): the weights turn NaN
    model = _model(keras.optimizers.Adagrad(0.1))
    monitor = DivergenceMonitor(
        tmp_path,
        on_divergence="recover",
        skip_bad_steps=False,
        recovery=ROLLBACK_CONFIG,
        tensorboard=False,
    )
    history = _StateHistory(monitor)
    with caplog.at_level(logging.WARNING):
        model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0, callbacks=[monitor, history])
    assert history.restored == [True]
    run = load_run(tmp_path)
    np.testing.assert_array_equal(run.steps, np.arange(60))  # strictly increasing, none lost
    full, rollback = run.events
    assert (full["kind"], full["step_b"], full["reason"]) == ("full", 30, "non_finite")
    assert rollback == {
        "kind": "rollback",
        "step": 34,
        "snapshot_step": 25,
        "batches_skipped": 9,
        "trigger": "full divergence (non_finite)",
        "step_a": 29,
        "cooldown": {"lr_factor": 0.1, "steps": 10},
    }
    # The optimizer's count went back with the snapshot; the record's steps did not.
    assert int(model.optimizer.iterations.numpy()) == 60 - 9
    lr = run.series("learning_rate")
    np.testing.assert_allclose(lr[35:46], 0.1 * (0.1 + 0.9 * np.minimum(np.arange(11) / 10, 1)))
    assert all(np.all(np.isfinite(v.numpy())) for v in model.variables)
    assert "rolled back from step 34 to the snapshot after step 25" in caplog.text
    recovery = read_recovery(run)
    assert recovery.stayed_healthy and recovery.summary() == "recovered: 1 rollback"


def test_a_second_rollback_restores_the_snapshot_before_its_own_step_a(tmp_path):
    x, y = _data(100)
    x[30 * BATCH] = x[80 * BATCH] = np.nan
    model = _model(keras.optimizers.Adagrad(0.1))
    monitor = DivergenceMonitor(
        tmp_path, on_divergence="recover", skip_bad_steps=False, recovery=ROLLBACK_CONFIG
    )
    model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0, callbacks=[monitor])
    run = load_run(tmp_path)
    rollbacks = [
        (e["step_a"], e["snapshot_step"], e["step"]) for e in run.events if e["kind"] == "rollback"
    ]
    # Snapshots every 5 steps restart from the first rollback (after steps 39, 44, ...,
    # 79): the second restores the state after step 79, the last healthy one.
    assert rollbacks == [(29, 25, 34), (79, 79, 84)]
    np.testing.assert_array_equal(run.steps, np.arange(100))
    assert read_recovery(run).stayed_healthy


def test_a_streak_of_skips_rolls_back(tmp_path):
    x, y = _data(60)
    x[30 * BATCH : 36 * BATCH] = np.nan  # six NaN batches in a row, all skipped
    config = RecoveryConfig(
        snapshot_every=5, check_every=5, max_consecutive_skips=4, skip_min_history=4
    )
    model = _model(keras.optimizers.Adagrad(0.1))
    monitor = DivergenceMonitor(tmp_path, on_divergence="recover", recovery=config)
    model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0, callbacks=[monitor])
    run = load_run(tmp_path)
    np.testing.assert_array_equal(np.flatnonzero(run.series("skipped")), np.arange(30, 36))
    (rollback,) = [e for e in run.events if e["kind"] == "rollback"]
    # Snapshots every 5 steps: the newest before the streak is the one after step 25.
    assert (rollback["step"], rollback["snapshot_step"], rollback["step_a"]) == (34, 25, 29)
    assert rollback["trigger"] == "5 steps skipped in a row"


def test_a_streak_over_two_flushes_names_the_step_before_it_began(tmp_path):
    """NaN batches 33-40: the flush after step 34 sees a streak of 2, the one after step 39 a
    streak of 7 (> 4) and rolls back; step-a is 32, the step before the streak, not the step
    before the second flush's rows (34)."""
    x, y = _data(60)
    x[33 * BATCH : 41 * BATCH] = np.nan
    config = RecoveryConfig(
        snapshot_every=5, check_every=5, max_consecutive_skips=4, skip_min_history=4
    )
    model = _model(keras.optimizers.Adagrad(0.1))
    monitor = DivergenceMonitor(tmp_path, on_divergence="recover", recovery=config)
    model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0, callbacks=[monitor])
    (rollback,) = [e for e in load_run(tmp_path).events if e["kind"] == "rollback"]
    assert (rollback["step"], rollback["step_a"]) == (39, 32)
    assert rollback["trigger"] == "7 steps skipped in a row"
    assert rollback["snapshot_step"] <= 32


def test_a_lasting_new_level_is_learnt_not_skipped_forever(tmp_path):
    x, y = _data(80)
    y[40 * BATCH :] *= 1000.0  # from step 40 on the labels (and the gradients) are 1000x
    config = RecoveryConfig(max_consecutive_skips=4, skip_min_history=4, skip_window=8)
    model = _model(keras.optimizers.Adagrad(0.1))
    monitor = DivergenceMonitor(tmp_path, on_divergence="recover", recovery=config)
    model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0, callbacks=[monitor])
    run = load_run(tmp_path)
    # Four skips, then step 44 is applied and the bound is learnt again from the new level.
    np.testing.assert_array_equal(np.flatnonzero(run.series("skipped")), np.arange(40, 44))
    assert np.all(np.isinf(run.series("skip_bound")[45:48]))  # relearning: no ratio test
    assert not [e for e in run.events if e["kind"] == "rollback"]
    assert int(model.optimizer.iterations.numpy()) == 80 - 4


# ----------------------------------------------------------------------------- (e)
def test_max_rollbacks_gives_up_with_one_message(tmp_path, caplog):
    x, y = _data(60)
    x[20 * BATCH] = x[40 * BATCH] = np.nan
    config = RecoveryConfig(snapshot_every=5, check_every=5, max_rollbacks=1)
    model = _model(keras.optimizers.Adagrad(0.1))
    monitor = DivergenceMonitor(
        tmp_path, on_divergence="recover", skip_bad_steps=False, recovery=config
    )
    with caplog.at_level(logging.ERROR):
        model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0, callbacks=[monitor])
    run = load_run(tmp_path)
    # The flush after step 44 sees the second divergence; the ladder gives up before
    # step 45, which Keras still runs before it checks stop_training.
    assert run.steps[-1] == 45
    kinds = [e["kind"] for e in run.events]
    assert kinds == ["full", "rollback", "full", "gave_up"]
    gave_up = run.events[-1]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [gave_up["message"]]
    assert "gave up recovering at step 44" in errors[0]
    assert "1 rollback(s) within 2000 steps (max_rollbacks=1)" in errors[0]
    assert read_recovery(run).summary() == "gave up: 1 rollback"


# ----------------------------------------------------------------------------- (d)
_KILLED = """
import os, signal, sys
import numpy as np, keras
from clippy_monitor import DivergenceMonitor
from clippy_monitor.monitor import callback
from clippy_monitor.monitor.recovery import RecoveryConfig

logdir, when = sys.argv[1], sys.argv[2]
original = callback.DivergenceMonitor._roll_back

def roll_back(self, trigger, snapshot):
    if when == "during":  # variables half restored, no event written
        self.model.variables[0].assign(snapshot.load()[0])
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, trigger, snapshot)

class KillAfter(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if any(e["kind"] == "rollback" for e in monitor.events):
            os.kill(os.getpid(), signal.SIGKILL)

callback.DivergenceMonitor._roll_back = roll_back
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)])
model.compile(optimizer=keras.optimizers.Adagrad(0.1), loss="mse")
x = np.random.default_rng(0).normal(size=(16 * 60, 4)).astype("float32")
y = x.sum(axis=1, keepdims=True)
x[16 * 30] = np.nan
monitor = DivergenceMonitor(logdir, on_divergence="recover", skip_bad_steps=False,
    recovery=RecoveryConfig(snapshot_every=5, check_every=5))
model.fit(x, y, batch_size=16, shuffle=False, verbose=0, callbacks=[monitor, KillAfter()])
"""


@pytest.mark.parametrize("when", ["during", "after"])
def test_kill_during_or_after_a_rollback_leaves_a_readable_record(tmp_path, when):
    script = tmp_path / "killed.py"
    script.write_text(textwrap.dedent(_KILLED))
    logdir = tmp_path / "run"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [sys.executable, str(script), str(logdir), when], env=env, capture_output=True, timeout=300
    )
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
    run = load_run(logdir)
    np.testing.assert_array_equal(run.steps, np.arange(35))  # every flushed step, in order
    kinds = [e["kind"] for e in run.events]
    assert kinds == (["full"] if when == "during" else ["full", "rollback"])
    assert run.events[0]["step_b"] == 30


# ----------------------------------------------------------------------------- (f)
def test_a_healthy_run_neither_skips_nor_rolls_back(tmp_path):
    x, y = _data(300, seed=1)
    model = _model(keras.optimizers.Adagrad(0.05))
    monitor = DivergenceMonitor(tmp_path, on_divergence="recover", tensorboard=False)
    model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=True, verbose=0, callbacks=[monitor])
    run = load_run(tmp_path)
    assert len(run.steps) == 600 and not np.any(run.series("skipped"))
    assert run.events == []
    assert read_recovery(run).summary() == "recovery on: nothing to do"
    assert int(model.optimizer.iterations.numpy()) == 600
    assert monitor.async_safe  # no per-step host sync: snapshots happen between steps


def test_recovery_settings_are_checked():
    with pytest.raises(ValueError, match="on_divergence must be None, 'stop' or 'recover'"):
        DivergenceMonitor("unused", on_divergence="rollback")
    with pytest.raises(ValueError, match="skip_ratio must be a finite number > 1"):
        RecoveryConfig(skip_ratio=0.5)
    with pytest.raises(ValueError, match="snapshot_every must be an integer >= 1"):
        RecoveryConfig(snapshot_every=0)
    with pytest.raises(TypeError, match="recovery must be a RecoveryConfig"):
        DivergenceMonitor("unused", recovery={"skip_ratio": 5})


# ------------------------------------------------------------- the corrupted burst
def _burst_run(kind: str, seed: int, x, y, xt, yt, logdir) -> float:
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((x.shape[1],)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(1),
        ]
    )
    optimizer = ClippyAdagrad(0.1) if kind == "clippy" else keras.optimizers.Adagrad(0.1)
    model.compile(optimizer=optimizer, loss="mse")
    callbacks = []
    if kind == "recover":
        callbacks = [DivergenceMonitor(logdir, on_divergence="recover", tensorboard=False)]
    model.fit(x, y, batch_size=32, shuffle=False, verbose=0, callbacks=callbacks)
    return float(model.evaluate(xt, yt, verbose=0))


def test_recovery_survives_a_burst_of_corrupted_labels(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 1))

    def data(rows: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.normal(size=(rows, 8)).astype("float32")
        return x, (np.tanh(x @ w) + 0.1 * rng.normal(size=(rows, 1))).astype("float32")

    x, y = data(32 * 600)
    xt, yt = data(4000)
    y[300 * 32 : 305 * 32] *= 1000.0  # five batches of corrupted labels
    losses = {
        kind: float(
            np.median(
                [_burst_run(kind, s, x, y, xt, yt, tmp_path / f"{kind}{s}") for s in range(2)]
            )
        )
        for kind in ("naive", "recover", "clippy")
    }
    assert losses["recover"] <= 1.1 * losses["clippy"], losses
    assert losses["naive"] >= 2.0 * losses["clippy"], losses
    recovery = read_recovery(load_run(tmp_path / "recover0"))
    assert recovery.skipped_steps == tuple(range(300, 305))
    assert recovery.reason_counts() == {"above_bound": 5}
