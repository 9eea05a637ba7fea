"""The post-mortem of runs recorded with the recovery ladder (issue 15): JSON, text, HTML.

Each record comes from a real tiny Keras model trained with the monitor (seconds),
one module-scoped fixture per record: a rollback, skipped steps only, giving up,
and recovery off.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import keras
import numpy as np
import pytest

from clippy_monitor import DivergenceMonitor
from clippy_monitor.catalog import KIND_COLORS
from clippy_monitor.cli import main
from clippy_monitor.monitor.recovery import RecoveryConfig
from clippy_monitor.postmortem import postmortem, render_text
from clippy_monitor.postmortem.analysis import recovery_clause
from clippy_monitor.postmortem.html import render_html
from clippy_monitor.record import load_run
from clippy_monitor.recovered import Recovery, Rollback, read_recovery
from tests.browser import chromium, screenshot_path

BATCH = 16
TRIGGER = "full divergence (non_finite)"
ROLLBACK = {
    "step": 34,
    "snapshot_step": 25,
    "batches_skipped": 9,
    "trigger": TRIGGER,
    "step_a": 29,
    "lr_factor": 0.1,
    "cooldown_steps": 10,
}


def _train(logdir: Path, nan_batches: list[int], **monitor) -> Path:
    """60 steps of a tiny regression model; ``nan_batches`` hold a NaN input row."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile(optimizer=keras.optimizers.Adagrad(0.1), loss="mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH * 60, 4)).astype("float32")
    y = x.sum(1, keepdims=True)
    for b in nan_batches:
        x[b * BATCH] = np.nan
    mon = DivergenceMonitor(logdir, tensorboard=False, **monitor)
    model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0, callbacks=[mon])
    return logdir


def _recover(max_rollbacks: int = 3) -> RecoveryConfig:
    return RecoveryConfig(
        snapshot_every=5, check_every=5, cooldown_steps=10, max_rollbacks=max_rollbacks
    )


@pytest.fixture(scope="module")
def rollback_run(tmp_path_factory) -> Path:
    """A NaN batch at step 30, no skipping: full divergence, rollback at 34 to snapshot 25."""
    return _train(
        tmp_path_factory.mktemp("rollback") / "run",
        [30],
        on_divergence="recover",
        skip_bad_steps=False,
        recovery=_recover(),
    )


@pytest.fixture(scope="module")
def skip_run(tmp_path_factory) -> Path:
    """NaN batches at steps 30 and 40, skipping on: both updates skipped, no rollback."""
    return _train(
        tmp_path_factory.mktemp("skip") / "run",
        [30, 40],
        on_divergence="recover",
        skip_bad_steps=True,
        recovery=_recover(),
    )


@pytest.fixture(scope="module")
def gave_up_run(tmp_path_factory) -> Path:
    """NaN batches at 30 and 45, one rollback allowed: rolls back once, gives up at 49."""
    return _train(
        tmp_path_factory.mktemp("gave_up") / "run",
        [30, 45],
        on_divergence="recover",
        skip_bad_steps=False,
        recovery=_recover(max_rollbacks=1),
    )


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory) -> Path:
    """The rollback run's data with recovery off: a plain full divergence."""
    return _train(tmp_path_factory.mktemp("plain") / "run", [30], on_divergence=None)


def _json(capsys, run: Path) -> dict:
    code = main(["postmortem", str(run), "--json"])
    out, err = capsys.readouterr()
    assert code == 0 and err == ""  # a recovered (or given-up) run keeps exit code 0
    return json.loads(out)


def _lines(run: Path) -> list[str]:
    return render_text(postmortem(run)).splitlines()


def _figures(page: str) -> dict:
    found = re.search(r"const FIGURES = (\{.*?\});\n", page, re.S)
    return json.loads(found.group(1).replace("<\\/", "</"))


def _page(run: Path) -> str:
    return render_html(load_run(run), postmortem(run))


# --------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------
def test_json_of_a_rollback_run(rollback_run, capsys):
    report = _json(capsys, rollback_run)
    assert report["recovery"] == {
        "summary": "recovered: 1 rollback",
        "skipped_steps": [],
        "skip_reasons": {},
        "rollbacks": [ROLLBACK],
        "gave_up": None,
        "stayed_healthy": True,
    }
    assert report["recovery"] == read_recovery(load_run(rollback_run)).to_report()
    assert report["verdict"].startswith(
        "full divergence, recovered by rollback: the loss started rising at step 30 "
        "(last healthy step 29) and fully diverged at step 30 (non_finite); "
        "the recovery ladder rolled back once at step 34 to the snapshot after step 25; "
        "the run then stayed healthy through the last recorded step 59 "
        "(25 steps after the rollback); first to leave their baseline: "
    )


