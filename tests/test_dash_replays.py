"""The Dash Compare view shows a run's counterfactual replays (``<run>/replay-<name>``).

A tiny run diverges (its learning rate jumps), one replay with a low learning rate
does not; the data shaping is checked without a browser, then the page once in
headless Chromium.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import keras
import numpy as np
import pytest
from clippy_monitor.dashboards.dash_app import callbacks as C
from clippy_monitor.dashboards.dash_app import data as D
from clippy_monitor.dashboards.dash_app.counterfactual import original_of, step_window

import clippy_monitor
from clippy_monitor import DetectorConfig, DivergenceMonitor
from clippy_monitor.counterfactual import replay
from clippy_monitor.record import load_run
from clippy_monitor.replay_reading import read_replays
from tests.browser import chromium, screenshot_path

BATCH, STEPS, JUMP = 16, 70, 40
REPLAYS_TEXT = "return (document.getElementById('compare-replays') || {}).innerText || ''"


def _data() -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(0).normal(size=(BATCH * STEPS, 4)).astype("float32")
    return x, x.sum(1, keepdims=True)


def _model() -> keras.Model:
    return keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)]
    )


@pytest.fixture(scope="module")
def logdir(tmp_path_factory) -> Path:
    """``<logdir>/run`` diverges; ``<logdir>/run/replay-low-lr`` replays it with Adagrad(0.05)."""
    root = tmp_path_factory.mktemp("dash_replays")
    keras.utils.set_random_seed(0)
    model = _model()
    jump = keras.optimizers.schedules.PiecewiseConstantDecay([JUMP], [0.05, 1000.0])
    model.compile(optimizer=keras.optimizers.Adagrad(jump), loss="mse")
    monitor = DivergenceMonitor(
        root / "run",
        tensorboard=False,
        flush_every=20,
        detector=DetectorConfig(warmup_steps=20, recovery_window=20),
        keep_replay=True,
        replay_snapshot_every=10,
    )
    x, y = _data()
    model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0, callbacks=[monitor])
    monitor.close()
    start = clippy_monitor.replay_start(root / "run")
    batches = (
        (x[k * BATCH : (k + 1) * BATCH], y[k * BATCH : (k + 1) * BATCH])
        for k in range(start, STEPS)
    )
    replay(
        root / "run",
        _model,
        batches,
        keras.optimizers.Adagrad(0.05),
        name="low-lr",
        margin=5,
        compile_kwargs={"loss": "mse"},
    )
    return root


def test_a_picked_replay_stands_for_its_run():
    names = ["a", "a/replay-x", "b/replay-y", "c"]
    assert original_of("a/replay-x", names) == "a"
    assert original_of("b/replay-y", names) == "b/replay-y"  # no run "b" listed
    assert original_of("a", names) == "a"
    assert original_of("replay-z", [".", "replay-z"]) == "."
    assert D.replay_originals(["a/replay-x", "a", "c"], names) == ["a", "c"]


def test_replay_comparison_overlays_original_and_replay_on_one_step_axis(logdir):
    run, rep = load_run(logdir / "run"), load_run(logdir / "run" / "replay-low-lr")
    comparison = D.replay_comparison("run", logdir / "run")
    assert comparison is not None
    (outcome,) = read_replays(run)
    assert comparison.verdicts == [outcome.verdict]
    assert "did not diverge" in comparison.verdicts[0]
    assert comparison.original.steps.tolist() == run.steps.tolist()
    (line,) = comparison.replays
    # The replay's steps continue the original's numbering after the snapshot.
    assert line.steps[0] == outcome.snapshot_step + 1
    assert line.steps.tolist() == rep.steps.tolist()
    np.testing.assert_array_equal(line.loss, rep.series("loss"))

    fig = D.replay_figure(comparison)
    assert [t["name"] for t in fig["data"]] == [comparison.original.label, line.label]
    assert fig["data"][1]["x"] == rep.steps.tolist()
    assert fig["layout"]["yaxis"]["type"] == "log"
    lo, hi = step_window(comparison)
    assert lo <= outcome.snapshot_step and hi == outcome.last_step + 1
    assert [s["x0"] for s in fig["layout"]["shapes"]] == [outcome.snapshot_step, outcome.step_c]


def test_a_run_without_replays_has_no_comparison(logdir):
    assert D.replay_comparison("run/replay-low-lr", logdir / "run" / "replay-low-lr") is None


def test_compare_view_shows_replays_for_the_run_or_a_picked_replay(logdir):
    catalog = D.Catalog(logdir)
    assert set(catalog.run_names()) == {"run", "run/replay-low-lr"}
    for picked in (["run"], ["run/replay-low-lr"], ["run", "run/replay-low-lr"]):
        r = C.render_compare(catalog, picked, None)
        graphs = [c for c in r["replays"] if type(c).__name__ == "Graph"]
        assert len(graphs) == 1, picked  # one panel: the original with its replay
        assert graphs[0].figure["layout"]["title"]["text"].startswith("run:")
        assert "replay low-lr" in str(r["replays"][1].children[0].children)
        assert r["alert"] == []
        assert C.render_compare(catalog, picked, r["shown"]) is None  # nothing changed
    assert C.render_compare(catalog, [], None)["replays"] == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_browser_compare_view_shows_the_replay(logdir, tmp_path):
    from clippy_monitor.dashboards.dash_app import make_server
    from selenium.webdriver.support.ui import WebDriverWait

    srv = make_server(logdir, "127.0.0.1", _free_port(), refresh_ms=1000)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        for browser in chromium(window_size="1400,1300"):
            browser.get(f"http://127.0.0.1:{srv.port}/")
            WebDriverWait(browser, 30, 0.1).until(
                lambda d: d.execute_script(
                    "var t = [...document.querySelectorAll('.cm-tab')]"
                    ".find(e => e.innerText.trim() == 'Compare'); if (t) t.click(); return !!t;"
                )
            )
            WebDriverWait(browser, 30, 0.1).until(
                lambda d: "did not diverge" in d.execute_script(REPLAYS_TEXT)
            )
            assert "replay low-lr" in browser.execute_script(REPLAYS_TEXT)
            browser.execute_script(
                "document.getElementById('compare-replays').scrollIntoView({block: 'end'})"
            )
            time.sleep(0.5)
            assert browser.save_screenshot(str(screenshot_path("dash_replays.png", tmp_path)))
    finally:
        srv.shutdown()
        srv.server_close()
