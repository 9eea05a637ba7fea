"""Post-mortem of run records (clippy_monitor.postmortem, `clippy-monitor postmortem`).

Most records are written synthetically with RunWriter (fast, exact values);
one comes from a real monitored training on the testbed (a multitask ranking
model whose Adagrad learning rate jumps 400x mid-run, paper 2.2 (3)).  The HTML
report is opened offline in headless Chromium.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from html import escape as html_escape
from pathlib import Path

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from clippy_monitor.cli import main
from clippy_monitor.display import bucket_max, bucket_min, minmax_envelope
from clippy_monitor.postmortem import Options, build_report, postmortem, render_text, to_json
from clippy_monitor.postmortem.analysis import sustained_start
from clippy_monitor.postmortem.html import render_html
from clippy_monitor.record import LAYER_METRICS, RunWriter, load_run
from clippy_monitor.record.format import (
    EVENTS_FILE,
    META_FILE,
    RECORD_FILE,
    RECORD_FILES,
    TB_FILE_PREFIX,
)
from clippy_monitor.record.status import decode_status
from tests.browser import chromium, screenshot_path

REPO = Path(__file__).resolve().parents[1]
LAYERS = ["a/kernel", "b/kernel", "c/kernel", "d/kernel"]
TASKS = ["click", "like"]
SERIES = [
    "loss",
    "loss/click",
    "loss/like",
    "learning_rate",
    "grad_norm",
    "detector/status",
    "detector/since_onset",
    "detector/task",
]
M = {name: i for i, name in enumerate(LAYER_METRICS)}
STEP_B, STEP_C = 300, 330
STEP_D = 360  # the detector declares the full divergence (no recovery) after step-c


# --------------------------------------------------------------------------
# Synthetic records
# --------------------------------------------------------------------------
def _healthy_arrays(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(stats [n, M, L], series [n, S])`` of a healthy run: lognormal noise around fixed levels."""
    rng = np.random.default_rng(seed)
    L = len(LAYERS)
    noise = np.exp(0.05 * rng.standard_normal((n, L)))
    stats = np.empty((n, len(LAYER_METRICS), L), np.float32)
    stats[:, M["grad_norm"]] = 0.1 * noise
    stats[:, M["weight_norm"]] = 2.0
    stats[:, M["grad_weight_ratio"]] = 0.05 * noise
    stats[:, M["update_weight_linf"]] = 0.01 * noise
    stats[:, M["gc_factor"]] = 1.0
    stats[:, M["agc_factor"]] = 0.02 / noise
    stats[:, M["clippy_factor"]] = 1.0
    stats[:, M["applied_factor"]] = 1.0
    stats[:, M["nonfinite_count"]] = 0.0
    stats[:, M["zero_grad_fraction"]] = 0.05
    tasks = 0.5 * np.exp(0.03 * rng.standard_normal((n, 2)))
    series = np.column_stack(
        [
            tasks.sum(1),
            tasks,
            np.full(n, 0.1),
            np.full(n, 0.2),
            np.zeros(n),
            np.full(n, -1.0),
            np.full(n, -1.0),
        ]
    )
    return stats, series


def _diverged_arrays() -> tuple[np.ndarray, np.ndarray, dict]:
    """Layer c leaves its baseline 30 steps before step-b, a 10 steps before, d and b at step-b
    (d farther); b also has a lone spike 40 steps before step-b; task like moves 5 steps before click."""
    stats, series = _healthy_arrays()
    t = np.arange(len(stats))
    a, b, c, d = range(4)
    stats[270:STEP_C, M["grad_norm"], c] *= 5
    stats[290:STEP_C, M["update_weight_linf"], a] *= 5
    stats[STEP_B:STEP_C, M["grad_norm"], d] *= 100
    stats[STEP_B:STEP_C, M["grad_norm"], b] *= 30
    stats[260, M["grad_norm"], b] *= 10  # a lone excursion: not a sustained departure
    stats[STEP_B, M["gc_factor"]] = [0.5, 0.2, 0.1, 0.05]
    stats[STEP_B, M["agc_factor"]] = [0.9, 0.4, 0.3, 0.2]
    stats[STEP_B, M["clippy_factor"]] = [0.004, 0.002, 0.001, 0.0005]
    stats[STEP_C:, M["grad_norm"]] = 1e-7  # dying ReLU: gradients collapse after step-c
    stats[STEP_C:, M["zero_grad_fraction"]] = 0.95
    series[295:, 2] *= 3  # loss/like
    series[STEP_B:STEP_C, 1] *= 1.5  # loss/click rises at step-b ...
    series[STEP_C:, 1] *= 6  # ... and is at its divergent level from step-c on
    series[:, 0] = series[:, 1] + series[:, 2]
    series[:, 5] = np.where(t >= STEP_D, 2.1, np.where(t >= STEP_B, 1.0, 0.0))
    series[:, 6] = np.where(t >= STEP_B, t - STEP_B, -1)
    series[:, 7] = np.where(t >= STEP_B, 2, -1)
    event = {
        "kind": "full",
        "step_a": STEP_B - 1,
        "step_b": STEP_B,
        "step_c": STEP_C,
        "recovered": None,
        "confirmed_at": STEP_B + 1,
        "decided_at": STEP_D,
        "task": "loss/like",
        "reason": "no_recovery",
    }
    return stats, series, event


