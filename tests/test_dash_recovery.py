"""The Dash app shows what the recovery ladder did: badge, alerts, marks on the Live and Replay plots.

Records come from a tiny Keras model trained with the ladder
(:mod:`tests.recovery_records`).  Data shaping is checked by calling the plain
functions; one browser test (headless Chromium, skipped without it unless
CI=true) checks that the page shows it and saves docs/dash_recovery.png.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from clippy_monitor.dashboards.dash_app import callbacks as C
from clippy_monitor.dashboards.dash_app import data as D

from clippy_monitor.record import load_run
from clippy_monitor.record.format import RECORD_FILE
from clippy_monitor.recovered import Recovery, Rollback, read_recovery
from tests.browser import chromium, screenshot_path
from tests.recovery_records import write_recovery_runs

ROLLED_BACK = (
    "Rolled back at step 34 to the snapshot after step 25 (9 batches skipped; trigger: {}). "
    "Cool-down: learning rate ×0.1 rising back to ×1 over 10 steps."
)
MIXED_SKIPPED = (20, 30, 31, 32, 33, 34, 50, 60)
ROLLBACK_COLOR, SKIPPED_COLOR = D.KIND_COLORS["rollback"], D.KIND_COLORS["skipped"]


@pytest.fixture(scope="module")
def logdir(tmp_path_factory) -> Path:
    root = write_recovery_runs(tmp_path_factory.mktemp("dash_recovery"))
    hour_ago = time.time() - 3600  # finished runs: the run list does not mark them "writing"
    for run in root.iterdir():
        os.utime(run / RECORD_FILE, (hour_ago, hour_ago))
    return root


@pytest.fixture(scope="module")
def catalog(logdir) -> D.Catalog:
    return D.Catalog(logdir)


def _rollback_lines(shapes: list[dict]) -> list[dict]:
    return [s for s in shapes if s["type"] == "line" and s["line"]["color"] == ROLLBACK_COLOR]


def test_the_records_hold_what_these_tests_expect(logdir):
    mixed = read_recovery(load_run(logdir / "mixed"))
    assert mixed.skipped_steps == MIXED_SKIPPED
    assert mixed.reason_counts() == {"non_finite_gradient": 6, "above_bound": 2}
    assert [(r.step, r.snapshot_step) for r in mixed.rollbacks] == [(34, 25)]
    rollback = read_recovery(load_run(logdir / "rollback"))
    assert [(r.step, r.snapshot_step, r.step_a) for r in rollback.rollbacks] == [(34, 25, 29)]
    assert rollback.skipped_steps == ()
    assert read_recovery(load_run(logdir / "gave_up")).gave_up.step == 54
    assert read_recovery(load_run(logdir / "plain")) is None


@pytest.mark.parametrize(
    ("run", "state", "title", "detail", "summary"),
    [
        (
            "mixed",
            "healthy",
            "Healthy",
            "no divergence since the rollback at step 34",
            "recovered: 1 rollback, 8 steps skipped",
        ),
        (
            "rollback",
            "healthy",
            "Healthy",
            "no divergence since the rollback at step 34",
            "recovered: 1 rollback",
        ),
        (
            "gave_up",
            "diverged",
            "Training stopped",
            "recovery gave up at step 54 · 5 steps skipped in a row",
            "gave up: 1 rollback, 10 steps skipped",
        ),
        ("plain", "healthy", "Healthy", "no divergence detected", None),
    ],
)
def test_badge_carries_the_recovery_summary(catalog, run, state, title, detail, summary):
    with catalog.open(run) as live:
        h = D.health(live)
        assert (h["state"], h["title"], h["detail"], h["recovery"]) == (
            state,
            title,
            detail,
            summary,
        )
        if summary is not None:
            assert summary == read_recovery(live).summary()
    out = C.render_live(catalog, run, None)
    spans = [c for c in out["badge"] if "cm-badge-recovery" in (c.className or "")]
    assert [s.children for s in spans] == ([f"↺ {summary}"] if summary else [])
    assert out["badge_class"] == f"cm-badge cm-badge--{state}"
    entry = D.run_entry(catalog, run)  # the run list, once the run was opened
    assert (summary in entry["detail"]) if summary else ("recover" not in entry["detail"])


def test_alerts_name_each_rollback_and_count_the_skipped_steps(catalog):
    with catalog.open("mixed") as live:
        assert D.alerts(live) == [
            {"level": "warning", "text": ROLLED_BACK.format("5 steps skipped in a row")},
            {
                "level": "info",
                "text": "8 steps skipped (update not applied; non-finite gradient: 6, "
                "above bound: 2), the latest at step 60.",
            },
        ]
    with catalog.open("rollback") as live:
        alerts = D.alerts(live)
        assert [a["level"] for a in alerts] == ["danger", "warning"]
        assert alerts[0]["text"].startswith("Full divergence detected: healthy until step-a 29")
        assert alerts[1]["text"] == ROLLED_BACK.format("full divergence (non_finite)")
    with catalog.open("gave_up") as live:
        first = D.alerts(live)[0]
        assert first == {
            "level": "danger",
            "text": "Recovery gave up at step 54 (5 steps skipped in a row) after 1 rollback: "
            "training stopped.",
        }
    with catalog.open("plain") as live:
        assert D.alerts(live) == []
    texts = [a.children for a in C.render_live(catalog, "mixed", None)["alert"]]
    assert texts[0] == ROLLED_BACK.format("5 steps skipped in a row")


def test_many_rollbacks_show_the_latest_and_a_count():
    rollbacks = tuple(
        Rollback(100 * k, 100 * k - 9, 9, "t", None, None, None) for k in (1, 2, 3, 4, 5)
    )
    recovery = Recovery((), (), rollbacks, None, True)
    texts = [a["text"] for a in D.rollback_alerts(recovery, max_events=3)]
    assert [t.split(" to ")[0] for t in texts[:3]] == [
        "Rolled back at step 500",
        "Rolled back at step 400",
        "Rolled back at step 300",
    ]
    assert texts[3] == "… and 2 earlier rollbacks."
    assert "Cool-down" not in texts[0]  # no cool-down recorded, none named


def test_live_figures_mark_rollbacks_and_skipped_steps(catalog):
    with catalog.open("mixed") as live:
        loss, factors = D.live_loss_figure(live), D.live_factor_figure(live)
    (skipped,) = [t for t in loss["data"] if t["name"] == "skipped step"]
    assert skipped["x"] == list(MIXED_SKIPPED) and skipped["yaxis"] == "y2"
    assert skipped["marker"]["color"] == SKIPPED_COLOR
    assert skipped["customdata"] == ["above bound"] + ["non-finite gradient"] * 6 + ["above bound"]
    assert loss["layout"]["yaxis2"]["overlaying"] == "y"
    for figure in (loss, factors):
        (line,) = _rollback_lines(figure["layout"]["shapes"])
        assert line["x0"] == line["x1"] == 34
        bands = [s for s in figure["layout"]["shapes"] if s["type"] == "rect"]
        assert [(b["x0"], b["x1"], b["fillcolor"]) for b in bands] == [(25, 34, ROLLBACK_COLOR)]
    (label,) = loss["layout"]["annotations"]
    assert (label["text"], label["x"], label["font"]["color"]) == (
        "rollback → 25",
        34,
        ROLLBACK_COLOR,
    )

    with catalog.open("plain") as live:
        loss = D.live_loss_figure(live)
    assert [t["name"] for t in loss["data"]] == ["total loss"]
    assert not _rollback_lines(loss["layout"]["shapes"]) and not loss["layout"]["annotations"]


def test_replay_marks_the_rollback_that_answered_the_divergence(catalog):
    with catalog.open("rollback") as live:
        (episode,) = D.episodes(live)
        window = D.replay_window(live, episode)
    assert (episode["step_a"], episode["step_b"], episode["step_c"]) == (29, 30, 30)
    assert (window.start, window.end) == (19, 44)  # extended to the rollback (34) + 10
    figure = D.replay_loss_figure(window, 34)
    (line,) = _rollback_lines(figure["layout"]["shapes"])
    assert line["x0"] == 34
    labels = {(a["text"], a["x"], a["yanchor"]) for a in figure["layout"]["annotations"]}
    # step-b and step-c share step 30: one label; the moments sit above the plot, the rollback inside.
    assert labels == {
        ("step-a", 29, "bottom"),
        ("step-b · step-c", 30, "bottom"),
        ("rollback → 25", 34, "top"),
    }
    assert D.replay_step_label(window, 34) == "Step 34 — after step-c · rollback → 25"
    assert D.replay_step_label(window, 30) == "Step 30 — step-b · step-c"
    marks = C.slider_marks(window)
    assert marks["34"]["label"] == "rollback" and marks["34"]["style"]["color"] == ROLLBACK_COLOR


def test_replay_marks_skipped_steps_in_its_window(catalog):
    episode = {"kind": "micro", "step_a": 29, "step_b": 30, "recovered": 35, "key": "micro:30"}
    with catalog.open("mixed") as live:
        window = D.replay_window(live, episode)
    assert (window.start, window.end) == (19, 45)
    figure = D.replay_loss_figure(window, 32)
    (skipped,) = [t for t in figure["data"] if t["name"] == "skipped step"]
    assert skipped["x"] == [20, 30, 31, 32, 33, 34]  # those in the window
    assert figure["layout"]["yaxis2"]["range"] == [0, 1]
    assert D.replay_step_label(window, 32) == (
        "Step 32 — loss above baseline · skipped (non-finite gradient)"
    )
    assert (
        D.replay_step_label(window, 20)
        == "Step 20 — healthy (before step-b) · skipped (above bound)"
    )


# ----------------------------------------------------------------------- browser


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(logdir):
    from clippy_monitor.dashboards.dash_app import make_server

    srv = make_server(logdir, "127.0.0.1", _free_port(), refresh_ms=500)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.port}/"
    finally:
        srv.shutdown()
        srv.server_close()


def wait_for(driver, condition, timeout: float = 30, message: str = ""):
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    def safe(d):
        try:
            return condition(d)
        except (StaleElementReferenceException, WebDriverException):
            return False

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(safe, message)


def text_of(driver, element_id: str) -> str:
    return driver.execute_script(
        f"var e = document.getElementById('{element_id}'); return e ? e.innerText : '';"
    )


def figure_of(driver, element_id: str, expr: str):
    return driver.execute_script(
        f"var g = document.querySelector('#{element_id} .js-plotly-plot'); "
        f"return g && g.data ? ({expr}) : null;"
    )


def select_run(driver, name: str) -> None:
    wait_for(
        driver,
        lambda d: d.execute_script(
            f"var i = document.querySelector(\"#run-list input[value='{name}']\"); "
            "if (!i) return false; i.click(); return i.checked;"
        ),
        message=f"run {name} in the run list",
    )


@pytest.fixture(scope="module")
def driver():
    yield from chromium(window_size="1500,1000")


def test_browser_live_and_replay_show_the_recovery(server, driver, tmp_path):
    from selenium.webdriver.common.by import By

    driver.get(server)
    select_run(driver, "mixed")
    wait_for(driver, lambda d: "step 79" in text_of(d, "live-steps"), message="live view")
    assert "↺ recovered: 1 rollback, 8 steps skipped" in text_of(driver, "live-badge")
    assert "Rolled back at step 34 to the snapshot after step 25" in text_of(driver, "live-alert")
    skipped = "g.data.filter(t => t.name === 'skipped step').map(t => t.x)[0]"
    wait_for(driver, lambda d: figure_of(d, "live-loss", skipped) == list(MIXED_SKIPPED))
    drawn = "[...g.querySelectorAll('.annotation-text')].map(a => a.textContent)"
    assert figure_of(driver, "live-loss", drawn) == ["rollback → 25"]
    points = "g.querySelectorAll('.scatterlayer .trace:last-child .point').length"
    assert figure_of(driver, "live-loss", points) == len(MIXED_SKIPPED)
    time.sleep(0.3)  # let plotly finish drawing
    assert driver.save_screenshot(str(screenshot_path("dash_recovery.png", tmp_path)))

    select_run(driver, "rollback")
    driver.find_element(
        By.XPATH, "//*[contains(@class, 'cm-tab') and normalize-space()='Replay']"
    ).click()
    wait_for(driver, lambda d: "Step 30" in text_of(d, "replay-step"), message="replay")
    labels = lambda d: figure_of(d, "replay-loss", drawn) or []  # noqa: E731
    wait_for(driver, lambda d: "rollback → 25" in labels(d), message="rollback label")
    assert sorted(labels(driver)) == ["rollback → 25", "step-a", "step-b · step-c"]
    assert "rollback" in text_of(driver, "replay-slider")
    driver.set_window_size(1500, 1300)
    time.sleep(0.5)
    assert driver.save_screenshot(str(tmp_path / "dash_recovery_replay.png"))
