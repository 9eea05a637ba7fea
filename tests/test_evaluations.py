"""Issue 17: runs that consistently micro-diverge, and runs whose evaluation AUC falls to chance.

``episodes.repeated_micro`` and ``evaluations.auc_collapse`` on constructed series; the
live monitor's ``record_evaluation`` writing both into a record; and every reader
(post-mortem, Dash, TensorBoard tab, the testbed's tables) showing them.
"""

from __future__ import annotations

import math
from pathlib import Path

import keras
import numpy as np
import pytest

from clippy_monitor.episodes import Event, events_of, first_full, read_episodes, repeated_micro
from clippy_monitor.evaluations import (
    AUC_COLLAPSE,
    AucRule,
    Evaluation,
    auc_collapse,
    evaluations_of,
)
from clippy_monitor.record import LAYER_METRICS, RunWriter, load_run


def evaluations(values, name="auc/click", every=40) -> list[Evaluation]:
    """One evaluation every ``every`` steps (steps 40, 80, ...) with ``name`` = each value."""
    return [Evaluation(every * (i + 1), {name: v}) for i, v in enumerate(values)]


def micro(step_b: int) -> Event:
    return Event("micro", step_b, step_b - 1, recovered=step_b + 20, series="loss")


# ------------------------------------------------------------------ the AUC rule
def test_auc_collapse_is_flagged_at_the_second_evaluation_at_chance():
    found = auc_collapse(evaluations([0.58, 0.66, 0.71, 0.53, 0.50, 0.49]))
    # Learned (>= 0.6) at step 80; at chance (<= 0.55) at 160 and 200: flagged at 200.
    assert found == Event(
        "full", step_b=160, step_a=120, step_c=200, series="auc/click", reason=AUC_COLLAPSE
    )
    assert auc_collapse(evaluations([0.58, 0.66, 0.71, 0.53, 0.50]), AucRule(consecutive=3)) is None
    assert auc_collapse(evaluations([0.7, 0.5]), AucRule(consecutive=1)).step_c == 80


def test_clean_auc_series_is_not_flagged():
    # Rising with noise, one evaluation at chance between healthy ones (a transient).
    assert auc_collapse(evaluations([0.57, 0.62, 0.70, 0.52, 0.72, 0.56, 0.78, 0.8])) is None
    # Never learned the task (at most 0.59): nothing to lose, whatever follows.
    assert auc_collapse(evaluations([0.52, 0.59, 0.50, 0.50, 0.50])) is None
    assert auc_collapse([]) is None


def test_nan_missing_and_non_auc_values():
    nan = math.nan
    # NaN neither counts nor breaks a streak: flagged at the next value at chance.
    found = auc_collapse(evaluations([0.7, 0.5, nan, 0.5]))
    assert (found.step_a, found.step_b, found.step_c) == (40, 80, 160)
    assert auc_collapse(evaluations([0.7, 0.5, nan, nan])) is None
    # A metric that is not an AUC is ignored; a value outside [0, 1] is not an AUC.
    rmse = evaluations([0.9, 0.3, 0.2, 0.1], name="rmse/watch")
    assert auc_collapse(rmse) is None
    found = auc_collapse(evaluations([0.7, 1.5, -0.2, 0.5, 0.5]))
    assert (found.step_a, found.step_b, found.step_c) == (40, 160, 200)
    # Missing in some evaluations, text or None in others.
    mixed = [
        Evaluation(40, {"val_auc": 0.8}),
        Evaluation(80, {"loss": 1.0}),
        Evaluation(120, {"val_auc": None}),
        Evaluation(160, {"val_auc": "n/a"}),
        Evaluation(200, {"val_auc": 0.51}),
        Evaluation(240, {"val_auc": 0.50}),
    ]
    assert auc_collapse(mixed).series == "val_auc" and auc_collapse(mixed).step_c == 240


def test_an_evaluation_repeated_at_one_step_counts_once():
    again = [*evaluations([0.7, 0.5]), Evaluation(80, {"auc/click": 0.5})]
    assert auc_collapse(again) is None  # one model at chance, evaluated twice
    superseded = [*evaluations([0.7, 0.5, 0.5]), Evaluation(120, {"auc/click": 0.7})]
    assert auc_collapse(superseded) is None  # the later evaluation at step 120 counts