def test_json_of_a_skip_only_run(skip_run, capsys):
    report = _json(capsys, skip_run)
    assert report["recovery"] == {
        "summary": "recovered: 2 steps skipped",
        "skipped_steps": [30, 40],
        "skip_reasons": {"non_finite_gradient": 2},
        "rollbacks": [],
        "gave_up": None,
        "stayed_healthy": None,
    }
    assert report["events"] == []
    assert report["verdict"].startswith("healthy: no loss divergence in 60 steps (0..59)")
    assert report["verdict"].endswith(
        "; the recovery ladder skipped 2 steps (non_finite_gradient 2)"
    )


def test_json_of_a_run_that_gave_up(gave_up_run, capsys):
    report = _json(capsys, gave_up_run)
    recovery = report["recovery"]
    assert recovery["summary"] == "gave up: 1 rollback"
    assert recovery["rollbacks"] == [ROLLBACK]
    assert recovery["stayed_healthy"] is False and recovery["skipped_steps"] == []
    gave_up = recovery["gave_up"]
    assert (gave_up["step"], gave_up["trigger"], gave_up["rollbacks"]) == (49, TRIGGER, 1)
    assert gave_up["message"].startswith(f"DivergenceMonitor({gave_up_run}): gave up recovering")
    # The ladder gives up before step 50, which Keras still runs before it stops.
    assert report["last_step"] == 50
    assert [(e["kind"], e["step_b"]) for e in report["events"]] == [("full", 30), ("full", 45)]
    assert report["verdict"].startswith("full divergence: the loss started rising at step 30")
    assert (
        "; the recovery ladder rolled back once at step 34 to the snapshot after step 25 "
        "and gave up at step 49 (training stopped); first to leave" in report["verdict"]
    )


def test_json_of_a_run_without_recovery(plain_run, capsys):
    report = _json(capsys, plain_run)
    assert "recovery" in report and report["recovery"] is None
    assert report["verdict"].startswith("full divergence: the loss started rising at step 30")
    assert "recovery" not in report["verdict"]


# --------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------
def test_text_recovery_section_of_a_rollback_run(rollback_run):
    lines = _lines(rollback_run)
    start = lines.index("recovery  recovered: 1 rollback")
    assert start < lines.index("events (recorded)")  # before the events table
    assert lines[start + 1] == "rollbacks (the diverged steps stay in the record)"
    assert lines[start + 2].split() == [
        "#", "from", "step", "to", "snapshot", "batches", "skipped", "cool-down", "trigger"
    ]  # fmt: skip
    assert lines[start + 4].split() == [
        "1", "34", "25", "9", "lr", "x0.1", "over", "10", "steps", "full", "divergence", "(non_finite)"
    ]  # fmt: skip
    assert lines[start + 5] == (
        "after the last rollback: stayed healthy through the last recorded step 59 (25 steps later)"
    )
    assert lines[start + 6] == ""  # end of the section
    assert not any(line.startswith(("skipped ", "gave up ")) for line in lines)


def test_text_recovery_section_of_a_skip_only_run(skip_run):
    lines = _lines(skip_run)
    start = lines.index("recovery  recovered: 2 steps skipped")
    assert lines[start + 1] == "skipped   2 steps (non_finite_gradient: 2); first: 30, 40"
    assert lines[start + 2] == ""
    assert not any(line.startswith(("rollbacks", "after the last rollback")) for line in lines)


def test_text_recovery_section_of_a_run_that_gave_up(gave_up_run):
    lines = _lines(gave_up_run)
    start = lines.index("recovery  gave up: 1 rollback")
    assert lines[start + 4].split()[:4] == ["1", "34", "25", "9"]
    assert lines[start + 5] == "after the last rollback: diverged again, and the ladder gave up"
    assert lines[start + 6].startswith(
        f"gave up   at step 49: DivergenceMonitor({gave_up_run}): gave up recovering at step 49"
    )


def test_text_has_no_recovery_section_without_recovery(plain_run):
    lines = _lines(plain_run)
    assert not any(line.startswith(("recovery", "rollbacks", "gave up")) for line in lines)


def test_recovery_clause_of_several_rollbacks_that_did_not_hold():
    rollbacks = tuple(
        Rollback(step, step - 10, 10, TRIGGER, step - 5, 0.1, 200) for step in (40, 80)
    )
    recovery = Recovery((5,), ("above_bound",), rollbacks, None, False)
    assert recovery_clause(recovery, 120) == (
        "; the recovery ladder skipped 1 step (above_bound 1) and rolled back 2 times, last at "
        "step 80 to the snapshot after step 70; the run diverged again after the last rollback"
    )
    assert recovery_clause(None, 120) == ""
    assert recovery_clause(Recovery((), (), (), None, None), 120) == ""  # on, nothing done


