"""The testbed and the demo with the recovery ladder (issue #15): the wiring from a
``RunSpec`` to ``on_divergence="recover"``, the offline replay of the skip rung
(checked against the rung on the device), steps lost, the demo's lines and the
comparison's table."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import pytest

from clippy_monitor import DivergenceMonitor
from clippy_monitor.monitor.recovery import RecoveryConfig
from clippy_monitor.record import load_run
from clippy_monitor.recovered import Recovery, Rollback
from clippy_monitor.testbed import experiments, recovery_study
from clippy_monitor.testbed.data import SyntheticConfig
from clippy_monitor.testbed.demo import describe_recovery, replay_lines, side_by_side
from clippy_monitor.testbed.protocol import ProtocolConfig, divergence_action

TINY_TESTBED = experiments.Testbed(
    warmup_steps=5,
    scale=1 / 64,
    data=SyntheticConfig(
        num_days=3, rows_per_day=128, n_dense=8, n_categorical=2, vocab_size=10, shift_days=()
    ),
    protocol=ProtocolConfig(batch_size=16, steps_per_day=8, evals_per_day=1, eval_rows=64),
    recovery=RecoveryConfig(skip_ratio=50.0, snapshot_every=4, check_every=4, cooldown_steps=4),
)


def test_divergence_action():
    assert divergence_action(RecoveryConfig(), True) == "recover"
    assert divergence_action(None, True) == "stop"
    assert divergence_action(None, False) is None


def test_a_recover_spec_trains_with_the_ladder_and_its_name_says_so(tmp_path):
    spec = experiments.RunSpec("Small", "naive", 1.0, recover=True)
    assert spec.name == "clean-Small-naive-recover-lr1x-seed0"
    assert spec.label == "Small naive + recover 1x seed 0"
    assert dataclasses.replace(spec, recover=False).name == "clean-Small-naive-lr1x-seed0"

    outcome = experiments.run_one(spec, TINY_TESTBED, tmp_path)
    meta = load_run(outcome.logdir).meta
    assert meta["on_divergence"] == "recover"
    assert meta["recovery"]["skip_ratio"] == 50.0 and meta["recovery"]["snapshot_every"] == 4
    assert experiments.recorded_recovery(outcome.logdir) == TINY_TESTBED.recovery.to_dict()
    recovery = outcome.recovery()
    assert recovery is not None and recovery.gave_up is None
    assert outcome.steps == 2 * 8  # trained to the last day
    # The demo's side-by-side lines read the same record.
    lines = side_by_side(dict.fromkeys(("naive", "clippy", "recover"), outcome), TINY_TESTBED)
    auc, rmse = experiments.primary_metrics(TINY_TESTBED)
    assert lines[0].split() == ["run", auc, rmse, "steps", "lost", "outcome"]
    expected = (
        recovery.summary()
        if recovery.acted
        else ("fully diverged" if outcome.diverged else "healthy")
    )
    assert lines[3].split()[:4] == ["Naive", "Adagrad", "+", "recovery"]
    assert lines[3].endswith(f"{experiments.steps_lost(recovery):>10}  {expected}")
    assert f"{outcome.final[auc]:.3f}" in lines[3]
    # The cache keeps the spec's recover flag.
    again = experiments.run_one(spec, TINY_TESTBED, tmp_path)
    assert again.spec == spec and again.logdir == outcome.logdir


def _norms(n: int) -> np.ndarray:
    return 1.0 + 0.1 * np.sin(np.arange(n))


def test_replay_skip_ratios_by_hand():
    config = RecoveryConfig(skip_ratio=10.0, skip_window=8, skip_min_history=4)
    g = _norms(20)
    g[10], g[11], g[15] = 30.0, np.nan, 9.0
    ratio, skip = recovery_study.replay_skip_ratios(g, config)
    assert np.isnan(ratio[:4]).all() and not skip[:4].any()  # too little history
    median = sorted(g[2:10])[3]  # the lower median of the last 8 applied steps
    assert ratio[10] == 30.0 / median and skip[10]
    assert ratio[11] == np.inf and skip[11]
    # Steps 10 and 11 stayed out of the window: step 12's median is over steps 2..9.
    assert ratio[12] == g[12] / median
    assert not skip[15] and list(np.flatnonzero(skip)) == [10, 11]
    shift = (np.arange(20) >= 10) & (np.arange(20) < 15)
    margin = recovery_study.margin_of("r", np.arange(20), g, config, shift)
    assert margin.max_ratio == np.inf and margin.max_step == 11
    assert margin.would_skip == 2 and margin.first_would_skip == 10
    assert margin.ordinary_max_ratio == max(ratio[4:10].max(), ratio[15:].max())


def test_replay_skip_ratios_relearns_after_a_streak():
    config = RecoveryConfig(
        skip_ratio=10.0, skip_window=8, skip_min_history=4, max_consecutive_skips=3
    )
    g = np.concatenate([_norms(10), np.full(6, 50.0), _norms(10)])
    ratio, skip = recovery_study.replay_skip_ratios(g, config)
    # Three skips in a row, then the fourth step above the bound is applied and the
    # window starts again from it: too little history until four steps are applied.
    assert list(np.flatnonzero(skip)) == [10, 11, 12]
    assert ratio[13] > 10 and np.isnan(ratio[14:17]).all()
    assert ratio[17] == g[17] / 50.0  # the lower median of [50, 50, 50, 50]
    assert ratio[20] == g[20] / sorted([50.0, 50.0, 50.0, *g[16:20]])[3]


def test_replay_skip_ratios_matches_the_rung_on_the_device(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile(optimizer=keras.optimizers.Adagrad(0.1), loss="mse")
    rng = np.random.default_rng(0)
    n = 16
    x = rng.normal(size=(n * 60, 4)).astype("float32")
    y = x.sum(1, keepdims=True)
    y[25 * n : 26 * n] *= 1000  # a 1000x gradient at step 25
    x[33 * n] = np.nan  # a non-finite one at step 33
    y[50 * n : 56 * n] *= 1000  # a new level from step 50: three skips, then relearnt
    config = RecoveryConfig(skip_window=8, skip_min_history=4, max_consecutive_skips=3)
    monitor = DivergenceMonitor(tmp_path, skip_bad_steps=True, recovery=config, tensorboard=False)
    model.fit(x, y, batch_size=n, shuffle=False, verbose=0, callbacks=[monitor])
    run = load_run(tmp_path)
    recorded = np.asarray(run.series("skipped")) > 0.5
    ratio, replayed = recovery_study.replay_skip_ratios(run.series("grad_norm"), config)
    assert list(np.flatnonzero(recorded))[:5] == [25, 33, 50, 51, 52]
    np.testing.assert_array_equal(replayed, recorded)
    bound = np.asarray(run.series("skip_bound"))
    norms = np.asarray(run.series("grad_norm"))
    tested = np.isfinite(bound) & np.isfinite(norms)
    assert tested.sum() > 30
    # The device's bound is skip_ratio x the replayed median (float32 on the device).
    np.testing.assert_allclose(
        norms[tested] / ratio[tested] * config.skip_ratio, bound[tested], rtol=1e-6
    )


def _recovery() -> Recovery:
    rollbacks = (
        Rollback(409, 300, 109, "50 steps skipped in a row", 359, 0.1, 200),
        Rollback(529, 409, 120, "55 steps skipped in a row", 479, 0.1, 200),
    )
    skipped = tuple(range(360, 410)) + tuple(range(475, 530)) + (590,)
    return Recovery(skipped, ("above_bound",) * len(skipped), rollbacks, None, True)


def test_steps_lost_counts_skips_and_undone_steps_once():
    assert experiments.steps_lost(None) == 0
    # Steps 301..529 undone by the two rollbacks (the skips inside them counted once) + 590.
    assert experiments.steps_lost(_recovery()) == 229 + 1


def test_describe_recovery_names_each_rollback():
    lines = describe_recovery(_recovery())
    assert lines[0] == "  recovered: 2 rollbacks, 106 steps skipped (above bound 106)"
    assert lines[1] == (
        "    rollback at step   409 (50 steps skipped in a row; last healthy step 359): to the "
        "snapshot after step 300, 109 batches skipped, cool-down: lr x0.1 rising to x1 over 200 steps"
    )
    assert lines[3] == "    after the last rollback the run stayed healthy"
    assert lines[4] == "  steps lost (skipped or undone by a rollback): 230"
    assert describe_recovery(None) == ["  recorded without the recovery ladder"]


def _row(method: str, recover: bool, seed: int, auc: float, lost: int = 0) -> recovery_study.Row:
    spec = experiments.RunSpec("Small", method, 2.0, None, seed, recover=recover)
    return recovery_study.Row(
        spec, auc, 1.5, method == "naive", int(recover), lost, lost, False, 10.0
    )


def test_comparison_table_and_verdicts():
    rows = [
        _row("naive", False, 0, 0.50),
        _row("naive", False, 1, 0.55),
        _row("naive", True, 0, 0.70, 40),
        _row("naive", True, 1, 0.80, 60),
        _row("Clippy", False, 0, 0.78),
        _row("Clippy", False, 1, 0.79),
    ]
    table = recovery_study.comparison_table(rows).splitlines()
    assert table[3] == (
        "| Small | 2x | naive + recover | 0, 1 | 75.0 (70.0, 80.0) | 1.500 (1.500, 1.500) "
        "| 2/2 | 1, 1 | 40, 60 | 40, 60 | 10 (10, 10) |"
    )
    assert recovery_study.verdicts(rows) == [
        "Small 2x, AUC of naive + recover: higher than naive, not resolved than Clippy"
    ]
    assert recovery_study.resolved([1.0, 2.0], [3.0]) == "lower"
    assert recovery_study.resolved([1.0], [float("nan")]) == "not resolved"


def test_the_final_evaluation_sees_a_rollback_at_the_last_flush():
    from clippy_monitor.testbed.models import Task
    from clippy_monitor.testbed.protocol import ContinuousEvaluation

    inputs = keras.Input((2,))
    model = keras.Model(inputs, {"y": keras.layers.Dense(1, use_bias=False)(inputs)})
    model.layers[-1].kernel.assign([[1.0], [0.0]])
    features = np.array([[1.0, 0.0], [2.0, 0.0]], np.float32)
    evaluation = ContinuousEvaluation(
        (Task("y", "regression"),), features, {"y": np.array([1.0, 2.0])}, every=2
    )
    evaluation.set_model(model)
    evaluation.on_train_batch_end(0)
    evaluation.on_train_batch_end(1)  # evaluated at step 2: a perfect model
    assert evaluation.curve == [{"step": 2, "rmse/y": 0.0}]
    model.layers[-1].kernel.assign([[0.0], [0.0]])  # a rollback after the last batch
    evaluation.on_train_end()
    assert evaluation.curve[-1]["step"] == 2 and len(evaluation.curve) == 1
    assert evaluation.curve[-1]["rmse/y"] == pytest.approx(np.sqrt(2.5))


def test_the_demo_says_when_a_divergence_cannot_be_replayed(tmp_path):
    """A run that diverges at its first steps keeps no snapshot before step-a: the demo's
    replay says so in one line (the full replay is shown by the demo itself)."""
    healthy = experiments.run_one(
        experiments.RunSpec("Small", "naive", 1.0), TINY_TESTBED, tmp_path
    )
    assert replay_lines(healthy, TINY_TESTBED) == [
        "Replay: the naive run did not diverge; nothing to replay."
    ]
    spec = experiments.RunSpec("Small", "naive", 1e5)
    blown = experiments.run_one(spec, TINY_TESTBED, tmp_path, keep_replay=True)
    assert blown.diverged
    (line,) = replay_lines(blown, TINY_TESTBED)
    assert (
        line.startswith("Replay: not possible: ") and "no snapshot was taken before step-a" in line
    )