def test_first_metric_to_collapse_is_reported():
    both = [
        Evaluation(s, {"auc/click": c, "auc/like": k})
        for s, c, k in [(40, 0.7, 0.7), (80, 0.7, 0.5), (120, 0.5, 0.5), (160, 0.5, 0.5)]
    ]
    assert auc_collapse(both).series == "auc/like" and auc_collapse(both).step_c == 120


def test_auc_rule_rejects_impossible_settings():
    for bad in (dict(chance=0.6, learned=0.6), dict(consecutive=0), dict(consecutive=1.5)):
        with pytest.raises(ValueError):
            AucRule(**bad)


def test_evaluation_record_round_trip():
    record = Evaluation(12, {"auc/click": math.nan, "rmse/watch": 1.5}).to_record()
    assert record == {
        "kind": "evaluation",
        "step": 12,
        "metrics": {"auc/click": None, "rmse/watch": 1.5},
    }
    back = Evaluation.from_record(record)
    assert back.step == 12 and math.isnan(back.metrics["auc/click"])
    assert back.metrics["rmse/watch"] == 1.5
    assert Evaluation.from_record({"kind": "evaluation", "step": 1.5, "metrics": {}}) is None
    assert Evaluation.from_record({"kind": "micro", "step": 1}) is None


# ------------------------------------------------------------ repeated micro
def test_repeated_micro_series_is_flagged():
    found = repeated_micro([micro(s) for s in (1200, 1500, 1800, 2100, 5000, 9000)])
    assert (found.count, found.first_step, found.last_step) == (4, 1200, 2100)
    assert found.steps == (1200, 1500, 1800, 2100)
    assert (
        found.describe() == "consistently micro-diverging, 4 micro-divergences in steps 1200-2100"
    )
    # Full and open episodes are not micro-divergences.
    others = [Event("full", 1300, 1299, 1400), Event("open", 1600, 1599)]
    assert repeated_micro([micro(1200), micro(1500), *others]) is None


def test_spaced_micro_divergences_are_not_flagged():
    assert repeated_micro([micro(100), micro(900)]) is None  # two, however close
    assert repeated_micro([micro(s) for s in (100, 900, 1300)]) is None  # 1200 steps apart
    assert repeated_micro([micro(s) for s in (100, 900, 1100)]).count == 3  # 1000 apart
    assert repeated_micro([micro(s) for s in (100, 900)], count=2).count == 2
    with pytest.raises(ValueError):
        repeated_micro([], count=1)


def test_first_full_prefers_the_loss_detectors():
    auc = {"kind": "full", "step_b": 199, "reason": AUC_COLLAPSE}
    loss = {"kind": "full", "step_b": 160, "reason": "no_recovery"}
    evaluation = {"kind": "evaluation", "step": 39, "metrics": {}}
    assert first_full([evaluation, auc, loss]) is loss  # the AUC's was written first
    assert first_full([evaluation, auc]) is auc
    assert first_full([evaluation, "not a dict"]) is None


# --------------------------------------------------------------- the live monitor
def tiny_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, "relu"), keras.layers.Dense(1, "sigmoid")]
    )
    model.compile(keras.optimizers.Adagrad(0.05), "binary_crossentropy", metrics=["auc"])
    return model


