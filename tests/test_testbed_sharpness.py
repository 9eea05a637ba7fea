"""Testbed runs that probe sharpness (issue 16): ``Testbed.sharpness_every`` reaches the
monitor, the cache tells probed runs from unprobed ones, and the study's reading."""

from __future__ import annotations

import dataclasses

import numpy as np

from clippy_monitor.episodes import Event
from clippy_monitor.record import load_run
from clippy_monitor.sharpness_reading import PRECONDITIONED, SHARPNESS
from clippy_monitor.testbed import experiments, sharpness_study
from clippy_monitor.testbed.data import SyntheticConfig
from clippy_monitor.testbed.protocol import ProtocolConfig

TINY_TESTBED = experiments.Testbed(
    warmup_steps=5,
    scale=1 / 64,
    data=SyntheticConfig(
        num_days=3, rows_per_day=128, n_dense=8, n_categorical=2, vocab_size=10, shift_days=()
    ),
    protocol=ProtocolConfig(batch_size=16, steps_per_day=8, evals_per_day=1, eval_rows=64),
    sharpness_every=4,
)


def test_a_testbed_run_records_sharpness_every_n_steps(tmp_path):
    spec = experiments.RunSpec("Small", "naive", 1.0)
    outcome = experiments.run_one(spec, TINY_TESTBED, tmp_path)
    run = load_run(outcome.logdir)
    assert run.meta["sharpness_every"] == 4
    assert experiments.recorded_sharpness_every(outcome.logdir) == 4
    probed = run.steps[~np.isnan(run.series(PRECONDITIONED))]
    assert list(probed) == [4, 8, 12]  # steps 0 .. 15, probed every 4th after the first
    assert np.all(run.series(SHARPNESS)[np.isin(run.steps, probed)] > 0)
    row = sharpness_study.row_of("tiny", outcome.logdir, outcome.wall_s, window=10)
    assert row.probes == 3 and row.steps == 16
    assert row.peak_all == np.nanmax(run.series(PRECONDITIONED))
    # The cache tells runs apart by how often they probed.
    unprobed = dataclasses.replace(TINY_TESTBED, sharpness_every=None)
    again = experiments.run_one(spec, unprobed, tmp_path)
    assert experiments.recorded_sharpness_every(again.logdir) is None
    assert PRECONDITIONED not in load_run(again.logdir).series_names


def test_classify_alarms_by_hand():
    steps = np.arange(1, 101)
    values = np.full(100, np.nan)
    values[[9, 49, 59, 89]] = 3.0  # probes above 2 at steps 10, 50, 60, 90
    values[19] = 1.0  # below 2: not an alarm
    episodes = [
        Event("micro", step_b=55, recovered=58),  # 50 warns it; 60 is after recovery
        Event("full", step_b=85),  # 60 is > 20 steps ahead; 90 is during it
    ]
    alarms = sharpness_study.classify_alarms(steps, values, episodes, window=20)
    assert alarms == sharpness_study.Alarms(warnings=1, during=1, false_alarms=2, first_false=10)
    assert sharpness_study.classify_alarms(steps, values, [], window=20).false_alarms == 4


def test_parse_run():
    planned = sharpness_study.parse_run("quick:Large+DCN:naive:0.5:2")
    assert planned.testbed == "quick"
    assert planned.spec == experiments.RunSpec("Large+DCN", "naive", 0.5, None, 2)
