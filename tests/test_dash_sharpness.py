"""The Dash Replay view plots sharpness (issue 16): probes around the episode, the line at 2, the reading.

Records are written directly (:func:`write_sharpness_runs`, no TensorFlow): a run
that fully diverges at step-b 150 (step-a 149, step-c 170) whose preconditioned
sharpness, probed every 10 steps, is 1.2 until step 120 and rises from 2.4 there, and the
same run recorded without the probe.  Data shaping is checked by calling the plain
functions; one browser test (headless Chromium, skipped without it unless CI=true)
checks the page and saves docs/dash_sharpness.png.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from clippy_monitor.dashboards.dash_app import callbacks as C
from clippy_monitor.dashboards.dash_app import data as D

from clippy_monitor.record import LAYER_METRICS, RunWriter, load_run
from clippy_monitor.record.format import RECORD_FILE
from clippy_monitor.sharpness_reading import PRECONDITIONED, SHARPNESS, read_crossing
from tests.browser import chromium, screenshot_path
from tests.test_dash_recovery import figure_of, select_run, server, text_of, wait_for  # noqa: F401

N, STEP_A, STEP_B, STEP_C, EVERY = 200, 149, 150, 170, 10
LAYERS = ["model/dense/kernel", "model/dense_1/kernel", "model/head/kernel"]
READING = "crossed 2 at step 120 (2.4), 30 steps before step-b (150; 16 probes, max 3 up to it)"
WINDOW = (139, 180)  # step-a - 10 .. step-c + 10
SHOWN_PROBES = [130, 140, 150, 160, 170, 180, 190]  # the window's, and one on either side
SHOWN_VALUES = [2.6, 2.8, 3.0, 3.2, 3.4, 3.6, 3.8]  # their preconditioned sharpness


def preconditioned_values() -> np.ndarray:
    """Probed every 10 steps: 1.2 before step 120, then 2.4 rising by 0.2 a probe; NaN elsewhere."""
    t = np.arange(N)
    return np.where(t % EVERY == 0, np.where(t >= 120, 2.4 + 0.02 * (t - 120), 1.2), np.nan)


def write_run(path: Path, sharpness: tuple[np.ndarray, np.ndarray] | None) -> None:
    """A three-layer run that fully diverges at STEP_B; with ``sharpness`` (plain,
    preconditioned), the two series."""
    t = np.arange(N)
    rng = np.random.default_rng(0)
    loss = np.where(
        t >= STEP_B, 0.3 * 1.25 ** np.minimum(t - STEP_B, 25), 0.3 + 0.5 * np.exp(-t / 40)
    )
    status = np.where(t >= STEP_C, 2.1, np.where(t >= STEP_B, 1.0, 0.0))
    names = ["loss", "detector/status", "detector/since_onset", "detector/task"]
    columns = [loss, status, np.where(t >= STEP_B, t - STEP_B, -1), np.where(t >= STEP_B, 0, -1)]
    if sharpness is not None:
        names += [SHARPNESS, PRECONDITIONED]
        columns += list(sharpness)
    growth = np.where(t >= STEP_B, 1.3 ** np.minimum(t - STEP_B, 20), 1.0)[:, None]
    stats = np.empty((N, len(LAYER_METRICS), len(LAYERS)), "f4")
    for j, metric in enumerate(LAYER_METRICS):
        noise = rng.uniform(0.5, 1.5, (N, len(LAYERS)))
        stats[:, j] = {"nonfinite_count": 0.0, "zero_grad_fraction": 0.01}.get(
            metric, np.minimum(noise, 1.0) / growth if "factor" in metric else noise * growth
        )
    meta = {"layers": LAYERS, "layer_metrics": list(LAYER_METRICS), "series": names}
    meta |= {"detector_state_size": 0, "sharpness_every": EVERY if sharpness is not None else None}
    event = {"kind": "full", "step_a": STEP_A, "step_b": STEP_B, "step_c": STEP_C}
    with RunWriter(path, meta, tensorboard=False) as writer:
        writer.append(t, stats, np.column_stack(columns), None)
        writer.add_events([{**event, "recovered": None, "task": "loss", "reason": "no_recovery"}])


def write_sharpness_runs(root: Path) -> Path:
    """``root/probed`` (with the sharpness series) and ``root/plain`` (without), finished."""
    hour_ago = time.time() - 3600  # the run list does not mark them "writing"
    for name, probed in (("probed", True), ("plain", False)):
        values = preconditioned_values()
        write_run(root / name, (50 * values, values) if probed else None)
        os.utime(root / name / RECORD_FILE, (hour_ago, hour_ago))
    return root


@pytest.fixture(scope="module")
def logdir(tmp_path_factory) -> Path:
    return write_sharpness_runs(tmp_path_factory.mktemp("dash_sharpness"))


@pytest.fixture(scope="module")
def catalog(logdir) -> D.Catalog:
    return D.Catalog(logdir)


def _window(catalog: D.Catalog, run: str) -> tuple[D.ReplayWindow, str]:
    with catalog.open(run) as live:
        episode = D.episodes(live)[0]
        return D.replay_window(live, episode), episode["key"]


def test_the_window_holds_its_probes_and_the_one_reading(catalog, logdir):
    window, _ = _window(catalog, "probed")
    assert (window.start, window.end) == WINDOW
    probes = window.sharpness
    np.testing.assert_array_equal(probes.steps, SHOWN_PROBES)
    assert probes.in_window == 5
    np.testing.assert_allclose(probes.values[PRECONDITIONED], SHOWN_VALUES)
    np.testing.assert_allclose(probes.values[SHARPNESS], 50 * np.array(SHOWN_VALUES))
    assert probes.crossing == read_crossing(load_run(logdir / "probed"), STEP_B)
    assert probes.crossing.describe() == READING
    assert probes.note() == f"Preconditioned sharpness: {READING}."
    plain, _ = _window(catalog, "plain")
    assert plain.sharpness is None and D.replay_sharpness_figure(plain, STEP_B) is None


def test_the_figure_marks_the_limit_the_moments_and_the_cursor(catalog):
    window, _ = _window(catalog, "probed")
    figure = D.replay_sharpness_figure(window, 160)
    pre, plain = figure["data"]
    assert (pre["name"], pre["yaxis"], pre["mode"]) == (
        "preconditioned sharpness",
        "y",
        "lines+markers",
    )
    assert (plain["name"], plain["yaxis"]) == ("sharpness", "y2")
    assert pre["x"] == plain["x"] == SHOWN_PROBES
    np.testing.assert_allclose(pre["y"], SHOWN_VALUES)
    np.testing.assert_allclose(plain["y"], 50 * np.array(SHOWN_VALUES))
    layout = figure["layout"]
    assert layout["xaxis"]["range"] == list(WINDOW)
    assert layout["yaxis"]["type"] == "log" and layout["yaxis2"]["overlaying"] == "y"
    low, high = layout["yaxis"]["range"]
    assert low < np.log10(2) < np.log10(3.8) < high  # the line at 2 and every probe in view
    limit = [s for s in layout["shapes"] if s.get("name") == "stability limit"]
    assert len(limit) == 1
    assert (limit[0]["y0"], limit[0]["y1"], limit[0]["yref"]) == (2.0, 2.0, "y")
    assert limit[0]["line"]["dash"] == "dash"
    labels = [a["text"] for a in layout["annotations"]]
    assert labels == ["step-a", "step-b", "step-c", "2 (stability limit, preconditioned)"]
    moments = [
        s["x0"] for s in layout["shapes"] if s["yref"] == "paper" and s.get("name") != "cursor"
    ]
    assert moments == [STEP_A, STEP_B, STEP_C]
    assert [s["x0"] for s in layout["shapes"] if s.get("name") == "cursor"] == [160]


def test_a_window_without_a_probe_still_draws_the_nearest_ones():
    """Probes every 100 steps around a 40-step window: the probes either side, and a note."""

    class Record:
        steps = np.arange(1000)
        series_names = [SHARPNESS, PRECONDITIONED]

        def series(self, name):
            values = np.where(self.steps % 100 == 0, 0.01 * self.steps, np.nan)
            return values if name == PRECONDITIONED else 10 * values

    probes = D.probed_sharpness(Record(), 450, 430, 470)
    np.testing.assert_array_equal(probes.steps, [400, 500])
    assert probes.in_window == 0
    assert probes.note() == (
        "Preconditioned sharpness: crossed 2 at step 300 (3), 150 steps before step-b "
        "(450; 5 probes, max 4 up to it). No probe in this window."
    )


def test_render_replay_shows_the_panel_only_with_the_series(catalog):
    _, key = _window(catalog, "probed")
    shown = C.render_replay(catalog, "probed", key, STEP_B)
    assert shown["sharpness_style"] == {"display": "block"}
    assert shown["sharpness_note"] == f"Preconditioned sharpness: {READING}."
    assert [t["name"] for t in shown["sharpness"]["data"]] == [
        "preconditioned sharpness",
        "sharpness",
    ]
    _, plain_key = _window(catalog, "plain")
    hidden = C.render_replay(catalog, "plain", plain_key, STEP_B)
    assert hidden["sharpness_style"] == {"display": "none"}
    assert (hidden["sharpness_note"], hidden["sharpness"]["data"]) == ("", [])
    assert hidden["loss"]["data"]  # the rest of the view is drawn
    assert C.render_replay(catalog, None, None, None)["sharpness_style"] == {"display": "none"}


@pytest.fixture(scope="module")
def driver():
    yield from chromium(window_size="1500,1300")


def test_browser_replay_plots_sharpness(server, driver, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By

    driver.get(server)
    select_run(driver, "probed")
    driver.find_element(
        By.XPATH, "//*[contains(@class, 'cm-tab') and normalize-space()='Replay']"
    ).click()
    wait_for(driver, lambda d: "Step 150" in text_of(d, "replay-step"), message="replay")
    names = "g.data.map(t => t.name)"
    wait_for(driver, lambda d: figure_of(d, "replay-sharpness", names) == [
        "preconditioned sharpness", "sharpness"], message="sharpness plot")  # fmt: skip
    assert text_of(driver, "replay-sharpness-note") == f"Preconditioned sharpness: {READING}."
    drawn = "[...g.querySelectorAll('.annotation-text')].map(a => a.textContent)"
    assert "2 (stability limit, preconditioned)" in figure_of(driver, "replay-sharpness", drawn)
    points = "g.querySelectorAll('.scatterlayer .point').length"
    assert figure_of(driver, "replay-sharpness", points) == 2 * len(SHOWN_PROBES)
    time.sleep(0.5)  # let plotly finish drawing
    assert driver.save_screenshot(str(screenshot_path("dash_sharpness.png", tmp_path)))

    select_run(driver, "plain")
    hidden = "document.getElementById('replay-sharpness-panel').style.display"
    wait_for(driver, lambda d: d.execute_script(f"return {hidden}") == "none", message="hidden")