def test_monitor_records_evaluations_and_the_auc_collapse(tmp_path):
    from clippy_monitor import DivergenceMonitor

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(160, 4)).astype("f4"), rng.integers(0, 2, (160, 1)).astype("f4")
    model = tiny_model()
    monitor = DivergenceMonitor(tmp_path / "run", flush_every=10, on_divergence="stop")
    # Keras' validation logs (val_auc) are recorded at each epoch end.
    model.fit(x, y, batch_size=16, epochs=2, validation_data=(x, y), callbacks=[monitor], verbose=0)
    assert monitor.record_evaluation({"auc/click": 0.8, "rmse/w": np.float32(1.0)}) is None
    assert monitor.record_evaluation({"auc/click": 0.52}, step=30) is None
    collapse = monitor.record_evaluation({"auc/click": math.nan, "note": "text"}, step=35)
    assert collapse is None
    collapse = monitor.record_evaluation({"auc/click": 0.5}, step=40)
    assert (collapse.step_a, collapse.step_b, collapse.step_c) == (19, 30, 40)
    assert not model.stop_training  # on_divergence acts on the loss detector's divergences
    assert monitor.record_evaluation({"auc/click": 0.5}, step=45) is None  # once per run
    with pytest.raises(ValueError):
        monitor.record_evaluation({"auc/click": 0.5}, step=-1)
    monitor.close()

    early = DivergenceMonitor(tmp_path / "early", flush_every=10)
    with pytest.raises(ValueError):
        early.record_evaluation({"auc": 0.5})  # before training: no step to default to
    early.record_evaluation({"auc": 0.5}, step=0)  # kept until the record exists
    tiny_model().fit(x, y, batch_size=16, epochs=1, callbacks=[early], verbose=0)
    early.close()
    assert [(e.step, e.metrics) for e in evaluations_of(load_run(tmp_path / "early"))] == [
        (0, {"auc": 0.5})
    ]

    run = load_run(tmp_path / "run")
    recorded = evaluations_of(run)
    assert [e.step for e in recorded] == [9, 19, 19, 30, 35, 40, 45]
    assert sorted(recorded[0].metrics) == ["val_auc"] and 0 <= recorded[0].metrics["val_auc"] <= 1
    assert recorded[2].metrics["rmse/w"] == 1.0 and math.isnan(recorded[4].metrics["note"])
    assert [e for e in read_episodes(run) if e.kind == "full"] == [collapse]
    assert all(e.kind != "evaluation" for e in events_of(run))


# ------------------------------------------------------------------- readers
N = 400
LAYERS = ["model/dense/kernel", "model/head/kernel"]
MICROS = (100, 180, 260)


def write_record(path: Path, events: list[dict]) -> Path:
    """A healthy-looking 400-step record (detector status 0 throughout) with ``events``."""
    t = np.arange(N)
    rng = np.random.default_rng(0)
    names = ["loss", "detector/status", "detector/since_onset", "detector/task"]
    series = np.column_stack([0.5 + 0.01 * rng.random(N), np.zeros(N), -np.ones(N), -np.ones(N)])
    stats = rng.uniform(0.5, 1.5, (N, len(LAYER_METRICS), len(LAYERS))).astype("f4")
    for j, metric in enumerate(LAYER_METRICS):
        if "factor" in metric:
            stats[:, j] = 1.0
        elif metric in ("nonfinite_count", "zero_grad_fraction"):
            stats[:, j] = 0.0
    meta = {"layers": LAYERS, "layer_metrics": list(LAYER_METRICS), "series": names}
    with RunWriter(path, {**meta, "detector_state_size": 0}, tensorboard=False) as writer:
        writer.append(t, stats, series, None)
        writer.add_events(events)
    return path


def micro_record(step_b: int) -> dict:
    return {**micro(step_b).to_record(), "task": "loss", "reason": "spike"}


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("issue17")
    write_record(root / "repeated", [micro_record(s) for s in MICROS])
    write_record(root / "spaced", [micro_record(s) for s in (50, 350)])
    evals = [
        Evaluation(s, {"auc/click": v, "rmse/w": 1.0})
        for s, v in [(79, 0.7), (159, 0.72), (239, 0.52), (319, 0.5), (399, 0.5)]
    ]
    collapse = auc_collapse(evals)
    write_record(
        root / "auc",
        [e.to_record() for e in evals[:4]] + [collapse.to_record(), evals[4].to_record()],
    )
    return root