def _write(
    logdir: Path,
    stats: np.ndarray,
    series: np.ndarray,
    events=(),
    chunk: int = 100,
    tensorboard: bool = False,
) -> Path:
    meta = {
        "layers": LAYERS,
        "layer_metrics": list(LAYER_METRICS),
        "series": SERIES,
        "tasks": TASKS,
        "detector_state_size": 0,
        "thresholds": {"gc_clipnorm": 0.1},
    }
    with RunWriter(logdir, meta, tensorboard=tensorboard) as writer:
        for i in range(0, len(stats), chunk):
            writer.append(
                np.arange(i, min(i + chunk, len(stats))),
                stats[i : i + chunk],
                series[i : i + chunk],
                None,
            )
        if events:
            writer.add_events(list(events))
    return logdir


@pytest.fixture
def healthy(tmp_path) -> Path:
    return _write(tmp_path / "healthy", *_healthy_arrays())


@pytest.fixture
def diverged(tmp_path) -> Path:
    stats, series, event = _diverged_arrays()
    return _write(tmp_path / "diverged", stats, series, [event])


def _cli(capsys, *argv: str) -> tuple[int, str, list[str]]:
    code = main(["postmortem", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err.splitlines()


# --------------------------------------------------------------------------
# Analysis on synthetic records
# --------------------------------------------------------------------------
def test_healthy_run_has_no_events_and_a_healthy_verdict(healthy, capsys):
    code, out, err = _cli(capsys, healthy, "--json")
    assert code == 0 and err == []
    report = json.loads(out)
    assert report["events"] == [] and report["culprits"] == [] and report["factors_at_step_b"] == {}
    assert report["verdict"].startswith("healthy: no loss divergence in 400 steps (0..399)")
    assert report["steps"] == 400 and report["focus"] is None
    assert report["dead_units"]["before"]["mean"] == pytest.approx(0.05, rel=1e-5)
    assert report["dead_units"]["newly_dead"] == []


def test_units_dying_without_a_loss_event_qualify_the_healthy_verdict(tmp_path):
    """A short run with no event whose layer 'b' dies in the second half (Table 3's
    Large+DCN): the windows are thirds, so they do not overlap and dilute it."""
    stats, series = _healthy_arrays(n=280)
    stats[180:, M["zero_grad_fraction"], 1] = 0.6
    report = postmortem(_write(tmp_path / "dying", stats, series))
    assert (
        report["events"] == []
        and report["windows"]["baseline"] == [0, 92]
        and report["windows"]["after"] == [187, 279]
    )
    assert report["dead_units"]["newly_dead"] == [LAYERS[1]]
    assert report["verdict"].startswith("healthy: no loss divergence in 280 steps (0..279)")
    assert report["verdict"].endswith(
        "but units died in 1 layer (zero-gradient share up by >= 0.25, dying ReLU: see dead units)"
    )


def test_culprits_are_ranked_by_how_early_then_how_far(diverged):
    report = postmortem(diverged)
    assert report["culprits"] == ["c/kernel", "a/kernel", "d/kernel", "b/kernel"]
    assert (
        postmortem(diverged, options=Options(z_threshold=50.0))["culprits"] == []
    )  # nothing went that far
    departed = {d["name"]: (d["departed_at"], d["metric"]) for d in report["layer_departures"]}
    assert departed["c/kernel"] == (270, "grad_norm")
    assert departed["a/kernel"] == (290, "update_weight_linf")
    assert (
        departed["b/kernel"][0] == departed["d/kernel"][0] == STEP_B
    )  # b's lone spike at 260 is not a departure
    assert report["first_task"] == "like"
    assert [(d["name"], d["departed_at"]) for d in report["task_departures"]] == [
        ("like", 295),
        ("click", STEP_B),
    ]
    assert report["moments"] == {"step_a": STEP_B - 1, "step_b": STEP_B, "step_c": STEP_C}
    assert report["verdict"].startswith(
        "full divergence: the loss started rising at step 300 in task like (last healthy step 299) "
        "and fully diverged at step 330 (no_recovery; the detector decided at step 360); "
        "first to leave their baseline: c/kernel, a/kernel, d/kernel"
    )
    # The verdict compares the rules at thresholds calibrated on the healthy steps (issue 17):
    # d's ‖g‖₂ jumps 100x at step-b, no ratio or ‖r/w‖∞ moves there (a's rose from 290, < 1% of
    # the healthy rows 100..299, so within its 99th percentile), so GC reacts most.
    assert report["verdict"].endswith(
        "; with thresholds calibrated on the healthy steps 100..299 (99% unclipped), GC reacts most "
        "at step-b: σ GC 0.0114 on d/kernel (‖g‖₂ 97.9x its healthy median), against σ AGC 1 on "
        "c/kernel (‖g‖₂/‖w‖₂ 1.07x its healthy median) and σ Clippy 1 on a/kernel "
        "(‖r/w‖∞ 4.7x its healthy median)"
    )
    assert report["sensitivity_at_step_b"]["reacts_most"] == "gc"
    assert report["sensitivity_at_step_b"]["text"] in report["verdict"]
    dead = report["dead_units"]
    assert dead["before"]["mean"] == pytest.approx(0.05, rel=1e-5) and dead["after"][
        "mean"
    ] == pytest.approx(0.95, rel=1e-5)
    assert dead["newly_dead"] == LAYERS and dead["after"]["steps"][0] == STEP_C


def test_factors_at_step_b_equal_the_recorded_values(diverged):
    run = load_run(diverged)
    report = build_report(run)
    row = int(np.searchsorted(run.steps, STEP_B))
    for j, layer in enumerate(LAYERS):
        got = report["factors_at_step_b"][layer]
        for rule in ("gc", "agc", "clippy", "applied"):
            assert (
                np.float32(got[rule]) == run.factor(rule)[row, j]
            )  # the recorded float32, shortest decimal
        assert got["clippy_over_gc"] == pytest.approx(got["clippy"] / got["gc"])
        assert got["clippy_over_agc"] == pytest.approx(got["clippy"] / got["agc"])
        table = report["table"][layer]
        assert table["step_b"]["clippy"] == got["clippy"]
        assert np.float32(table["step_a"]["grad_norm"]) == run.layer("grad_norm")[row - 1, j]
        assert table["step_c"]["grad_norm"] == pytest.approx(1e-7)


def test_json_schema(diverged, capsys):
    code, out, _ = _cli(capsys, diverged, "--json")
    assert code == 0
    report = json.loads(out)  # strict JSON: one object
    required = {
        "schema_version",
        "run",
        "steps",
        "first_step",
        "last_step",
        "layers",
        "tasks",
        "verdict",
        "events",
        "events_source",
        "focus",
        "moments",
        "culprits",
        "layer_departures",
        "first_task",
        "task_departures",
        "table",
        "factors_at_step_b",
        "clippy_contrast",
        "sensitivity_at_step_b",
        "dead_units",
        "windows",
        "options",
        "thresholds",
        "detector",
        "skipped",
        "ignored",
    }
    assert required <= set(report) and report["ignored"] == []
    assert report["steps"] == 400 and report["layers"] == LAYERS and report["tasks"] == TASKS
    (event,) = report["events"]
    assert event == {
        "kind": "full",
        "step_a": 299,
        "step_b": 300,
        "step_c": 330,
        "recovered": None,
        "confirmed_at": 301,
        "decided_at": 360,
        "task": "like",
        "series": "loss/like",
        "reason": "no_recovery",
        "source": "recorded",
    }
    assert set(report["factors_at_step_b"]) == set(LAYERS)
    assert set(report["factors_at_step_b"]["a/kernel"]) == {
        "gc",
        "agc",
        "clippy",
        "applied",
        "clippy_over_gc",
        "clippy_over_agc",
    }
    assert set(report["table"]["a/kernel"]) == {"step_a", "step_b", "step_c"}
    assert set(report["dead_units"]) == {"before", "after", "newly_dead"}
    assert report["thresholds"] == {"gc_clipnorm": 0.1} and report["skipped"] == []
    sensitivity = report["sensitivity_at_step_b"]
    assert sensitivity["healthy_steps"] == [100, 299] and sensitivity["healthy_count"] == 200
    assert [r["rule"] for r in sensitivity["rules"]] == ["gc", "agc", "clippy"]
    assert set(sensitivity["layers"]) == set(LAYERS)
    assert set(sensitivity["layers"]["d/kernel"]) == {"gc", "agc", "clippy"}


def test_text_report(diverged, capsys):
    code, out, err = _cli(capsys, diverged)
    assert code == 0 and err == []
    assert "verdict  full divergence" in out and "c/kernel" in out and "Clippy/GC" in out
    calibrated = out.index(
        "how each rule reacts at step-b (300), thresholds calibrated on this run's healthy steps "
        "(99% of them unclipped)"
    )
    fixed = out.index(
        "clipping factors at step-b (300) at the paper's thresholds, as you would train with them "
        "(GC 0.1, AGC -, Clippy - / -)"
    )
    assert calibrated < fixed
    section = out[calibrated:fixed]
    (gc_row,) = [line for line in section.splitlines() if line.startswith("GC (reacts most)")]
    assert gc_row.split()[3:] == [
        "‖g‖₂", "d/kernel", "0.1", "0.112", "9.82", "97.9x", "0.0114", "97.9x", "(d/kernel)",
    ]  # fmt: skip
    (d_row,) = [line for line in section.splitlines() if line.startswith("d/kernel")]
    assert d_row.split() == ["d/kernel", "97.9", "0.979", "0.979", "0.0114", "1", "1"]


def test_html_shows_the_calibrated_comparison_before_the_fixed_thresholds(diverged):
    run = load_run(diverged)
    report = build_report(run)
    text = render_html(run, report)
    calibrated = text.index(
        "<h2>How each rule reacts at step-b, thresholds calibrated on this run's healthy steps</h2>"
    )
    fixed = text.index(
        "<h2>At the paper's thresholds, as you would train with them: factors at step-b</h2>"
    )
    assert calibrated < fixed
    assert html_escape(report["sensitivity_at_step_b"]["text"]) in text[calibrated:fixed]
    assert "(GC 0.1, AGC -, Clippy - / -)" in text[fixed:]
    assert "<td class=name>GC (reacts most)</td>" in text[calibrated:fixed]
    figures = json.loads(
        re.search(r"const FIGURES = (\{.*?\});\n", text, re.S).group(1).replace("<\\/", "</")
    )
    bars = {t["name"]: dict(zip(t["x"], t["y"])) for t in figures["calibrated_factors"]["data"]}
    layers = report["sensitivity_at_step_b"]["layers"]
    assert bars["GC"] == {n: layers[n]["gc"]["factor"] for n in LAYERS}
    assert (
        bars["GC"]["d/kernel"] == pytest.approx(0.0114, rel=1e-2)
        and bars["Clippy"]["a/kernel"] == 1
    )
    fixed_bars = {t["name"]: dict(zip(t["x"], t["y"])) for t in figures["factors"]["data"]}
    assert fixed_bars["Clippy"]["c/kernel"] == pytest.approx(0.001)


def test_a_step_b_without_healthy_steps_says_so_everywhere(tmp_path):
    """step-b at step 5: too few healthy steps to calibrate; text, JSON and HTML say so."""
    stats, series, event = _diverged_arrays()
    event = {**event, "step_a": 4, "step_b": 5, "step_c": 30}
    run = load_run(_write(tmp_path / "early", stats, series, [event]))
    report = build_report(run)
    note = "only 5 healthy steps before step-b (20 needed to calibrate)"
    assert report["sensitivity_at_step_b"]["note"] == note
    assert report["sensitivity_at_step_b"]["rules"] == []
    assert report["verdict"].endswith(f"; no calibrated comparison: {note}")
    assert f"  no calibrated comparison: {note}" in render_text(report)
    assert f"no calibrated comparison: {html_escape(note)}" in render_html(run, report)


def test_event_lost_from_a_torn_events_file_is_read_off_the_detector_series(tmp_path, capsys):
    stats, series, event = _diverged_arrays()
    logdir = _write(tmp_path / "run", stats, series, [event])
    data = (logdir / EVENTS_FILE).read_bytes()
    (logdir / EVENTS_FILE).write_bytes(data[:-10])  # torn last line: the monitor's event is gone
    code, out, err = _cli(capsys, logdir, "--json")
    report = json.loads(out)
    assert code == 3 and len(err) == 1 and "torn last line" in err[0]
    (full,) = report["events"]
    assert full["source"] == "status" and (full["step_a"], full["step_b"], full["step_c"]) == (
        299,
        300,
        330,
    )
    assert full["task"] == "like" and full["reason"] == "no_recovery"
    # Read off the status series and the loss: confirmed at the first abnormal row, step-c
    # where the loss reached its divergent level, decided at the first diverged row.
    assert (full["confirmed_at"], full["step_c"], full["decided_at"]) == (STEP_B, STEP_C, STEP_D)
    assert [decode_status(v)[1] for v in (2.1, 2.2, 2.3)] == [
        "no_recovery",
        "non_finite",
        "grad_collapse",
    ]


def test_record_ending_mid_episode_reports_an_open_event(tmp_path):
    stats, series, _ = _diverged_arrays()
    report = postmortem(
        _write(tmp_path / "run", stats[:320], series[:320])
    )  # crashed before step-c
    (event,) = report["events"]
    assert event["kind"] == "open" and event["step_b"] == STEP_B and event["step_c"] is None
    assert report["verdict"].startswith(
        "abnormal at the end of the record: the loss started rising at step 300 in task like"
    )


def test_redetect_with_other_thresholds(tmp_path, capsys):
    stats, series = _healthy_arrays()
    series[200:204, 1] *= 4  # a 4-step spike of the click loss, never recorded as an event
    series[:, 0] = series[:, 1] + series[:, 2]
    logdir = _write(tmp_path / "run", stats, series)
    assert postmortem(logdir)["events"] == []
    code, out, err = _cli(
        capsys, logdir, "--json", "--redetect", "warmup_steps=20", "spike_ratio=1.5"
    )
    assert code == 0 and err == []
    report = json.loads(out)
    (event,) = report["events"]
    assert (
        event["kind"] == "micro"
        and event["step_b"] == 200
        and event["task"] == "click"
        and event["source"] == "redetected"
    )
    assert report["events_source"] == "redetected" and report["detector"]["spike_ratio"] == 1.5
    assert report["verdict"].startswith(
        "micro-divergence at step 200 in task click recovered at step 204"
    )


def test_postmortem_does_not_import_tensorflow(diverged):
    code = (
        "import sys, io, contextlib\n"
        "from clippy_monitor.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    assert main(['postmortem', {str(diverged)!r}, '--json', '--html', {str(diverged / 'r.html')!r}]) == 0\n"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'TensorFlow was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)


# --------------------------------------------------------------------------
# Damaged and bad input
# --------------------------------------------------------------------------
def test_truncated_record_is_analysed_up_to_the_tear(tmp_path, capsys):
    stats, series, event = _diverged_arrays()
    logdir = _write(tmp_path / "run", stats, series, [event])
    record = logdir / RECORD_FILE
    record.write_bytes(
        record.read_bytes()[:-500]
    )  # kill -9 mid-write: the last chunk (steps 300..399) is torn
    code, out, err = _cli(capsys, logdir, "--json")
    assert code == 3
    assert len(err) == 1 and err[0].startswith("clippy-monitor postmortem: warning: ")
    assert (
        "incomplete chunk (steps 300..399" in err[0]
        and "torn tail" in err[0]
        and "analysed the 300 readable steps" in err[0]
    )
    report = json.loads(out)
    assert report["steps"] == 300 and report["last_step"] == 299
    assert len(report["skipped"]) == 1 and "torn tail" in report["skipped"][0]
    assert (
        report["events"][0]["step_b"] == STEP_B
    )  # the recorded event survives; step-b itself was not recorded
    assert report["culprits"] == [] and report["factors_at_step_b"] == {}


def test_corrupt_chunk_in_the_middle_is_skipped(tmp_path, capsys):
    stats, series = _healthy_arrays()
    logdir = _write(tmp_path / "run", stats, series)
    data = bytearray((logdir / RECORD_FILE).read_bytes())
    run = load_run(logdir)
    data[run.chunks[1].offset + 200] ^= 0xFF  # a flipped bit in the payload of steps 100..199
    (logdir / RECORD_FILE).write_bytes(bytes(data))
    code, out, err = _cli(capsys, logdir, "--json")
    report = json.loads(out)
    assert code == 3 and len(err) == 1 and "payload CRC mismatch" in err[0]
    assert report["steps"] == 300 and report["verdict"].startswith("healthy")


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "corrupt_meta"
    corrupt.mkdir()
    (corrupt / META_FILE).write_text('{"layers": [')
    garbage = tmp_path / "garbage"
    _write(garbage, *_healthy_arrays(10))
    (garbage / RECORD_FILE).write_bytes(b"\0garbage" * 100)
    run = _write(tmp_path / "ok", *_healthy_arrays(10))
    return {
        "missing path": ([str(tmp_path / "nope")], "no such file or directory"),
        "directory holding no run": ([str(empty)], "holds no clippy record"),
        "corrupt meta": ([str(corrupt)], "unreadable clippy meta"),
        "no readable step": ([str(garbage)], "no readable steps in the record"),
        "bad --redetect item": ([str(run), "--redetect", "spike_ratio"], "want NAME=NUMBER"),
        "unknown threshold": ([str(run), "--redetect", "spike=3"], "unknown threshold(s) spike"),
        "invalid threshold": ([str(run), "--redetect", "warmup_steps=1.5"], "--redetect:"),
        "unwritable --html": (
            [str(run), "--html", str(tmp_path / "no" / "dir" / "r.html")],
            "cannot write the HTML report",
        ),
    }


def test_bad_input_gets_one_line_and_exit_2(tmp_path, capsys):
    for name, (argv, message) in _bad_inputs(tmp_path).items():
        code, out, err = _cli(capsys, *argv)
        assert code == 2, name
        assert (
            len(err) == 1
            and err[0].startswith("clippy-monitor postmortem: error: ")
            and message in err[0]
        ), (name, err)
        assert out == "", name


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    for argv in ([str(tmp_path / "missing")], [str(tmp_path)]):
        proc = subprocess.run(
            [sys.executable, "-m", "clippy_monitor.cli", "postmortem", *argv],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )
        assert proc.returncode == 2 and proc.stdout == ""
        assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr


# --------------------------------------------------------------------------
# --html never writes onto a run record (issue 13, item 3)
# --------------------------------------------------------------------------
def _digests(*dirs: Path) -> dict[str, str]:
    """sha256 of every file under ``dirs``; a symlink as ``link -> target``."""
    out = {}
    for d in dirs:
        for path in sorted(d.rglob("*")):
            if path.is_symlink():
                out[str(path)] = f"link -> {os.readlink(path)}"
            elif path.is_file():
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture
def two_runs(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """``run`` (with a TensorBoard event file) and ``other``, under the current directory ``tmp_path``."""
    monkeypatch.chdir(tmp_path)
    run = _write(tmp_path / "run", *_healthy_arrays(50), tensorboard=True)
    other = _write(tmp_path / "other", *_healthy_arrays(20))
    return run, other


def _html_targets(run: Path, other: Path) -> dict[str, Path]:
    """Every alias of a record file that ``--html`` must refuse (relative ones from ``run.parent``)."""
    base = run.parent
    (base / "link.html").symlink_to(run / RECORD_FILE)
    (base / "alias").symlink_to(run, target_is_directory=True)
    os.link(run / RECORD_FILE, base / "hard.html")
    os.link(other / META_FILE, other / "hard.html")
    (tensorboard,) = run.glob(f"{TB_FILE_PREFIX}*")
    return {
        **{name: run / name for name in RECORD_FILES},
        "record, relative": Path("run") / RECORD_FILE,
        "tensorboard event file": tensorboard,
        "dot-dot": Path("./run/../run") / RECORD_FILE,
        "another run's meta": other / META_FILE,
        "another letter case": Path("other") / "CLIPPY_EVENTS.JSONL",
        "symlink to the record": base / "link.html",
        "symlinked run directory": Path("alias") / EVENTS_FILE,
        "hard link to the record": base / "hard.html",
        "hard link in another run": other / "hard.html",
        "the run directory": run,
        "a directory": base,
    }


def test_html_refuses_to_write_onto_a_record_file(two_runs, capsys):
    run, other = two_runs
    targets = _html_targets(run, other)
    before = _digests(run.parent)
    for name, target in targets.items():
        code, out, err = _cli(capsys, run, "--html", target)
        assert code == 2 and out == "", name
        assert len(err) == 1 and err[0].startswith("clippy-monitor postmortem: error: "), (
            name,
            err,
        )
        assert str(target) in err[0] and ("run record" in err[0] or "is a directory" in err[0]), (
            name,
            err,
        )
        assert _digests(run.parent) == before, name


def test_html_is_written_atomically(tmp_path, capsys, monkeypatch):
    run = _write(tmp_path / "run", *_healthy_arrays(50))
    page = tmp_path / "report.html"
    page.write_text("old report")
    monkeypatch.setattr(
        os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device"))
    )
    code, out, err = _cli(capsys, run, "--html", page)
    assert code == 2 and out == "" and len(err) == 1
    assert (
        err[0]
        == f"clippy-monitor postmortem: error: {page}: cannot write the HTML report (No space left on device)"
    )
    assert page.read_text() == "old report" and sorted(p.name for p in tmp_path.iterdir()) == [
        "report.html",
        "run",
    ]
    monkeypatch.undo()
    code, out, err = _cli(
        capsys, run, "--html", page
    )  # an ordinary file, and one inside the run directory
    assert code == 0 and err == [] and page.read_text().startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "run"]


# --------------------------------------------------------------------------
# Impossible values in the detector series (issue 13, item 7)
# --------------------------------------------------------------------------
BAD_VALUES = (np.inf, -np.inf, np.nan, 1e308, -1e308, 1e19)


@pytest.mark.parametrize("name", ["detector/since_onset", "detector/task", "detector/status"])
@pytest.mark.parametrize("value", BAD_VALUES, ids=str)
def test_impossible_detector_value_is_ignored_with_one_warning(tmp_path, capsys, name, value):
    stats, series, _ = _diverged_arrays()
    rows = (
        slice(100, 101) if name == "detector/status" else slice(STEP_C, None)
    )  # a healthy row / the diverged rows
    series[rows, SERIES.index(name)] = value
    logdir = _write(
        tmp_path / "run", stats, series
    )  # no event line: the events come from the detector series
    code, out, err = _cli(capsys, logdir, "--json")
    assert code == 3 and len(err) == 1, err
    assert err[0].startswith(
        f"clippy-monitor postmortem: warning: {logdir}: impossible recorded values ignored: {name}: "
    )
    report = json.loads(out)
    (event,) = report["events"]
    assert (event["kind"], event["step_a"], event["step_b"], event["step_c"]) == (
        "full",
        STEP_B - 1,
        STEP_B,
        STEP_C,
    )
    assert event["task"] == (None if name == "detector/task" else "like")
    assert len(report["ignored"]) == 1 and report["ignored"][0].startswith(f"{name}: ")
    if name == "detector/status":  # the Dash app and the TensorBoard tab read a status the same way
        assert decode_status(value) == (0, None)


def test_non_finite_loss_is_a_divergence_not_bad_input(tmp_path, capsys):
    stats, series, event = _diverged_arrays()
    series[STEP_C:, 0:3] = [np.inf, np.nan, np.inf]  # loss, loss/click, loss/like
    series[STEP_C:, SERIES.index("detector/status")] = 2.2  # non_finite
    code, out, err = _cli(capsys, _write(tmp_path / "run", stats, series), "--json")
    assert code == 0 and err == []
    report = json.loads(out)
    assert report["ignored"] == [] and report["moments"] == {
        "step_a": STEP_B - 1,
        "step_b": STEP_B,
        "step_c": STEP_C,
    }
    assert report["verdict"].startswith(
        "full divergence: the loss started rising at step 300 in task like"
    )
    assert "(non_finite)" in report["verdict"]


_ANY_FLOAT = st.floats(allow_nan=True, allow_infinity=True)
_COLUMNS = [
    SERIES.index(n)
    for n in ("loss", "loss/click", "detector/status", "detector/since_onset", "detector/task")
]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cells=st.lists(
        st.tuples(st.integers(0, 59), st.sampled_from(_COLUMNS), _ANY_FLOAT), max_size=6
    ),
    stat=st.tuples(st.integers(0, 59), st.integers(0, len(LAYER_METRICS) - 1), st.floats(width=32)),
    diverged=st.booleans(),
)
@example(
    cells=[(50, SERIES.index("detector/since_onset"), np.inf)], stat=(0, 0, 0.0), diverged=True
)
@example(cells=[(50, SERIES.index("detector/task"), np.nan)], stat=(0, 0, 0.0), diverged=True)
@example(
    cells=[(50, SERIES.index("detector/task"), len(SERIES) - 0.4)], stat=(0, 0, 0.0), diverged=True
)
@example(cells=[(10, SERIES.index("detector/status"), 1e308)], stat=(0, 0, np.inf), diverged=False)
@example(cells=[(0, SERIES.index("loss"), 1.79765e308)], stat=(0, 0, 0.0), diverged=False)
def test_any_recorded_float_gives_a_report_never_a_traceback(cells, stat, diverged):
    stats, series = _healthy_arrays(60)
    if diverged:
        series[40:, SERIES.index("detector/status")] = 1.0
        series[40:, SERIES.index("detector/since_onset")] = np.arange(20)
        series[40:, SERIES.index("detector/task")] = 1.0
    for start, column, value in cells:  # from a row to the end of the record
        series[start:, column] = value
    stats[stat[0], stat[1], 0] = stat[2]
    with tempfile.TemporaryDirectory() as tmp:
        run = load_run(_write(Path(tmp) / "run", stats, series))
        report = build_report(run)
        json.loads(to_json(report))
        render_text(report)
        render_html(run, report, max_points=100, max_columns=50)
    steps = set(run.steps.tolist())
    for event in report["events"]:
        assert all(event[m] is None or event[m] in steps for m in ("step_a", "step_b", "step_c"))


# --------------------------------------------------------------------------
# Display downsampling
# --------------------------------------------------------------------------
def test_envelope_keeps_a_single_step_spike():
    steps = np.arange(1_000_000)
    values = np.ones(len(steps))
    values[654_321] = 1e6  # one bad step in a million
    xs, ys = minmax_envelope(steps, values, 2000)
    assert len(xs) <= 2000 and ys.max() == 1e6 and xs[np.argmax(ys)] == 654_321
    assert values[::500].max() == 1.0  # what plain striding would have shown
    matrix = np.ones((3, len(steps)), np.float32)
    matrix[1, 654_321] = 1e-5  # one tiny clipping factor
    assert bucket_min(matrix, 800)[1].min() == np.float32(1e-5)
    assert bucket_max(-matrix, 800)[1].max() == np.float32(-1e-5)


def test_sustained_start():
    assert sustained_start(np.array([0, 1, 0, 0, 0, 0, 0, 1, 1, 0, 1], bool), 3) == 7
    assert sustained_start(np.array([1, 1, 1, 0, 0, 0, 0, 0], bool), 3) is None
    assert sustained_start(np.array([1, 0, 0, 1, 0, 1], bool), 3) == 0


# --------------------------------------------------------------------------
# A real diverged run from the testbed, and its HTML report in Chromium
# --------------------------------------------------------------------------
LR_JUMP = 60


@pytest.fixture(scope="module")
def testbed_run(tmp_path_factory) -> Path:
    """A multitask ranking model (testbed "Small", 1/32 scale, six tasks) fed the testbed's
    sequential moving-window batches (paper 5.1.2) under a DivergenceMonitor, with Adagrad whose
    learning rate jumps from 0.05 to 20 after step 60: the loss fully diverges.  (``model.fit``
    directly rather than ``train_sequentially``: its continuous evaluation would triple the time.)"""
    from clippy_monitor.monitor import DetectorConfig, DivergenceMonitor
    from clippy_monitor.testbed import SyntheticConfig, SyntheticLog, build_model, compile_model
    from clippy_monitor.testbed.protocol import ProtocolConfig, training_dataset

    keras.utils.set_random_seed(0)
    log = SyntheticLog(
        SyntheticConfig(
            num_days=5,
            rows_per_day=512,
            n_dense=16,
            n_categorical=4,
            vocab_size=50,
            shift_days=(),
            seed=0,
        )
    )
    lr = keras.optimizers.schedules.PiecewiseConstantDecay([LR_JUMP], [0.05, 20.0])
    model = compile_model(
        build_model("Small", log.features, log.tasks, scale=1 / 32),
        log.tasks,
        keras.optimizers.Adagrad(lr),
    )
    protocol = ProtocolConfig(batch_size=64, steps_per_day=30)
    logdir = tmp_path_factory.mktemp("testbed") / "run"
    detector = DetectorConfig(warmup_steps=20, baseline_decay=0.9, recovery_window=20)
    monitor = DivergenceMonitor(
        logdir, flush_every=30, detector=detector, on_divergence="stop", xla=False
    )
    model.fit(
        training_dataset(log, protocol, seed=0),
        epochs=protocol.days(log),
        steps_per_epoch=protocol.steps_per_day,
        shuffle=False,
        callbacks=[monitor],
        verbose=0,
    )
    monitor.close()
    assert any(e["kind"] == "full" for e in monitor.events)
    return logdir


def test_diverged_testbed_run(testbed_run, capsys):
    code, out, err = _cli(capsys, testbed_run, "--json")
    assert code == 0 and err == []
    report = json.loads(out)
    run = load_run(testbed_run)
    full = [e for e in report["events"] if e["kind"] == "full"]
    assert len(full) == 1
    event = full[0]
    assert LR_JUMP < event["step_b"] <= LR_JUMP + 3 and event["step_a"] == event["step_b"] - 1
    assert event["step_c"] > event["step_b"] and event["task"] in {
        "click",
        "like",
        "share",
        "follow",
        "dwell",
        "watch_time",
    }
    assert report["verdict"].startswith(
        f"full divergence: the loss started rising at step {event['step_b']}"
    )
    assert report["layers"] == run.layers and report["steps"] == len(run)
    # Every layer's statistics leave their baseline at step-b or just before, and the ranking is by that step.
    assert len(report["culprits"]) >= 3
    departed = [
        d["departed_at"] for d in report["layer_departures"] if d["departed_at"] is not None
    ]
    assert departed == sorted(departed) and max(departed) <= event["step_b"]
    row = int(np.searchsorted(run.steps, event["step_b"]))
    for j, layer in enumerate(run.layers):
        assert report["factors_at_step_b"][layer]["clippy"] == pytest.approx(
            float(run.factor("clippy")[row, j])
        )
        assert report["factors_at_step_b"][layer]["gc"] == pytest.approx(
            float(run.factor("gc")[row, j])
        )
    dead = report["dead_units"]
    assert (
        dead["after"]["mean"] > dead["before"]["mean"] + 0.2
    )  # ReLUs died after the divergence (paper 4.1)


@pytest.fixture(scope="module")
def browser():
    yield from chromium(
        window_size="1300,1400", offline=True
    )  # the report must not need the network


def test_html_report_renders_offline(testbed_run, browser, tmp_path, capsys):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    page = tmp_path / "report.html"
    code, out, _ = _cli(capsys, testbed_run, "--html", page)
    assert code == 0 and f"HTML report: {page}" in out
    text = page.read_text(encoding="utf-8")
    markup = re.sub(
        r"<script>.*?</script>", "<script></script>", text, flags=re.S
    )  # the page without inline code
    assert markup.count("<script>") == 2 and not re.search(
        r"\b(src|href)\s*=", markup
    )  # nothing to fetch
    assert "Plotly.newPlot" in text and len(text) > 4_000_000  # plotly.js is inlined
    browser.get(page.as_uri())
    WebDriverWait(browser, 60).until(
        lambda d: d.execute_script(
            "return document.querySelectorAll('.js-plotly-plot').length"
            " === document.querySelectorAll('div.plot').length"
        )
    )
    plots = browser.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")
    assert len(plots) >= 9  # loss, factors, 7 heatmaps
    assert len(browser.find_elements(By.CSS_SELECTOR, ".js-plotly-plot svg.main-svg")) >= 2 * len(
        plots
    )
    assert (
        len(browser.find_elements(By.CSS_SELECTOR, "#plot_factors .bars .point")) > 0
    )  # the factor bars were drawn
    assert (
        len(browser.find_elements(By.CSS_SELECTOR, "#plot_loss .scatterlayer .trace")) >= 2
    )  # total + task losses
    assert "full divergence" in browser.find_element(By.CSS_SELECTOR, ".verdict").text
    assert len(browser.find_elements(By.CSS_SELECTOR, "table.culprits tbody tr")) == len(
        load_run(testbed_run).layers
    )
    shot = screenshot_path("postmortem.png", tmp_path)
    browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_html_of_a_healthy_run(healthy):
    text = render_html(load_run(healthy), postmortem(healthy))
    figures = json.loads(
        re.search(r"const FIGURES = (\{.*?\});\n", text, re.S).group(1).replace("<\\/", "</")
    )
    assert set(figures) == {
        "loss",
        *(
            f"whole_{m}"
            for m in (
                "update_weight_linf",
                "grad_norm",
                "grad_weight_ratio",
                "clippy_factor",
                "gc_factor",
                "agc_factor",
                "zero_grad_fraction",
            )
        ),
    }
    assert "healthy</b>: no loss divergence" in text and "No event to explain" in text
    heatmap = figures["whole_grad_norm"]["data"][0]
    assert (
        len(heatmap["y"]) == len(LAYERS) and len(heatmap["x"]) == 400
    )  # fewer steps than columns: not downsampled