def test_a_rollback_at_the_last_recorded_step_is_not_yet_a_recovery(tmp_path):
    """Nothing recorded after the last rollback: whether the run stayed healthy is unknown
    (None, "recovering"), not True; one more recorded step makes it True."""
    from clippy_monitor.record import LAYER_METRICS, RunWriter

    meta = {"layers": ["d/kernel"], "layer_metrics": list(LAYER_METRICS), "series": ["loss"]}
    rollback = {
        "kind": "rollback", "step": 40, "snapshot_step": 30, "batches_skipped": 10,
        "trigger": TRIGGER, "step_a": 35, "cooldown": {"lr_factor": 0.1, "steps": 200},
    }  # fmt: skip

    def write(path: Path, steps: int) -> Path:
        stats = np.ones((steps, len(LAYER_METRICS), 1), np.float32)
        with RunWriter(path, {**meta, "detector_state_size": 0}, tensorboard=False) as writer:
            writer.append(np.arange(steps), stats, np.ones((steps, 1)), None)
            writer.add_events([rollback])
        return path

    pending = read_recovery(load_run(write(tmp_path / "at_last", 41)))
    assert pending.stayed_healthy is None and pending.summary().startswith("recovering: ")
    done = read_recovery(load_run(write(tmp_path / "after", 42)))
    assert done.stayed_healthy is True and done.summary().startswith("recovered: ")


# --------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------
def test_html_marks_the_rollback_on_the_loss_plot(rollback_run):
    page = _page(rollback_run)
    layout = _figures(page)["loss"]["layout"]
    color = KIND_COLORS["rollback"]
    labels = {a["text"].strip(): a for a in layout["annotations"]}
    assert (
        labels["rollback -> 25"]["x"] == 34 and labels["rollback -> 25"]["font"]["color"] == color
    )
    lines = [s for s in layout["shapes"] if s["type"] == "line" and s["line"]["color"] == color]
    assert [(s["x0"], s["x1"]) for s in lines] == [(34, 34)]
    bands = [s for s in layout["shapes"] if s["type"] == "rect" and s["fillcolor"] == color]
    assert [(s["x0"], s["x1"]) for s in bands] == [(25, 34)]  # the discarded steps
    assert "<h2>Recovery</h2>" in page
    assert (
        "<tr><td>1</td><td>34</td><td>25</td><td>9</td><td>lr x0.1 over 10 steps</td>"
        f"<td>{TRIGGER}</td></tr>" in page
    )
    assert "stayed healthy through the last recorded step 59 (25 steps later)" in page
    assert (
        f'<div class="verdict" style="--kind: {color}"><b>full divergence, recovered by rollback</b>'
        in page
    )


def test_html_marks_skipped_steps(skip_run):
    page = _page(skip_run)
    traces = _figures(page)["loss"]["data"]
    (skipped,) = [t for t in traces if t["name"].startswith("skipped step")]
    assert skipped["name"] == "skipped step (2)" and skipped["x"] == [30, 40]
    assert skipped["marker"]["color"] == KIND_COLORS["skipped"]
    assert "2 steps (non_finite_gradient: 2); first: 30, 40" in page
    assert "rollback -&gt;" not in page and "rollback ->" not in page


def test_html_marks_giving_up(gave_up_run):
    page = _page(gave_up_run)
    layout = _figures(page)["loss"]["layout"]
    color = KIND_COLORS["gave_up"]
    (line,) = [s for s in layout["shapes"] if s["type"] == "line" and s["line"]["color"] == color]
    assert (line["x0"], line["line"]["dash"]) == (49, "dot")
    (label,) = [a for a in layout["annotations"] if a["text"].strip() == "gave up"]
    assert label["xanchor"] == "right"  # at the last step: drawn left of the line
    assert "<b>Gave up</b> at step 49: DivergenceMonitor(" in page
    assert f'style="--kind: {color}"' in page


def test_html_without_recovery_has_no_recovery_marks(plain_run):
    page = _page(plain_run)
    assert "<h2>Recovery</h2>" not in page and "rollback -&gt;" not in page
    assert not any("rollback" in a["text"] for a in _figures(page)["loss"]["layout"]["annotations"])


def test_html_rollback_marker_is_drawn_in_the_browser(rollback_run, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    path = tmp_path / "report.html"
    path.write_text(_page(rollback_run), encoding="utf-8")
    for browser in chromium(window_size="1300,1200", offline=True):
        browser.get(path.as_uri())
        WebDriverWait(browser, 60).until(
            lambda d: d.execute_script("return !!document.querySelector('#plot_loss .main-svg')")
        )
        notes = browser.find_elements(By.CSS_SELECTOR, "#plot_loss .annotation-text")
        assert "rollback -> 25" in [n.text.strip() for n in notes]
        assert browser.find_element(By.CSS_SELECTOR, ".recovery .summary").text == (
            "recovered: 1 rollback"
        )
        shot = screenshot_path("postmortem_recovery.png", tmp_path)
        browser.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
