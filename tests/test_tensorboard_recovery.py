"""The Clippy tab shows what the recovery ladder did: ``/summary``'s ``recovery``, marks on the loss plot.

Records come from a tiny Keras model trained with the ladder
(:mod:`tests.recovery_records`).  The routes are called through TensorBoard's
WSGI app; one browser test (a real ``tensorboard`` process, headless Chromium,
skipped without it unless CI=true) checks the page and saves
docs/tensorboard_recovery.png.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from clippy_monitor.catalog import KIND_COLORS
from clippy_monitor.record import load_run
from clippy_monitor.recovered import read_recovery
from tests.browser import chromium, screenshot_path
from tests.recovery_records import write_recovery_runs
from tests.test_tensorboard_plugin import plugin_client

MIXED_SKIPPED = [20, 30, 31, 32, 33, 34, 50, 60]
ROLLBACK = {
    "step": 34,
    "snapshot_step": 25,
    "batches_skipped": 9,
    "step_a": 29,
    "lr_factor": 0.1,
    "cooldown_steps": 10,
}


@pytest.fixture(scope="module")
def logdir(tmp_path_factory) -> Path:
    return write_recovery_runs(tmp_path_factory.mktemp("tb_recovery"))


@pytest.fixture(scope="module")
def get(logdir):
    _, request = plugin_client(logdir)

    def get(route: str, **params) -> dict:
        status, body = request(route, **params)
        assert status == 200, body
        return json.loads(body)

    return get


def test_summary_holds_the_recovery_report(get, logdir):
    for run in ("mixed", "rollback", "gave_up"):
        expected = read_recovery(load_run(logdir / run)).to_report()
        assert get("/summary", run=run)["recovery"] == expected
    mixed = get("/summary", run="mixed")["recovery"]
    assert mixed["summary"] == "recovered: 1 rollback, 8 steps skipped"
    assert mixed["skipped_steps"] == MIXED_SKIPPED
    assert mixed["skip_reasons"] == {"non_finite_gradient": 6, "above_bound": 2}
    assert mixed["rollbacks"] == [{**ROLLBACK, "trigger": "5 steps skipped in a row"}]
    assert (mixed["gave_up"], mixed["stayed_healthy"]) == (None, True)
    gave_up = get("/summary", run="gave_up")["recovery"]
    assert gave_up["summary"] == "gave up: 1 rollback, 10 steps skipped"
    assert (gave_up["gave_up"]["step"], gave_up["gave_up"]["rollbacks"]) == (54, 1)
    assert get("/summary", run="plain")["recovery"] is None


def test_events_are_the_divergence_episodes_only(get, logdir):
    """The ladder's rollback / gave_up events are in ``recovery``, not among the episodes."""
    kinds = [e["kind"] for e in load_run(logdir / "rollback").events]
    assert kinds == ["full", "rollback"]
    summary = get("/summary", run="rollback")
    assert [(e["kind"], e["step_b"], e["step_c"]) for e in summary["events"]] == [("full", 30, 30)]
    assert summary["recovery"]["rollbacks"] == [
        {**ROLLBACK, "trigger": "full divergence (non_finite)"}
    ]
    assert [e["kind"] for e in get("/series", run="rollback")["events"]] == ["full"]
    assert get("/summary", run="mixed")["events"] == []
    assert get("/summary", run="gave_up")["events"] == []
    # The layer table names the roles of divergence events only: the rollback's step_a
    # (29, the same step-a) is not a second role.
    assert get("/layers", run="rollback", step=29)["events"] == [
        {"index": 0, "kind": "full", "role": "step_a"}
    ]


