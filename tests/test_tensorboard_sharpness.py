"""The Clippy tab plots sharpness (issue 16): ``/series``'s ``sharpness`` and the plot under the loss.

Records are those of :mod:`tests.test_dash_sharpness` (written directly, no
TensorFlow), plus one whose preconditioned sharpness was not measured at the
probed steps (as for Adam).  The routes are called through TensorBoard's WSGI
app; one browser test (a real ``tensorboard`` process, headless Chromium, skipped
without it unless CI=true) checks the tab and saves docs/tensorboard_sharpness.png.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clippy_monitor.record import load_run
from clippy_monitor.sharpness_reading import read_crossing
from tests.browser import chromium, screenshot_path
from tests.test_dash_sharpness import (
    READING,
    STEP_B,
    preconditioned_values,
    write_run,
    write_sharpness_runs,
)
from tests.test_tensorboard_plugin import plugin_client
from tests.test_tensorboard_recovery import server  # noqa: F401

PROBES = list(range(0, 200, 10))
PRECONDITIONED = [1.2] * 12 + [2.4 + 0.2 * k for k in range(8)]  # steps 0..110, then 120..190


@pytest.fixture(scope="module")
def logdir(tmp_path_factory) -> Path:
    root = write_sharpness_runs(tmp_path_factory.mktemp("tb_sharpness"))
    plain = 50 * preconditioned_values()
    write_run(root / "adam", (plain, np.full_like(plain, np.nan)))
    return root


@pytest.fixture(scope="module")
def get(logdir):
    _, request = plugin_client(logdir)

    def get(route: str, **params) -> dict:
        status, body = request(route, **params)
        assert status == 200, body
        assert "NaN" not in body  # JSON without NaN literals
        return json.loads(body)

    return get


def test_series_carries_the_probes_and_the_reading(get, logdir):
    sharpness = get("/series", run="probed")["sharpness"]
    pre, plain = sharpness["series"]
    assert (pre["name"], plain["name"]) == ("preconditioned_sharpness", "sharpness")
    assert pre["steps"] == plain["steps"] == PROBES
    np.testing.assert_allclose(pre["values"], PRECONDITIONED)
    np.testing.assert_allclose(plain["values"], 50 * np.array(PRECONDITIONED))
    assert sharpness["threshold"] == 2.0
    expected = read_crossing(load_run(logdir / "probed"), STEP_B).to_report()
    assert sharpness["crossing"] == expected
    assert (sharpness["crossing"]["status"], sharpness["crossing"]["step"]) == ("before", 120)
    assert sharpness["crossing"]["steps_before_step_b"] == 30
    assert sharpness["crossing"]["text"] == READING


def test_series_range_and_runs_without_the_probe(get):
    ranged = get("/series", run="probed", start=140, end=175)["sharpness"]
    assert [s["steps"] for s in ranged["series"]] == [[140, 150, 160, 170]] * 2
    np.testing.assert_allclose(ranged["series"][0]["values"], [2.8, 3.0, 3.2, 3.4])
    assert ranged["crossing"]["text"] == READING  # the reading is of the whole run
    assert get("/series", run="plain")["sharpness"] is None


def test_a_series_not_measured_at_the_probes_is_null(get):
    sharpness = get("/series", run="adam")["sharpness"]
    pre, plain = sharpness["series"]
    assert pre["steps"] == plain["steps"] == PROBES
    assert pre["values"] == [None] * len(PROBES)
    np.testing.assert_allclose(plain["values"], 50 * np.array(PRECONDITIONED))
    assert sharpness["crossing"]["status"] == "not_probed"
    assert sharpness["crossing"]["text"] == "not probed"


@pytest.fixture(scope="module")
def driver():
    yield from chromium(window_size="1600,1250")


def test_tab_plots_sharpness_with_the_limit(server, driver, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(f"{server}/#clippy")
    frame = WebDriverWait(driver, 60).until(lambda d: d.find_element(By.CSS_SELECTOR, "iframe"))
    driver.switch_to.frame(frame)
    ready = "return document.body.dataset.clippyReady === '1'"
    WebDriverWait(driver, 60).until(lambda d: d.execute_script(ready))
    toggle = (
        "const box = document.querySelector(`.clippy-runs input[value='${arguments[0]}']`);"
        "if (box.checked === arguments[1]) return false; box.click(); return true;"
    )
    for run in ("adam", "plain", "probed"):
        if driver.execute_script(toggle, run, run == "probed"):
            WebDriverWait(driver, 30).until(lambda d: d.execute_script(ready))
    plot = "return document.querySelector('.clippy-sharpness')"
    names = driver.execute_script(plot + ".data.map(t => t.name)")
    assert names == ["probed · preconditioned sharpness", "probed · sharpness"]
    assert driver.execute_script(plot + ".data[0].x") == PROBES
    limit = driver.execute_script(plot + ".layout.shapes.filter(s => s.name === 'stability limit')")
    assert [(s["y0"], s["y1"], s["line"]["dash"]) for s in limit] == [(2, 2, "dash")]
    drawn = driver.execute_script(
        "return [...document.querySelectorAll('.clippy-sharpness .annotation-text')]"
        ".map(a => a.textContent)"
    )
    assert "2 (stability limit, preconditioned)" in drawn
    assert {"a", "b", "c"} <= set(drawn)  # step-a/b/c as on the loss plot
    note = driver.find_element(By.CSS_SELECTOR, ".clippy-sharpness-note").text
    assert note == f"probed: preconditioned sharpness {READING}."
    driver.switch_to.default_content()
    assert driver.save_screenshot(str(screenshot_path("tensorboard_sharpness.png", tmp_path)))

    driver.switch_to.frame(frame)
    for run in ("probed", "plain"):
        driver.execute_script(toggle, run, run == "plain")
        WebDriverWait(driver, 30).until(lambda d: d.execute_script(ready))
    card = "return document.querySelector('.clippy-sharpness-card').style.display"
    assert driver.execute_script(card) == "none"
    driver.switch_to.default_content()