def test_postmortem_shows_both(records):
    from clippy_monitor.postmortem.html import render_html
    from clippy_monitor.postmortem.report import postmortem

    report = postmortem(records / "repeated")
    assert (
        "; consistently micro-diverging, 3 micro-divergences in steps 100-260" in report["verdict"]
    )
    assert report["repeated_micro"] == {
        "count": 3,
        "first_step": 100,
        "last_step": 260,
        "window": 1000,
        "steps": [100, 180, 260],
    }
    spaced = postmortem(records / "spaced")
    assert spaced["repeated_micro"] is None and "consistently" not in spaced["verdict"]
    auc = postmortem(records / "auc")
    assert auc["verdict"].startswith(
        "full divergence: the evaluation auc/click fell to chance at step 239 (last evaluation "
        "above chance at step 159) and stayed there at step 319 (auc_collapse"
    )
    assert [(e["kind"], e["series"], e["reason"]) for e in auc["events"]] == [
        ("full", "auc/click", "auc_collapse")
    ]
    page = render_html(load_run(records / "auc"), auc)
    assert "the evaluation auc/click fell to chance at step 239" in page
    assert "<td>auc/click</td><td>auc_collapse</td>" in page
    page = render_html(load_run(records / "repeated"), report)
    assert "consistently micro-diverging, 3 micro-divergences in steps 100-260" in page


def test_dash_shows_both(records):
    from clippy_monitor.dashboards.dash_app import health
    from clippy_monitor.dashboards.dash_app.runs import LiveRun

    live = LiveRun(records / "repeated")
    live.refresh()
    badge = health.health(live)
    assert (badge["state"], badge["detail"]) == (
        "healthy",
        "consistently micro-diverging, 3 micro-divergences in steps 100-260 (3 recovered so far)",
    )
    texts = [a["text"] for a in health.alerts(live)]
    assert texts[0] == "Consistently micro-diverging, 3 micro-divergences in steps 100-260."
    spaced = LiveRun(records / "spaced")
    spaced.refresh()
    assert not any("onsistently" in a["text"] for a in health.alerts(spaced))

    live = LiveRun(records / "auc")
    live.refresh()
    badge = health.health(live)
    assert (badge["state"], badge["title"], badge["detail"]) == (
        "diverged",
        "Fully diverged",
        "since step 319 · auc collapse",
    )
    alert = health.alerts(live)[0]
    assert alert["level"] == "danger" and alert["text"].startswith(
        "Full divergence by evaluation: auc/click fell to chance at step 239"
    )
    assert [e["key"] for e in health.episodes(live)] == ["full:239"]


def test_tensorboard_tab_shows_both(records):
    import json

    from tests.test_tensorboard_plugin import plugin_client

    _, request = plugin_client(records)

    def summary(run: str) -> dict:
        status, body = request("/summary", run=run)
        assert status == 200, body
        return json.loads(body)

    repeated = summary("repeated")
    assert repeated["repeated_micro"]["steps"] == list(MICROS)
    assert repeated["status"] == "healthy"
    assert summary("spaced")["repeated_micro"] is None
    auc = summary("auc")
    assert auc["status"] == "diverged"  # the detector series alone say healthy
    assert [(e["kind"], e["reason"]) for e in auc["events"]] == [("full", "auc_collapse")]


def test_a_resumed_monitor_reads_the_recorded_evaluations(tmp_path):
    """A new monitor on the same record (a new process resuming) applies the AUC rule to the
    evaluations recorded before it: the AUC had reached 0.8 before the resume, so two
    evaluations at chance after it are a collapse; a collapse recorded before is not written
    again."""
    from clippy_monitor import DivergenceMonitor

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(160, 4)).astype("f4"), rng.integers(0, 2, (160, 1)).astype("f4")
    model = tiny_model()
    first = DivergenceMonitor(tmp_path / "run", flush_every=5, tensorboard=False)
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[first], verbose=0)
    first.record_evaluation({"auc/click": 0.8}, step=9)
    first.close()

    resumed = DivergenceMonitor(tmp_path / "run", flush_every=5, tensorboard=False)
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[resumed], verbose=0)
    assert resumed.record_evaluation({"auc/click": 0.5}, step=14) is None
    collapse = resumed.record_evaluation({"auc/click": 0.5}, step=19)
    assert (collapse.step_a, collapse.step_b, collapse.step_c) == (9, 14, 19)
    resumed.close()

    again = DivergenceMonitor(tmp_path / "run", flush_every=5, tensorboard=False)
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[again], verbose=0)
    assert again.record_evaluation({"auc/click": 0.5}, step=29) is None  # already recorded
    again.close()
    collapses = [e for e in load_run(tmp_path / "run").events if e.get("reason") == "auc_collapse"]
    assert len(collapses) == 1
