"""The Clippy TensorBoard tab: a real ``tensorboard`` server, its JSON routes, headless Chromium.

The logdir holds two runs written by RunWriter (clippy_monitor.tensorboard_plugin.demo):
``healthy`` (one micro-divergence) and ``diverged`` (a micro spike, then a full
divergence with step-a/b/c and a few NaN gradients after step-c).

Browser tests need Debian's ``chromium`` and ``chromium-driver`` (installed by
.ci/run); without them they are skipped, except under CI=true where they fail.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from clippy_monitor.display import bucket_starts
from clippy_monitor.episodes import read_episodes
from clippy_monitor.record import RunWriter, load_run
from clippy_monitor.sensitivity import event_sensitivity
from clippy_monitor.tensorboard_plugin.demo import DemoRun, write_demo_logdir
from tests.browser import chromium, screenshot_path

ROOT = Path(__file__).resolve().parents[1]
N_STEPS, N_LAYERS = 3000, 8
HEATMAPS = 7  # grad_norm, ratio, ‖r/w‖∞, gc, agc, clippy, applied (default selection)


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def logdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tb_logdir")
    write_demo_logdir(root, n_steps=N_STEPS, n_layers=N_LAYERS, tensorboard=True)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(logdir, tmp_path_factory):
    """A real ``tensorboard`` process over ``logdir``; yields its base URL."""
    port = _free_port()
    log = (tmp_path_factory.mktemp("tb_log") / "tensorboard.log").open("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir),
         "--host", "127.0.0.1", "--port", str(port), "--load_fast=false", "--reload_interval=2"],
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
                _get(url + "/data/plugins_listing", timeout=2)
                break
            except (OSError, urllib.error.URLError):
                if time.monotonic() > deadline:
                    log.seek(0)
                    pytest.fail(f"tensorboard did not answer within 90 s:\n{log.read()[-3000:]}")
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


def _get(url: str, timeout: float = 10) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def _api(server: str, route: str, **params) -> dict:
    query = urllib.parse.urlencode(params)
    return json.loads(_get(f"{server}/data/plugin/clippy/{route}?{query}"))


def _status(server: str, route: str, **params) -> int:
    try:
        _get(f"{server}/data/plugin/clippy/{route}?{urllib.parse.urlencode(params)}")
    except urllib.error.HTTPError as exc:
        return exc.code
    return 200


def _z(payload: dict) -> np.ndarray:
    z = np.frombuffer(base64.b64decode(payload["z"]), "<f4")
    return z.reshape(payload["shape"])


# ------------------------------------------------------------ packaging, import


def test_entry_point_is_registered():
    (entry,) = [e for e in metadata.entry_points(group="tensorboard_plugins") if e.name == "clippy"]
    assert entry.value == "clippy_monitor.tensorboard_plugin.plugin:ClippyPlugin"
    assert entry.load().plugin_name == "clippy"


def test_every_package_directory_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "clippy_monitor").rglob("__init__.py")
    }
    found |= {
        ".".join(("clippy_monitor", *p.parent.relative_to(ROOT).parts))
        for p in (ROOT / "dashboards").rglob("__init__.py")
    }
    assert (ROOT / "dashboards" / "__init__.py").exists()
    assert found == listed, f"update [tool.setuptools] packages in pyproject.toml: {found ^ listed}"
    assert "static/*.js" in config["package-data"]["clippy_monitor.tensorboard_plugin"]


def test_plugin_import_does_not_import_tensorflow():
    code = (
        "import sys, clippy_monitor.tensorboard_plugin.plugin; "
        "print(sorted(m for m in ('tensorflow', 'keras', 'plotly') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------- HTTP routes


def test_plugins_listing_shows_the_tab_active(server):
    listing = json.loads(_get(server + "/data/plugins_listing"))
    clippy = listing["clippy"]
    assert clippy["enabled"] is True
    assert clippy["tab_name"] == "Clippy"
    assert clippy["loading_mechanism"] == {
        "type": "IFRAME",
        "module_path": "/data/plugin/clippy/index.js",
    }


def test_static_files_are_served_from_installed_packages(server):
    js = _get(server + "/data/plugin/clippy/index.js").decode()
    assert "export async function render" in js
    assert "https://" not in js and "http://" not in js  # no CDN: works offline
    plotly = _get(server + "/data/plugin/clippy/plotly.min.js", timeout=30)
    assert len(plotly) > 1_000_000 and b"window.Plotly" in plotly


def test_runs_and_summary_match_the_records(server, logdir):
    runs = _api(server, "runs")["runs"]
    assert [r["run"] for r in runs] == ["diverged", "healthy"]
    assert all(r["layers"] == N_LAYERS and r["tasks"] == ["click", "like"] for r in runs)

    summary = _api(server, "summary", run="diverged")
    record = load_run(logdir / "diverged")
    assert summary["steps"] == len(record) == N_STEPS
    assert (summary["first_step"], summary["last_step"]) == (1, N_STEPS)
    assert summary["layers"] == record.layers
    assert summary["loss_series"] == ["loss", "loss/click", "loss/like"]
    assert summary["status"] == "diverged"
    full = [e for e in summary["events"] if e["kind"] == "full"]
    micro = [e for e in summary["events"] if e["kind"] == "micro"]
    assert len(full) == 1 and len(micro) == 1
    assert (full[0]["step_a"], full[0]["step_b"], full[0]["step_c"]) == (2099, 2100, 2160)
    assert summary["events"] == sorted(record.events, key=lambda e: e["step_b"])


def test_series_keep_every_step_and_every_spike(server, logdir):
    record = load_run(logdir / "diverged")
    loss = record.series("loss")
    full = _api(server, "series", run="diverged", max_points=10_000)
    assert full["steps_in_range"] == N_STEPS and not full["downsampled"]
    (total,) = [s for s in full["series"] if s["name"] == "loss"]
    assert total["steps"] == record.steps.tolist() and total["values"] == loss.tolist()
    assert [e["kind"] for e in full["events"]] == ["micro", "full"]

    small = _api(server, "series", run="diverged", max_points=200)
    assert small["downsampled"]
    for s in small["series"]:
        xs, ys = np.array(s["steps"]), np.array(s["values"], float)
        raw = record.series(s["name"])
        assert len(xs) <= 200
        starts = bucket_starts(N_STEPS, 100)
        for a, b in zip(starts, np.append(starts[1:], N_STEPS)):
            inside = (xs >= record.steps[a]) & (xs <= record.steps[b - 1])
            assert ys[inside].max() == raw[a:b].max() and ys[inside].min() == raw[a:b].min()

    zoom = _api(server, "series", run="diverged", start=2090, end=2170, max_points=50)
    assert zoom["start"] == 2090 and zoom["end"] == 2170 and zoom["steps_in_range"] == 81


def test_heatmap_buckets_hold_the_extremes_of_their_steps(server, logdir):
    record = load_run(logdir / "diverged")
    for metric, reduce in [("grad_norm", np.nanmax), ("clippy_factor", np.nanmin)]:
        payload = _api(server, "heatmap", run="diverged", metric=metric, max_columns=64)
        assert payload["reduce"] == ("max" if reduce is np.nanmax else "min")
        z = _z(payload)
        assert z.shape == (N_LAYERS, 64) and payload["columns"] == 64
        raw = record.layer(metric)
        steps = record.steps
        for j, (first, last) in enumerate(zip(payload["first_steps"], payload["last_steps"])):
            rows = (steps >= first) & (steps <= last)
            np.testing.assert_array_equal(z[:, j], reduce(raw[rows], axis=0))
        assert payload["first_steps"][0] == 1 and payload["last_steps"][-1] == N_STEPS
        assert (
            sum(
                last - first + 1
                for first, last in zip(payload["first_steps"], payload["last_steps"])
            )
            == N_STEPS
        )
    # The Clippy factor's dip between step-b and step-c survives bucketing.
    clippy = _z(_api(server, "heatmap", run="diverged", metric="clippy_factor", max_columns=20))
    assert clippy.min() == np.nanmin(record.layer("clippy_factor")) < 0.05

    zoomed = _api(
        server, "heatmap", run="diverged", metric="grad_norm", start=2100, end=2160, max_columns=600
    )
    assert zoomed["steps_in_range"] == 61 and zoomed["columns"] == 61  # every step its own column
    np.testing.assert_array_equal(_z(zoomed), record.layer("grad_norm")[2099:2160].T)


def test_layer_table_at_a_step_and_at_a_clicked_bucket(server, logdir):
    record = load_run(logdir / "diverged")
    table = _api(server, "layers", run="diverged", step=2100)
    assert table["step"] == 2100 and table["exact"]
    assert {"role": "step_b", "kind": "full"}.items() <= table["events"][0].items()
    row = 2100 - 1
    expected = np.stack([record.layer(m)[row] for m in table["metrics"]], axis=1)
    np.testing.assert_array_equal(np.array(table["values"], np.float32), expected)
    assert table["series"]["loss"] == record.series("loss")[row]
    # The rules compared at thresholds calibrated on the healthy steps (issue 17), at the
    # focused episode's step-b whatever the table's step; the σ columns are the recorded ones.
    (full,) = [e.to_report() for e in read_episodes(record) if e.kind == "full"]
    expected_reaction = event_sensitivity(record, full).to_report()
    assert table["sensitivity"] == expected_reaction and expected_reaction["step_b"] == 2100
    assert [r["rule"] for r in table["sensitivity"]["rules"]] == ["gc", "agc", "clippy"]
    assert _api(server, "layers", run="diverged", step=500)["sensitivity"] == expected_reaction

    # A click on a heatmap bucket: the step where that layer's metric peaks.
    picked = _api(
        server,
        "layers",
        run="diverged",
        step=2100,
        until=2160,
        layer=7,
        metric="update_weight_linf",
    )
    window = record.layer("update_weight_linf")[2099:2160, 7]
    assert picked["step"] == 2100 + int(np.argmax(window))

    # After step-c a few gradients are NaN: sent as the string "NaN", never as invalid JSON.
    nan_rows = np.flatnonzero(np.isnan(record.layer("grad_norm")).any(axis=1))
    assert len(nan_rows)
    nan_table = _api(server, "layers", run="diverged", step=int(record.steps[nan_rows[0]]))
    assert "NaN" in [r[nan_table["metrics"].index("grad_norm")] for r in nan_table["values"]]


def test_bad_requests_get_clear_errors(server):
    assert _status(server, "summary", run="nope") == 404
    assert _status(server, "summary") == 400
    assert _status(server, "heatmap", run="healthy", metric="nope") == 404
    assert _status(server, "heatmap", run="healthy", metric="grad_norm", reduce="mean") == 400
    assert _status(server, "layers", run="healthy", step="x") == 400
    assert _status(server, "summary", run="../healthy") == 403  # leaves the logdir: refused
    assert _status(server, "series", run="healthy", start="inf") == 400  # was a 500 (OverflowError)


def test_tensorboard_scalars_are_reservoir_sampled_but_the_tab_is_not(server):
    """Documents docs/TENSORBOARD.md: the Scalars tab keeps 1000 points per tag."""
    url = f"{server}/data/plugin/scalars/scalars?run=diverged&tag=clippy_monitor/loss"
    deadline = time.monotonic() + 30
    while True:
        try:
            points = json.loads(_get(url))
        except urllib.error.HTTPError:
            points = []
        if points and points[-1][1] == N_STEPS or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(points) == 1000 < N_STEPS
    assert points[-1][1] == N_STEPS  # the reservoir always keeps the latest point
    series = _api(server, "series", run="diverged", max_points=N_STEPS)
    assert len(series["series"][0]["steps"]) == N_STEPS


# --------------------------------------------- numeric query parameters (no server)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
#: every route -> (parameters that make a valid request, its integer parameters)
ROUTE_PARAMS = {
    "/index.js": ({}, ()),
    "/plotly.min.js": ({}, ()),
    "/runs": ({}, ()),
    "/summary": ({"run": "run"}, ()),
    "/series": (
        {"run": "run", "start": 5, "end": 50, "max_points": 10},
        ("start", "end", "max_points"),
    ),
    "/heatmap": (
        {"run": "run", "metric": "grad_norm", "start": 5, "end": 50, "max_columns": 10},
        ("start", "end", "max_columns"),
    ),
    "/layers": (
        {"run": "run", "step": 10, "until": 40, "layer": 1, "metric": "grad_norm"},
        ("step", "until", "layer"),
    ),
}
NOT_INTEGERS = (
    "inf", "-inf", "+inf", "Infinity", "nan", "NaN", "1e400", "1e3", "1.5", "1.0", "-0.5", "abc", "",
    " 5", "5 ", "0x10", "1_000", "+-1", "--1", "\u0663",  # an Arabic-Indic digit: int() would take it
    str(INT64_MAX + 1), str(INT64_MIN - 1), "9" * 30, "1" + "0" * 5000,
)  # fmt: skip


@pytest.fixture(scope="module")
def numeric_plugin(tmp_path_factory):
    root = tmp_path_factory.mktemp("tb_numeric")
    DemoRun(n_steps=100, n_layers=3, micro=[30]).write(root / "run", tensorboard=False)
    return plugin_client(root)


def test_every_route_is_in_the_numeric_parameter_table(numeric_plugin):
    plugin, numeric_client = numeric_plugin
    assert set(plugin.get_plugin_apps()) == set(ROUTE_PARAMS)  # a new route needs its row
    for route, (valid, _) in ROUTE_PARAMS.items():
        status, body = numeric_client(route, **valid)
        assert status == 200, (route, body[:300])


@pytest.mark.parametrize("route", [r for r, (_, ints) in ROUTE_PARAMS.items() if ints])
def test_non_integer_query_parameters_get_400_with_a_message(numeric_plugin, route):
    numeric_client = numeric_plugin[1]
    valid, ints = ROUTE_PARAMS[route]
    for key in ints:
        for value in NOT_INTEGERS:
            status, body = numeric_client(route, **{**valid, key: value})
            assert status == 400, (route, key, value, status, body[-300:])
            assert key in body and repr(value)[:20] in body, (route, key, value, body)
            assert len(body) < 400 and "Traceback" not in body
        for value in (
            "0",
            "-0",
            "+7",
            "-7",
            "007",
            "-" + "0" * 5000 + "7",
            str(INT64_MAX),
            str(INT64_MIN),
        ):
            status, body = numeric_client(route, **{**valid, key: value})
            assert status in (200, 404), (
                route,
                key,
                value,
                status,
                body[-300:],
            )  # 404: no such layer


def test_integer_parameters_are_parsed_exactly(numeric_plugin):
    numeric_client = numeric_plugin[1]
    for step in (INT64_MAX - 1, INT64_MAX, INT64_MIN, -5, 0):
        status, body = numeric_client("/layers", run="run", step=str(step))
        assert status == 200, body
        table = json.loads(body)
        assert table["requested_step"] == step  # echoed exactly, never rounded through float
        assert table["step"] == (100 if step > 100 else 1) and not table["exact"]
    for text, step in (
        ("+0009223372036854775806", INT64_MAX - 1),
        ("-" + "0" * 5000 + "7", -7),
        ("-0", 0),
    ):
        status, body = numeric_client("/layers", run="run", step=text)
        assert status == 200 and json.loads(body)["requested_step"] == step
    status, body = numeric_client("/series", run="run", start="+20", end="0030", max_points="20")
    series = json.loads(body)
    assert (series["start"], series["end"], series["steps_in_range"]) == (20, 30, 11)
    status, body = numeric_client("/series", run="run", start=str(INT64_MAX), end=str(INT64_MAX))
    assert status == 200 and json.loads(body)["steps_in_range"] == 0
    status, body = numeric_client(
        "/heatmap", run="run", metric="grad_norm", start=str(INT64_MIN), max_columns="1"
    )
    assert (
        status == 200
        and json.loads(body)["columns"] == 1
        and json.loads(body)["steps_in_range"] == 100
    )


# ------------------------------------------------------- live runs (no server)


def plugin_client(logdir: str | Path):
    """``(plugin, request)``, no server: ``request(route, **params) -> (HTTP status, body text)``.

    Requests go through TensorBoard's own WSGI app, which turns the plugin's
    ``errors.PublicError`` into its HTTP status and message, as a server does.
    """
    from tensorboard.backend.application import TensorBoardWSGI
    from tensorboard.plugins import base_plugin
    from werkzeug.test import Client

    from clippy_monitor.tensorboard_plugin.plugin import ClippyPlugin

    class Plugin(ClippyPlugin):
        scan_ttl = 0.0  # see new runs at once

    plugin = Plugin(base_plugin.TBContext(logdir=str(logdir)))
    client = Client(TensorBoardWSGI([plugin]))

    def request(route: str, **params) -> tuple[int, str]:
        response = client.get("/data/plugin/clippy" + route, query_string=params)
        return response.status_code, response.get_data(as_text=True)

    return plugin, request


def _client(logdir: Path):
    plugin, request = plugin_client(logdir)

    def get(route: str, **params):
        status, body = request(route, **params)
        assert status == 200, body
        return json.loads(body)

    return plugin, get


def test_live_run_updates_and_rewinds(tmp_path):
    demo = DemoRun(n_steps=10_000, n_layers=4, full=None, micro=[])
    plugin, get = _client(tmp_path)
    assert not plugin.is_active()  # empty logdir

    with RunWriter(tmp_path / "live", demo.meta(), tensorboard=False) as writer:
        writer.append(*demo.chunk(1, 400), None)
        assert plugin.is_active()
        assert get("/summary", run="live")["steps"] == 400
        before = _z(get("/heatmap", run="live", metric="grad_norm", max_columns=1000))
        assert before.shape == (4, 400)

        writer.append(*demo.chunk(401, 700), None)
        writer.add_events(
            [{"kind": "micro", "step_a": 449, "step_b": 450, "step_c": None, "recovered": 470}]
        )
        summary = get("/summary", run="live")
        assert summary["steps"] == 700 and len(summary["events"]) == 1
        after = _z(get("/heatmap", run="live", metric="grad_norm", max_columns=1000))
        np.testing.assert_array_equal(after[:, :400], before)

        steps, stats, series = demo.chunk(301, 350)  # training restarted from a checkpoint
        writer.append(steps, stats * 2, series, None)
        assert get("/summary", run="live")["steps"] == 350
        record = load_run(tmp_path / "live")
        for metric in ("grad_norm", "clippy_factor"):
            z = _z(get("/heatmap", run="live", metric=metric, max_columns=1000))
            np.testing.assert_array_equal(z, record.layer(metric).T)
        table = get("/layers", run="live", step=340)
        np.testing.assert_array_equal(
            np.array(table["values"], np.float32)[:, 0], record.layer("grad_norm")[339]
        )

        # Many small appends: the view re-reads the record into one map now and then.
        view = plugin._catalog.view("live")
        view._MAX_SEGMENTS = 8
        for first in range(351, 351 + 10 * 20, 10):
            writer.append(*demo.chunk(first, first + 9), None)
            view.refresh()
            assert len(view._segments) <= 8
        record = load_run(tmp_path / "live")
        assert get("/summary", run="live")["steps"] == len(record) == 550
        np.testing.assert_array_equal(view.layer("grad_norm"), record.layer("grad_norm"))

    shutil.rmtree(tmp_path / "live")  # a new record in the same place replaces the old one
    DemoRun(n_steps=120, n_layers=4).write(tmp_path / "live", tensorboard=False)
    assert get("/summary", run="live")["steps"] == 120


def test_summary_status_is_the_decoded_last_detector_status(tmp_path):
    """``/summary``'s status names ``decode_status`` of the last step's ``detector/status``."""
    from clippy_monitor.record.status import decode_status
    from clippy_monitor.tensorboard_plugin.demo import SERIES

    demo = DemoRun(n_steps=100, n_layers=2, full=None, micro=[])
    _, get = _client(tmp_path)
    column = SERIES.index("detector/status")
    expected = {
        0.0: "healthy",
        1.0: "abnormal",
        1.5: "abnormal",
        0.9995: "abnormal",  # decode_status rounds up by 1e-3
        2.0: "diverged",
        2.3: "diverged",
        # values the detector never writes are not a verdict: they read as healthy
        3.7: "healthy",
        1e308: "healthy",
        -1.0: "healthy",
        float("nan"): "healthy",
        float("inf"): "healthy",
    }
    with RunWriter(tmp_path / "run", demo.meta(), tensorboard=False) as writer:
        for step, (value, name) in enumerate(expected.items(), start=1):
            steps, stats, series = demo.chunk(step, step)
            series[:, column] = value
            writer.append(steps, stats, series, None)
            assert get("/summary", run="run")["status"] == name, value
            assert name == ("healthy", "abnormal", "diverged")[decode_status(value)[0]]

    meta = {**demo.meta(), "series": [n for n in SERIES if n != "detector/status"]}
    with RunWriter(tmp_path / "no_detector", meta, tensorboard=False) as writer:
        steps, stats, series = demo.chunk(1, 10)
        writer.append(steps, stats, np.delete(series, column, axis=1), None)
    assert (
        get("/summary", run="no_detector")["status"] is None
    )  # no detector/status series: no status


def test_a_run_is_held_for_the_whole_request(tmp_path):
    """A request's run stays open while the request reads it, even when other runs evict it."""
    from types import SimpleNamespace

    from clippy_monitor.tensorboard_plugin import data

    for name in ("a", "b"):
        DemoRun(n_steps=100, n_layers=2, full=None, micro=[]).write(
            tmp_path / name, tensorboard=False
        )
    plugin, get = _client(tmp_path)
    plugin._catalog = data.Catalog(tmp_path, ttl=0.0, max_open=1)
    with plugin._view(SimpleNamespace(args={"run": "a"})) as (name, held):
        assert get("/summary", run="b")["steps"] == 100  # a request for "b" evicts "a" ...
        assert plugin._catalog.open_runs == ["b"]
        assert not held.closed and len(held) == 100  # ... but this request still reads it
        assert data.summary_payload(name, held)["steps"] == 100
    assert held.closed  # closed once its request is done
    assert get("/summary", run="a")["steps"] == 100  # and reopened by the next one
    assert plugin._catalog.open_runs == ["a"]


