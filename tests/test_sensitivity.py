"""The calibrated comparison of GC, AGC and Clippy at step-b (clippy_monitor.sensitivity, issue 17).

Records are written with RunWriter; the healthy measurements are evenly spaced so
that every quantile, median and factor is computed by hand.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from clippy_monitor import clipping
from clippy_monitor.record import LAYER_METRICS, RunWriter, load_run
from clippy_monitor.sensitivity import MIN_HEALTHY, calibrate, event_sensitivity, rule_factor

LAYERS = ["dense/kernel", "head/kernel"]
M = {name: i for i, name in enumerate(LAYER_METRICS)}
STEP_B = 101  # healthy rows 0..100 (step-a = 100)
#: Healthy levels of ‖g‖₂, ‖g‖₂/‖w‖₂ and ‖r/w‖∞: base * linspace(1, 2, 101).
BASE = {"grad_norm": 0.1, "grad_weight_ratio": 0.05, "update_weight_linf": 0.01}
RAMP = np.linspace(1.0, 2.0, STEP_B)  # median 1.5, 99th percentile (linear) 1.99


def constructed_stats(jumps: dict[str, float], n: int = STEP_B + 5) -> np.ndarray:
    """``[n, metrics, layers]``: healthy ramps, then at step-b each measurement times its median
    times ``jumps[metric]`` on layer 0 (layer 1 stays at its healthy median)."""
    stats = np.ones((n, len(LAYER_METRICS), len(LAYERS)), np.float32)
    stats[:, M["weight_norm"]] = 2.0
    stats[:, M["zero_grad_fraction"]] = 0.0
    for metric, base in BASE.items():
        stats[:STEP_B, M[metric]] = (base * RAMP)[:, None]
        stats[STEP_B:, M[metric]] = base * 1.5
        stats[STEP_B:, M[metric], 0] = base * 1.5 * jumps[metric]
    return stats


def write_record(path: Path, stats: np.ndarray, layers=LAYERS, metrics=LAYER_METRICS) -> Path:
    n = len(stats)
    meta = {
        "layers": list(layers),
        "layer_metrics": list(metrics),
        "series": ["loss"],
        "detector_state_size": 0,
    }
    with RunWriter(path, meta, tensorboard=False) as writer:
        writer.append(np.arange(n), stats, np.ones((n, 1)), None)
        writer.add_events(
            [{"kind": "full", "step_a": STEP_B - 1, "step_b": STEP_B, "step_c": n - 1,
              "recovered": None, "task": None, "reason": "no_recovery"}]
        )  # fmt: skip
    return path


@pytest.fixture
def clippy_jumps(tmp_path) -> Path:
    """‖r/w‖∞ jumps 100x at step-b, ‖g‖₂ and ‖g‖₂/‖w‖₂ 3x."""
    jumps = {"grad_norm": 3.0, "grad_weight_ratio": 3.0, "update_weight_linf": 100.0}
    return write_record(tmp_path / "run", constructed_stats(jumps))


def test_the_rule_whose_measurement_jumps_100x_reacts_most_with_the_hand_computed_factors(
    clippy_jumps,
):
    s = calibrate(load_run(clippy_jumps), STEP_B - 1, STEP_B)
    assert s.ok and s.reacts_most == "clippy" and s.largest_jump == "clippy"
    assert s.healthy_steps == (0, 100) and s.healthy_count == 101
    # threshold = base * 1.99 (99th percentile), median = base * 1.5, value = median * jump:
    # factor = 1.99 / (1.5 * jump).
    expected = {"gc": 1.99 / 4.5, "agc": 1.99 / 4.5, "clippy": 1.99 / 150}
    for name, factor in expected.items():
        r = s.rule(name)
        assert r.hardest.layer == "dense/kernel"
        assert r.factor == pytest.approx(factor, rel=1e-5)
        assert r.hardest.jump == pytest.approx(100.0 if name == "clippy" else 3.0, rel=1e-5)
        assert r.hardest.threshold == pytest.approx(BASE[r.measurement] * 1.99, rel=1e-5)
    head = s.by_layer()["head/kernel"]
    assert head["clippy"].jump == pytest.approx(1.0) and head["clippy"].factor == 1.0


def test_when_gc_jumps_most_gc_reacts_most(tmp_path):
    jumps = {"grad_norm": 100.0, "grad_weight_ratio": 3.0, "update_weight_linf": 3.0}
    s = calibrate(load_run(write_record(tmp_path / "r", constructed_stats(jumps))), 100, STEP_B)
    assert s.reacts_most == "gc" and s.rule("gc").factor == pytest.approx(1.99 / 150, rel=1e-5)


def test_report_is_strict_json_with_the_documented_keys(clippy_jumps):
    report = event_sensitivity(load_run(clippy_jumps), {"step_a": 100, "step_b": STEP_B})
    report = json.loads(json.dumps(report.to_report(), allow_nan=False))
    assert set(report) == {
        "step_a", "step_b", "quantile", "healthy_steps", "healthy_count", "reacts_most",
        "largest_jump", "note", "text", "rules", "layers",
    }  # fmt: skip
    assert [r["rule"] for r in report["rules"]] == ["gc", "agc", "clippy"]
    assert set(report["rules"][0]) == {
        "rule", "label", "measurement", "measurement_label", "layer", "factor", "jump",
        "threshold", "largest_jump", "largest_jump_layer",
    }  # fmt: skip
    assert report["text"].startswith(
        "with thresholds calibrated on the healthy steps 0..100 (99% unclipped), "
        "Clippy reacts most at step-b: σ Clippy 0.0133 on dense/kernel (‖r/w‖∞ 100x its healthy median)"
    )
    assert set(report["layers"]["head/kernel"]["gc"]) == {
        "layer", "rule", "threshold", "healthy_median", "value", "jump", "factor", "note",
    }  # fmt: skip


def test_rule_factor_is_the_twin_of_clipping_gc_agc_and_clippy():
    """rule_factor(m, t) == gc_factor(m, t) == agc_factor(g, w, t) == clippy_sigma(m / t)."""
    m = np.array([0.0, 1e-4, 0.05, 0.1, 0.7, 3.0, 1e3], np.float32)
    t = 0.1
    ours = rule_factor(m, t)
    np.testing.assert_allclose(np.asarray(clipping.gc_factor(m, t)), ours, rtol=1e-6)
    w = np.full_like(m, 2.0)
    np.testing.assert_allclose(np.asarray(clipping.agc_factor(m * w, w, t)), ours, rtol=1e-6)
    clippy = np.asarray(clipping.clippy_sigma(m[1:] / t))  # m = 0: a zero step, sigma 1
    np.testing.assert_allclose(clippy, ours[1:], rtol=1e-6)
    assert math.isnan(float(rule_factor(np.nan, t))) and float(rule_factor(np.inf, t)) == 0.0


@pytest.mark.parametrize("step_b", [0, MIN_HEALTHY - 1])
def test_too_few_healthy_steps_say_so(tmp_path, step_b):
    run = load_run(write_record(tmp_path / "r", constructed_stats(dict.fromkeys(BASE, 3.0))))
    s = calibrate(run, step_b - 1, step_b)
    assert not s.ok and s.rules == () and s.reacts_most is None
    assert (
        s.note == f"only {step_b} healthy steps before step-b ({MIN_HEALTHY} needed to calibrate)"
    )
    assert s.to_report()["text"] == f"no calibrated comparison: {s.note}"


def test_no_step_b_says_so(clippy_jumps):
    s = calibrate(load_run(clippy_jumps), None, None)
    assert not s.ok and s.note == "no recorded step-b: nothing to compare"


def test_nan_inf_and_zero_medians(tmp_path):
    """Layer 0: ‖r/w‖∞ inf at step-b (factor 0, jump inf), ‖g‖₂ NaN at step-b; layer 1: ‖g‖₂/‖w‖₂
    zero on healthy steps (no threshold), NaN healthy values are skipped."""
    stats = constructed_stats(dict.fromkeys(BASE, 3.0))
    stats[STEP_B, M["update_weight_linf"], 0] = np.inf
    stats[STEP_B, M["grad_norm"], 0] = np.nan
    stats[:STEP_B, M["grad_weight_ratio"], 1] = 0.0
    stats[:10, M["grad_norm"], 1] = np.nan  # 91 finite healthy values left
    s = calibrate(load_run(write_record(tmp_path / "r", stats)), 100, STEP_B)
    layer0, layer1 = s.by_layer()["dense/kernel"], s.by_layer()["head/kernel"]
    assert layer0["clippy"].factor == 0.0 and layer0["clippy"].jump == math.inf
    assert layer0["gc"].factor is None and layer0["gc"].note == "NaN at step-b"
    assert layer1["agc"].threshold is None and layer1["agc"].factor is None
    assert layer1["agc"].note.startswith("the measurement was 0 on the healthy steps")
    expected = float(np.quantile(0.1 * RAMP[10:], 0.99))
    assert layer1["gc"].threshold == pytest.approx(expected, rel=1e-5)
    assert s.reacts_most == "clippy" and s.rule("clippy").factor == 0.0
    report = json.loads(json.dumps(s.to_report(), allow_nan=False))
    assert (
        report["rules"][2]["jump"] == "inf"
        and report["layers"]["dense/kernel"]["gc"]["value"] is None
    )


def test_a_layer_with_too_few_finite_healthy_values_is_left_uncalibrated(tmp_path):
    stats = constructed_stats(dict.fromkeys(BASE, 3.0))
    stats[: STEP_B - 5, M["update_weight_linf"], 1] = np.nan  # 5 finite left
    s = calibrate(load_run(write_record(tmp_path / "r", stats)), 100, STEP_B)
    x = s.by_layer()["head/kernel"]["clippy"]
    assert x.threshold is None and x.note == f"5 finite healthy values ({MIN_HEALTHY} needed)"
    assert s.rule("clippy").hardest.layer == "dense/kernel"


def test_a_measurement_not_recorded_leaves_its_rule_out(tmp_path):
    metrics = [m for m in LAYER_METRICS if m != "update_weight_linf"]
    stats = constructed_stats(dict.fromkeys(BASE, 3.0))[:, [M[m] for m in metrics]]
    s = calibrate(load_run(write_record(tmp_path / "r", stats, metrics=metrics)), 100, STEP_B)
    assert [r.rule for r in s.rules] == ["gc", "agc"] and s.ok


def test_the_healthy_window_is_the_last_rows_before_step_a(tmp_path):
    """A start-up transient (‖r/w‖∞ 1000x on the first 30 rows) is outside a 50-row window,
    inside the whole healthy span (where it sets the 99th percentile)."""
    stats = constructed_stats(dict.fromkeys(BASE, 3.0))
    stats[:30, M["update_weight_linf"]] *= 1000
    run = load_run(write_record(tmp_path / "r", stats))
    recent = calibrate(run, 100, STEP_B, window=50)
    assert recent.healthy_steps == (51, 100) and recent.healthy_count == 50
    clippy = recent.rule("clippy").hardest
    assert clippy.threshold == pytest.approx(0.01 * float(np.quantile(RAMP[51:], 0.99)), rel=1e-5)
    whole = calibrate(run, 100, STEP_B, window=None)
    assert whole.healthy_count == 101 and whole.rule("clippy").factor == 1.0


def test_when_no_rule_clips_the_sentence_says_so_and_names_the_largest_jump(tmp_path):
    """Jumps of 1.2x stay under the healthy 99th percentile (1.99 / 1.5 = 1.33x the median)."""
    jumps = {"grad_norm": 1.1, "grad_weight_ratio": 1.0, "update_weight_linf": 1.2}
    s = calibrate(load_run(write_record(tmp_path / "r", constructed_stats(jumps))), 100, STEP_B)
    assert all(r.factor == 1.0 for r in s.rules) and s.largest_jump == "clippy"
    assert s.to_report()["text"] == (
        "with thresholds calibrated on the healthy steps 0..100 (99% unclipped), no rule would "
        "clip at step-b (every measurement within its healthy 99% quantile); the largest jump "
        "is Clippy's: ‖r/w‖∞ 1.2x its healthy median on dense/kernel"
    )


# --------------------------------------------------------------------------
# Readers: the Dash Replay view
# --------------------------------------------------------------------------
def test_dash_reaction_rows_and_block(clippy_jumps):
    from clippy_monitor.dashboards.dash_app.layout import reaction_block
    from clippy_monitor.dashboards.dash_app.summary import ReactionRow, reaction_rows

    s = calibrate(load_run(clippy_jumps), 100, STEP_B)
    rows = reaction_rows(s)
    assert [(r.rule, r.measurement, r.layer, r.reacts_most) for r in rows] == [
        ("GC", "‖g‖₂", "dense/kernel", False),
        ("AGC", "‖g‖₂/‖w‖₂", "dense/kernel", False),
        ("Clippy", "‖r/w‖∞", "dense/kernel", True),
    ]
    assert rows[2].factor == pytest.approx(1.99 / 150, rel=1e-5)
    assert rows[2].jump == pytest.approx(100, rel=1e-5) and isinstance(rows[0], ReactionRow)
    text = str(reaction_block(s).to_plotly_json())
    assert "How each rule reacts at step-b, thresholds calibrated" in text
    assert "0.0133" in text and "100x (‖r/w‖∞)" in text and "3x (‖g‖₂)" in text
    too_early = calibrate(load_run(clippy_jumps), 4, 5)
    assert reaction_rows(too_early) == [] and reaction_rows(None) == []
    assert "no calibrated comparison: only 5 healthy steps" in str(
        reaction_block(too_early).to_plotly_json()
    )


def test_the_demo_reports_the_same_jumps_as_the_post_mortem(tmp_path):
    """The demo's "layers that blew up first" are the sensitivity's jumps (value at step-b over
    the healthy median), not a second definition: a larger value one step after step-b (1000x)
    does not change them."""
    from clippy_monitor.testbed.demo import DEMO_TESTBED, describe_divergence

    jumps = {"grad_norm": 3.0, "grad_weight_ratio": 3.0, "update_weight_linf": 100.0}
    stats = constructed_stats(jumps)
    stats[STEP_B + 1, M["update_weight_linf"], 0] = BASE["update_weight_linf"] * 1.5 * 1000
    run = load_run(write_record(tmp_path / "run", stats))
    lines = describe_divergence(None, run, DEMO_TESTBED, top=2)
    header = lines.index(next(line for line in lines if "blew up first" in line))
    assert f"median over the {STEP_B} healthy steps up to step-a" in lines[header]
    assert lines[header + 2].split() == ["dense/kernel", "x100", "x3.0"]
    assert lines[header + 3].split() == ["head/kernel", "x1.0", "x1.0"]