# ----------------------------------------------------------------------- browser


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(logdir, tmp_path_factory):
    """A real ``tensorboard`` process over ``logdir``; yields its base URL."""
    port = _free_port()
    log = (tmp_path_factory.mktemp("tb_recovery_log") / "tensorboard.log").open("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir),
         "--host", "127.0.0.1", "--port", str(port), "--load_fast=false"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"tensorboard exited with {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                urllib.request.urlopen(url + "/data/plugins_listing", timeout=2).close()
                break
            except (OSError, urllib.error.URLError):
                if time.monotonic() > deadline:
                    pytest.fail("tensorboard did not answer within 90 s")
                time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def driver():
    yield from chromium(window_size="1600,1250")


# The loss plot's labels drawn on the page: text and the box of the text, for the overlap check.
LABELS_JS = """
return [...document.querySelectorAll('.clippy-loss .annotation-text')].map(a => {
  const r = a.getBoundingClientRect();
  return {text: a.textContent, left: r.left, right: r.right, top: r.top, bottom: r.bottom};
});
"""


def _overlap(a: dict, b: dict) -> bool:
    return (
        a["left"] < b["right"]
        and b["left"] < a["right"]
        and a["top"] < b["bottom"]
        and b["top"] < a["bottom"]
    )


def test_tab_marks_rollbacks_and_skipped_steps(server, driver, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(f"{server}/#clippy")
    frame = WebDriverWait(driver, 60).until(lambda d: d.find_element(By.CSS_SELECTOR, "iframe"))
    driver.switch_to.frame(frame)
    ready = "return document.body.dataset.clippyReady === '1'"
    WebDriverWait(driver, 60).until(lambda d: d.execute_script(ready))
    # Show rollback and mixed only (the run boxes are redrawn after each click).
    toggle = (
        "const box = document.querySelector(`.clippy-runs input[value='${arguments[0]}']`);"
        "if (box.checked === arguments[1]) return false; box.click(); return true;"
    )
    for run in ("gave_up", "mixed", "plain", "rollback"):
        if driver.execute_script(toggle, run, run in ("rollback", "mixed")):
            WebDriverWait(driver, 30).until(lambda d: d.execute_script(ready))
    loss = "return document.querySelector('.clippy-loss')"
    shapes = driver.execute_script(loss + ".layout.shapes.filter(s => s.name === 'rollback')")
    assert [(s["x0"], s["line"]["color"]) for s in shapes] == [(34, KIND_COLORS["rollback"])] * 2
    skipped = driver.execute_script(loss + ".data.filter(t => t.name === 'mixed · skipped step')")
    assert [t["x"] for t in skipped] == [MIXED_SKIPPED]
    assert skipped[0]["marker"]["color"] == KIND_COLORS["skipped"]

    labels = driver.execute_script(LABELS_JS)
    texts = sorted(label["text"] for label in labels)
    assert texts == ["a", "b", "c", "rollback → 25", "rollback → 25"]
    for i, a in enumerate(labels):
        for b in labels[i + 1 :]:
            if a["text"] != b["text"]:  # both runs' rollbacks share one step and one label
                assert not _overlap(a, b), (a, b)

    recovery = {
        e.get_attribute("data-run"): e.text
        for e in driver.find_elements(By.CSS_SELECTOR, ".clippy-info .clippy-recovery")
    }
    assert recovery == {
        "rollback": "· ↺ recovered: 1 rollback",
        "mixed": "· ↺ recovered: 1 rollback, 8 steps skipped",
    }
    events = driver.find_element(By.CSS_SELECTOR, ".clippy-events").text
    assert "mixed: rollback → 25 at step 34" in events
    assert "mixed: 8 steps skipped, the latest at step 60" in events

    # A rollback's step link opens the layer table there, which names what the ladder did.
    driver.find_element(
        By.XPATH, "//span[contains(@class, 'rollback')]//a[text()='step 34']"
    ).click()
    shown = "return document.querySelector('.clippy-tables').dataset.step"
    WebDriverWait(driver, 10).until(lambda d: d.execute_script(shown) == "34")
    roles = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".clippy-tables .clippy-role")]
    assert roles == ["skipped step (update not applied), rollback → 25", "rollback → 25"]

    driver.switch_to.default_content()
    assert driver.save_screenshot(str(screenshot_path("tensorboard_recovery.png", tmp_path)))