# ---------------------------------------------------------------------- browser


def _table_step(driver) -> int | None:
    """The step of the layer table on screen: index.js sets it once the table's DOM is written."""
    return driver.execute_script(
        "var s = document.querySelector('.clippy-tables').dataset.step; return s ? Number(s) : null"
    )


@pytest.fixture(scope="module")
def browser():
    yield from chromium(window_size="1600,2300")


def test_tab_renders_plots_in_headless_chromium(server, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{server}/#clippy")
    frame = WebDriverWait(browser, 60).until(lambda d: d.find_element(By.CSS_SELECTOR, "iframe"))
    browser.switch_to.frame(frame)
    WebDriverWait(browser, 60).until(
        lambda d: d.execute_script("return document.body.dataset.clippyReady === '1'")
    )
    count = browser.execute_script
    assert count("return document.querySelectorAll('.clippy-loss.js-plotly-plot').length") == 1
    assert (
        count("return document.querySelectorAll('.clippy-loss .scatterlayer .trace').length") >= 6
    )
    assert (
        count("return document.querySelectorAll('.clippy-heatmap.js-plotly-plot').length")
        == 2 * HEATMAPS
    )
    assert count("return document.querySelectorAll('.clippy-heatmap .hm image').length") > 0
    # Events are marked: step-a/b/c lines and the micro-divergence regions.
    shapes = count("return document.querySelector('.clippy-loss').layout.shapes.map(s => s.x0)")
    assert {2099, 2100, 2160, 900, 1350} <= set(shapes)
    # The layer table starts at step-b of the full divergence (Figure 4b).
    assert _table_step(browser) == 2100
    assert (
        count("return document.querySelectorAll('.clippy-table tbody tr').length") == 2 * N_LAYERS
    )
    assert (
        "step-b of full divergence" in browser.find_element(By.CSS_SELECTOR, ".clippy-tables").text
    )
    tables = browser.find_element(By.CSS_SELECTOR, ".clippy-tables").text
    assert "thresholds calibrated on this run's healthy steps" in tables
    assert "at the thresholds recorded with the run" in tables
    assert count("return document.querySelectorAll('.clippy-reactions tbody tr').length") == 2 * 3

    # Linked hover: hovering the loss plot marks the step in every heatmap.
    loss = browser.find_element(By.CSS_SELECTOR, ".clippy-loss .nsewdrag")
    ActionChains(browser).move_to_element_with_offset(
        loss, int(loss.rect["width"] * 0.3), 0
    ).perform()
    marked = (
        "return [...document.querySelectorAll('.clippy-heatmap')]"
        ".filter(d => (d.layout.shapes || []).some(s => s.name === 'hover-step')).length"
    )
    WebDriverWait(browser, 10).until(lambda d: d.execute_script(marked) == 2 * HEATMAPS)

    browser.switch_to.default_content()
    assert browser.save_screenshot(str(screenshot_path("tensorboard_plugin.png", tmp_path)))
    browser.switch_to.frame(frame)

    # A click on a heatmap cell shows the layer table at that bucket's peak step.
    cell = browser.find_element(By.CSS_SELECTOR, ".clippy-heatmap .nsewdrag")
    ActionChains(browser).move_to_element_with_offset(
        cell, int(-cell.rect["width"] * 0.45), 0
    ).click().perform()
    # tableStep changes at the click, before the table is fetched: wait for the table on screen.
    WebDriverWait(browser, 10).until(lambda d: (_table_step(d) or N_STEPS) < 500)
    step = _table_step(browser)
    assert step == count("return window.clippyApp.tableStep")
    assert f"step {step:,}" in browser.find_element(By.CSS_SELECTOR, ".clippy-tables").text
