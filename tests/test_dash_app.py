"""The Dash app (clippy_monitor.dashboards.dash_app): data shaping, safety, CLI, headless Chromium.

Records are written with :class:`clippy_monitor.record.RunWriter`, most through
the demo's ``DemoRun`` (clippy_monitor.tensorboard_plugin.demo): ``naive`` (a
micro-divergence at step 900, then a full divergence: step-a 2099, step-b
2100, step-c 2160, NaN gradients afterwards) and ``clippy`` (one
micro-divergence at step 1350, recovered).

Browser tests need Debian's ``chromium`` and ``chromium-driver`` (installed by
.ci/run); without them they are skipped, except under CI=true where they fail.
They save docs/dash_live.png, docs/dash_replay.png and docs/dash_compare.png.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from clippy_monitor.dashboards.dash_app import callbacks as C
from clippy_monitor.dashboards.dash_app import data as D

from clippy_monitor.record import RecordError, RunWriter, load_run
from clippy_monitor.sensitivity import summary_text as reaction_summary_text
from clippy_monitor.tensorboard_plugin.demo import DemoRun
from tests.browser import chromium, screenshot_path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
N_STEPS, N_LAYERS = 3000, 8
STEP_A, STEP_B, STEP_C = 2099, 2100, 2160


def naive_run() -> DemoRun:
    return DemoRun(N_STEPS, N_LAYERS, micro=[900], full=STEP_B, clippy=False, seed=2)


def clippy_run() -> DemoRun:
    return DemoRun(N_STEPS, N_LAYERS, micro=[1350], clippy=True, seed=1)


@pytest.fixture(scope="module")
def logdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dash_logdir")
    naive_run().write(root / "naive", tensorboard=False)
    clippy_run().write(root / "clippy", tensorboard=False)
    return root


@pytest.fixture(scope="module")
def catalog(logdir) -> D.Catalog:
    return D.Catalog(logdir)


# A small synthetic record: any shape, any values.
def write_synthetic(
    path: Path,
    loss: np.ndarray,
    *,
    layers: int = 4,
    status: np.ndarray | None = None,
    since=None,
    task=None,
    factors=None,
    chunk: int = 5000,
) -> None:
    n = len(loss)
    meta = {
        "layers": [f"dense_{i}/kernel" for i in range(layers)],
        "series": [
            "loss",
            "loss/click",
            "detector/status",
            "detector/since_onset",
            "detector/task",
        ],
        "detector_state_size": 0,
    }
    rng = np.random.default_rng(0)
    stats = np.ones((n, 10, layers), np.float32)
    stats[:, 0] = 0.01 * np.exp(0.1 * rng.standard_normal((n, layers)))  # grad_norm
    if factors is not None:
        stats[:, 4:8] = factors[:, None, :]  # gc, agc, clippy, applied
    series = np.stack(
        [
            loss,
            loss / 2,
            np.zeros(n) if status is None else status,
            np.zeros(n) if since is None else since,
            np.full(n, -1.0) if task is None else task,
        ],
        axis=1,
    )
    with RunWriter(path, meta, tensorboard=False) as writer:
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            writer.append(
                np.arange(start + 1, stop + 1), stats[start:stop], series[start:stop], None
            )


# -------------------------------------------------------------------- packaging


def test_importing_and_using_the_app_does_not_import_tensorflow(logdir):
    code = f"""
import sys
from clippy_monitor.dashboards.dash_app import create_app, callbacks as C, data as D
app = create_app({str(logdir)!r})
cat = app.clippy_catalog
C.render_live(cat, "naive", None)
key = D.episodes(cat.live("naive"))[0]["key"]
C.render_replay(cat, "naive", key, {STEP_B})
C.render_summary(cat, "naive", key, None)
print(sorted(m for m in ("tensorflow", "keras") if m in sys.modules))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_app_is_safe_by_default(logdir):
    from clippy_monitor.dashboards.dash_app import app as app_module

    for fn in (app_module.serve, app_module.make_server):
        assert inspect.signature(fn).parameters["host"].default == "127.0.0.1"
    server = app_module.make_server(logdir, port=0)
    try:
        assert server.host == "127.0.0.1"
        app = server.dash_app
        assert app.server.debug is False
        assert not app._dev_tools.ui and not app._dev_tools.hot_reload
        client = app.server.test_client()
        assert client.get("/").status_code == 200
        assert client.get("/assets/style.css").status_code == 200
    finally:
        server.server_close()
    with pytest.raises(ValueError):
        app_module.create_app(logdir, refresh_ms=10)


def test_cli_dash_subcommand(monkeypatch, tmp_path, capsys):
    from clippy_monitor.dashboards.dash_app import app as app_module

    from clippy_monitor import cli

    calls = []
    monkeypatch.setattr(app_module, "serve", lambda *a, **k: calls.append((a, k)))
    assert cli.main(["dash", "--logdir", str(tmp_path)]) == 0
    assert calls == [((tmp_path,), {"host": "127.0.0.1", "port": 8050, "refresh_ms": 1000})]
    assert cli.main(["dash", "--logdir", str(tmp_path), "--host", "0.0.0.0", "--port", "9000"]) == 0
    assert calls[-1][1]["host"] == "0.0.0.0" and calls[-1][1]["port"] == 9000
    assert cli.main(["dash", "--logdir", str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err


# ------------------------------------------------------------------ data shaping


def test_decode_status_is_the_one_the_detector_uses():
    from clippy_monitor.monitor import detectors
    from clippy_monitor.record import status

    assert D.decode_status is detectors.decode_status is status.decode_status
    values = (0.0, 0.999, 1.5, 2.0, 2.1, 2.2, 2.3, 2.0999, 3.7, 1e308, float("nan"), -1.0)
    assert [D.decode_status(v) for v in values] == [
        (0, None),
        (1, None),
        (1, None),
        (2, "no_recovery"),
        (2, "no_recovery"),
        (2, "non_finite"),
        (2, "grad_collapse"),
        (2, "no_recovery"),
        (0, None),
        (0, None),
        (0, None),
        (0, None),
    ]


def test_live_run_matches_the_record_and_reads_only_new_rows(tmp_path):
    demo = naive_run()
    (tmp_path / "runs").mkdir()
    cat = D.Catalog(tmp_path / "runs")
    path = tmp_path / "runs" / "live"
    with RunWriter(path, demo.meta(), tensorboard=False) as writer:
        writer.append(*demo.chunk(1, 500), None)
        live = cat.live("live")
        assert live.last_delta_rows == 500

        def check():
            run = load_run(path)
            np.testing.assert_array_equal(live.steps, run.steps)
            np.testing.assert_array_equal(live.series("loss"), run.series("loss"))
            for rule in ("gc", "agc", "clippy", "applied"):
                low, where = live.min_factor(rule)
                np.testing.assert_array_equal(low, run.min_factor(rule))
                np.testing.assert_array_equal(where, np.argmin(run.factor(rule), axis=1))
            for metric in ("grad_norm", "update_weight_linf"):
                np.testing.assert_array_equal(
                    live.layer_rows(metric, 3, len(run) - 2), run.layer(metric)[3:-2]
                )
            assert not any(
                r._cache for r, _ in live._segments
            )  # layer data stay mapped (docs/DASH.md)

        check()
        version = live.version
        assert (
            cat.live("live").last_delta_rows == 0 and live.version == version
        )  # nothing new: nothing read
        writer.append(*demo.chunk(501, 600), None)
        assert cat.live("live") is live and live.last_delta_rows == 100  # only the new chunk
        check()
        writer.append(*demo.chunk(551, 700), None)  # training restarted from step 550
        cat.live("live")
        assert live.steps[-1] == 700 and len(live) == 700
        check()


def test_downsampled_plots_keep_one_step_spikes(tmp_path):
    n = 50_000
    rng = np.random.default_rng(1)
    loss = 1.0 + 0.01 * rng.standard_normal(n)
    loss[12_344] = 50.0  # step 12345
    loss[40_000] = np.nan  # a non-finite loss is a gap, not a crash
    factors = np.ones((n, 4), np.float32)
    factors[776, 2] = 1e-4  # clippy factor of layer 2 at step 777
    write_synthetic(tmp_path / "r", loss, factors=factors)
    live = D.Catalog(tmp_path).live("r")
    fig = D.live_loss_figure(live, max_points=1000)
    total = fig["data"][0]
    assert len(total["x"]) <= 1000
    assert total["y"][total["x"].index(12_345)] == 50.0
    factor_fig = D.live_factor_figure(live, max_points=1000)
    clippy = next(t for t in factor_fig["data"] if t["name"] == "min σ Clippy")
    assert len(clippy["x"]) <= 1000
    assert clippy["y"][clippy["x"].index(777)] == pytest.approx(1e-4)
    assert factor_fig["layout"]["yaxis"]["type"] == "log"
    json.dumps(fig, allow_nan=False)  # NaN became null
    low = {r["rule"]: r for r in D.lowest_factors(live)}
    assert low["clippy"]["low"] == pytest.approx(1e-4) and low["clippy"]["low_step"] == 777
    assert low["clippy"]["low_layer"] == "dense_2/kernel"


def test_health_badge_and_alerts_follow_the_detector(tmp_path):
    n = 400
    loss = np.ones(n)
    status = np.zeros(n)
    write_synthetic(tmp_path / "healthy", loss, status=status)
    status = status.copy()
    status[350:] = 1.0
    since = np.where(status > 0, np.arange(n) - 350, 0.0)
    write_synthetic(
        tmp_path / "micro", loss, status=status, since=since, task=np.where(status > 0, 1.0, -1.0)
    )
    status = status.copy()
    status[380:] = 2.3  # grad collapse
    write_synthetic(
        tmp_path / "full", loss, status=status, since=since, task=np.where(status > 0, 1.0, -1.0)
    )
    cat = D.Catalog(tmp_path)

    h = D.health(cat.live("healthy"))
    assert (h["state"], h["title"]) == ("healthy", "Healthy")
    assert D.alerts(cat.live("healthy")) == []

    live = cat.live("micro")
    h = D.health(live)
    assert (h["state"], h["title"]) == ("micro", "Micro-divergence in progress")
    assert "since step 351" in h["detail"] and "click" in h["detail"]
    (alert,) = D.alerts(live)
    assert alert["level"] == "warning" and "in progress" in alert["text"]
    (episode,) = D.episodes(live)
    assert (episode["kind"], episode["step_a"], episode["step_b"]) == ("open", 350, 351)

    live = cat.live("full")  # no events file entry: the status series alone tells
    h = D.health(live)
    assert (h["state"], h["title"]) == ("diverged", "Fully diverged")
    assert "since step 381" in h["detail"] and "grad collapse" in h["detail"]
    assert D.alerts(live)[0]["level"] == "danger"
    (episode,) = D.episodes(live)
    assert (episode["kind"], episode["step_b"], episode["step_c"]) == ("full", 351, 381)


def test_live_view_outputs(catalog, logdir):
    out = C.render_live(catalog, "naive", None)
    assert out["badge_class"] == "cm-badge cm-badge--diverged"
    assert "step 3,000" in out["steps"] and "8 layers" in out["steps"]
    texts = [a.children for a in out["alert"]]
    assert texts[0].startswith("Full divergence detected in task like")
    assert "step-a 2,099" in texts[0] and "step-b 2,100" in texts[0] and "step-c 2,160" in texts[0]
    assert any("Micro-divergence detected in task click at step 900" in t for t in texts)
    assert C.render_live(catalog, "naive", out["shown"]) is None  # unchanged: no update sent
    run = load_run(logdir / "naive")
    low = {r["rule"]: r for r in D.lowest_factors(catalog.live("naive"))}
    for rule in ("gc", "agc", "clippy"):
        assert low[rule]["low"] == pytest.approx(float(np.nanmin(run.min_factor(rule))))
        assert low[rule]["now"] == pytest.approx(float(run.min_factor(rule)[-1]))


def test_replay_window_bars_and_controls_match_the_record(catalog, logdir):
    live = catalog.live("naive")
    eps = D.episodes(live)
    assert [e["kind"] for e in eps] == ["full", "micro"]
    full = eps[0]
    assert (full["step_a"], full["step_b"], full["step_c"]) == (STEP_A, STEP_B, STEP_C)
    window = D.replay_window(live, full)
    assert window.start < STEP_A and window.end > STEP_C
    run = load_run(logdir / "naive")
    for step in (STEP_A, STEP_B, STEP_C, STEP_C + 5):
        row = int(np.searchsorted(run.steps, step))
        bars = D.replay_bars_figure(window, step)
        assert [t["name"] for t in bars["data"][:3]] == ["‖g‖₂", "‖g‖₂/‖w‖₂", "‖r/w‖∞"]
        for trace, metric in zip(bars["data"], D.MEASUREMENTS):
            expected = run.layer(metric)[row].astype(np.float64)
            got = np.array([np.nan if v is None else v for v in trace["y"]])
            np.testing.assert_array_equal(got, np.where(expected > 0, expected, np.nan))
        factors = D.replay_factor_figure(window, step)
        for trace, rule in zip(factors["data"], D.SHOWN_RULES):
            np.testing.assert_allclose(np.array(trace["y"], float), run.factor(rule)[row], rtol=0)
        assert (
            bars["layout"]["yaxis"]["type"] == "log" and factors["layout"]["yaxis"]["type"] == "log"
        )
        cursor = [
            s
            for s in D.replay_loss_figure(window, step)["layout"]["shapes"]
            if s.get("name") == "cursor"
        ]
        assert cursor[0]["x0"] == step
    assert D.replay_step_label(window, STEP_B) == "Step 2,100 — step-b"
    assert D.replay_step_label(window, STEP_C) == "Step 2,160 — step-c"
    # Figure 4b: the chosen layer at step-a, step-b, step-c.
    fig4 = D.figure4_figure(window, "like/kernel")
    assert fig4["data"][0]["x"] == ["step-a", "step-b", "step-c"]
    j = run.layers.index("like/kernel")
    np.testing.assert_allclose(
        fig4["data"][2]["y"],
        run.layer("update_weight_linf")[[STEP_A - 1, STEP_B - 1, STEP_C - 1], j],
    )

    # Slider and play button.
    key = full["key"]
    r = C.render_replay_controls(catalog, "naive", key, "replay-episode", None, False)
    assert (r["min"], r["max"], r["value"], r["disabled"]) == (
        window.start,
        window.end,
        STEP_B,
        True,
    )
    assert (
        r["marks"][str(STEP_B)]["label"] == "step-a · step-b"
        and r["marks"][str(STEP_C)]["label"] == "step-c"
    )
    r = C.render_replay_controls(catalog, "naive", key, "replay-play", STEP_B, False)
    assert r["disabled"] is False and r["value"] == STEP_B and "Pause" in r["label"]
    r = C.render_replay_controls(catalog, "naive", key, "replay-interval", STEP_B, True)
    assert r["value"] > STEP_B and r["disabled"] is False
    r = C.render_replay_controls(catalog, "naive", key, "replay-interval", window.end - 1, True)
    assert r["value"] == window.end and r["disabled"] is True  # stops at the end
    r = C.render_replay_controls(catalog, "naive", key, "replay-play", window.end, False)
    assert r["value"] == window.start  # play again from the start

    # The healthy run has only a micro-divergence to replay; its recovery is marked.
    micro = D.episodes(catalog.live("clippy"))[0]
    assert micro["kind"] == "micro" and micro["recovered"] == 1375
    assert "recovered" in {
        m["label"]
        for m in C.slider_marks(D.replay_window(catalog.live("clippy"), micro)).values()
        if isinstance(m, dict)
    }


def test_postmortem_summary_beside_the_replay(catalog, logdir):
    live = catalog.live("naive")
    full = D.episodes(live)[0]
    summary = D.postmortem_summary(live, full)
    assert summary["verdict"]
    assert set(summary["factors_at_step_b"]) == set(live.layers)
    run = load_run(logdir / "naive")
    j = run.layers.index("like/kernel")
    assert summary["factors_at_step_b"]["like/kernel"]["clippy"] == pytest.approx(
        float(run.factor("clippy")[STEP_B - 1, j])
    )
    if summary["source"] == "postmortem":
        assert summary["verdict"].startswith("full divergence")
        assert summary["culprits"]
    reaction = summary["sensitivity"]  # thresholds calibrated on the healthy steps (issue 17)
    assert reaction.step_b == full["step_b"] and reaction.ok
    assert reaction_summary_text(reaction) in summary["verdict"]
    out = C.render_summary(catalog, "naive", full["key"], None)
    assert out["layer"] in live.layers and len(out["layers"]) == N_LAYERS
    panel = str(out["summary"])
    assert "How each rule reacts at step-b, thresholds calibrated" in panel
    assert "at the paper's thresholds, as you would train with them" in panel


def test_compare_aligns_runs_by_step(catalog):
    out = C.render_compare(catalog, ["naive", "clippy"], None)
    fig = out["figure"]
    assert fig["layout"]["xaxis2"]["matches"] == "x"  # every panel shares the step axis
    titles = [a["text"] for a in fig["layout"]["annotations"]]
    assert "<b>naive</b> · Fully diverged" in titles and "<b>clippy</b> · Healthy" in titles
    on_x2 = [t for t in fig["data"] if t["xaxis"] == "x2" and t["name"] == "total loss"]
    assert on_x2 and max(on_x2[0]["x"]) == N_STEPS
    assert C.render_compare(catalog, ["naive", "clippy"], out["shown"]) is None
    rows = D.compare_table([catalog.live("naive"), catalog.live("clippy")])
    assert [(r["run"], r["state"]) for r in rows] == [("naive", "diverged"), ("clippy", "healthy")]
    assert rows[0]["full"] == "step-b 2,100 → step-c 2,160"
    assert "at most" in str(C.render_compare(catalog, ["naive"] * 5, None)["figure"])


# ------------------------------------------------------------------------ safety


def test_runs_outside_the_logdir_are_refused(tmp_path):
    served, outside = tmp_path / "served", tmp_path / "outside"
    write_synthetic(served / "ok", np.ones(20))
    write_synthetic(outside / "secret", np.ones(20))
    (served / "escape").symlink_to(outside / "secret", target_is_directory=True)
    (served / "inside-link").symlink_to(served / "ok", target_is_directory=True)
    (served / "sneaky").mkdir()
    (served / "sneaky" / "clippy_meta.json").symlink_to(outside / "secret" / "clippy_meta.json")
    cat = D.Catalog(served)

    assert cat.run_names() == [
        "ok"
    ]  # symlinked directories and runs linking outside are not listed
    for name in (
        "../outside/secret",
        "ok/../../outside/secret",
        str(outside / "secret"),
        "escape",
        "sneaky",
        "",
        None,
        7,
    ):
        with pytest.raises(D.RunRefused):
            cat.resolve(name)
        out = C.render_live(cat, name, None) if isinstance(name, str) and name else None
        if out is not None:
            assert "refused" in out["alert"][0].children and out["loss"]["data"] == []
    assert (
        cat.resolve("inside-link") == (served / "ok").resolve()
    )  # a link that stays inside is fine
    assert cat.resolve("ok") == (served / "ok").resolve()
    assert "refused" in str(C.render_episodes(cat, "escape", None)["alert"])
    assert "refused" in str(C.render_replay(cat, "escape", "full:1", 1)["alert"])
    assert "refused" in str(C.render_compare(cat, ["ok", "escape"], None)["alert"])


def test_deleted_or_corrupted_run_gives_a_message(tmp_path):
    for name in ("gone", "corrupt", "cut"):
        naive_run().write(tmp_path / name, tensorboard=False)
    cat = D.Catalog(tmp_path)
    for name in ("gone", "corrupt", "cut"):
        assert C.render_live(cat, name, None)["badge_class"] == "cm-badge cm-badge--diverged"
    key = D.episodes(cat.live("gone"))[0]["key"]

    shutil.rmtree(tmp_path / "gone")
    out = C.render_live(cat, "gone", {"run": "gone", "version": 2})
    assert out["badge_class"] == "cm-badge cm-badge--error"
    assert (
        "Cannot show run 'gone'" in out["alert"][0].children
        and "deleted or moved" in out["alert"][0].children
    )
    assert C.render_live(cat, "gone", out["shown"]) is None  # the same message is not re-sent
    assert "Cannot replay run 'gone'" in str(C.render_replay(cat, "gone", key, STEP_B)["alert"])
    assert "No post-mortem" in str(C.render_summary(cat, "gone", key, None)["summary"])
    assert C.render_replay_controls(cat, "gone", key, "replay-episode", None, False)["max"] == 1
    assert "Cannot show run 'gone'" in str(C.render_compare(cat, ["gone", "cut"], None)["alert"])

    (tmp_path / "corrupt" / "clippy_meta.json").write_text("{not json")
    out = C.render_live(cat, "corrupt", None)
    assert "unreadable clippy meta" in out["alert"][0].children

    record = tmp_path / "cut" / "clippy_record.bin"
    with open(record, "r+b") as f:
        f.truncate(record.stat().st_size // 2)  # rewritten shorter under the reader: read afresh
    out = C.render_live(cat, "cut", None)
    assert cat.live("cut").steps[-1] == 1000  # the first of three 1000-step chunks survived
    assert out["badge_class"] == "cm-badge cm-badge--healthy" and "step 1,000" in out["steps"]
    assert "read again from the start" in str(out["alert"])

    with pytest.raises(RecordError):
        D.Catalog(tmp_path / "nope")


# ----------------------------------------------------------------------- browser


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser_logdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs", numbered=False)
    naive_run().write(root / "naive", tensorboard=False)
    clippy_run().write(root / "clippy", tensorboard=False)
    hour_ago = time.time() - 3600  # finished runs; only "live" is being written
    for name in ("naive", "clippy"):
        os.utime(root / name / "clippy_record.bin", (hour_ago, hour_ago))
    return root


@pytest.fixture(scope="module")
def live_writer(browser_logdir):
    """A run still being written: steps 1..2130 so far, in a micro-divergence since step 2100."""
    demo = naive_run()
    writer = RunWriter(browser_logdir / "live", demo.meta(), tensorboard=False)
    for first in range(1, 2131, 500):
        writer.append(*demo.chunk(first, min(first + 499, 2130)), None)
    writer.add_events([e for e in demo.events() if e["kind"] == "micro"])
    yield writer, demo
    writer.close()


@pytest.fixture(scope="module")
def server(browser_logdir, live_writer):
    from clippy_monitor.dashboards.dash_app import make_server

    yield from _serve(make_server(browser_logdir, "127.0.0.1", _free_port(), refresh_ms=500))


def _serve(srv):
    """Serve ``srv`` in a thread; yield its URL; shut it down after."""
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.port}/"
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture(scope="module")
def browser():
    yield from chromium(window_size="1500,1000")


def _wait(driver, condition, timeout: float = 30, message: str = ""):
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    def safe(d):
        try:
            return condition(d)
        except (StaleElementReferenceException, WebDriverException):
            return False

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(safe, message)


def _text(driver, element_id: str) -> str:
    return driver.execute_script(
        f"var e = document.getElementById('{element_id}'); return e ? e.innerText : '';"
    )


def _graph(driver, element_id: str, expr: str):
    return driver.execute_script(
        f"var g = document.querySelector('#{element_id} .js-plotly-plot'); return g && g.data ? ({expr}) : null;"
    )


def _select_run(driver, name: str) -> None:
    _wait(
        driver,
        lambda d: d.execute_script(
            f"var i = document.querySelector(\"#run-list input[value='{name}']\"); "
            "if (!i) return false; i.click(); return i.checked;"
        ),
        message=f"run {name} in the run list",
    )


def _show(driver, view: str) -> None:
    from selenium.webdriver.common.by import By

    _wait(
        driver,
        lambda d: (
            d.find_element(
                By.XPATH, f"//*[contains(@class, 'cm-tab') and normalize-space()='{view}']"
            ).click()
            or True
        ),
    )
    _wait(driver, lambda d: d.find_element(By.ID, f"{view.lower()}-view").is_displayed())


def test_browser_live_view_follows_a_run_being_written(server, browser, live_writer, tmp_path):
    writer, demo = live_writer
    browser.set_window_size(1500, 1150)
    browser.get(server)
    _wait(
        browser,
        lambda d: "live" in _text(d, "run-list") and "naive" in _text(d, "run-list"),
        message="run list",
    )
    _select_run(browser, "live")
    _wait(
        browser,
        lambda d: "step 2,130" in _text(d, "live-steps"),
        message="first paint of the live run",
    )
    # Texts of one callback land together; a graph draws its figure later (plotly.js loads lazily).
    assert "Micro-divergence in progress" in _text(browser, "live-badge")
    assert "in progress" in _text(browser, "live-alert")
    _wait(
        browser,
        lambda d: _graph(d, "live-loss", "Math.max(...g.data[0].x)") == 2130,
        timeout=15,
        message="first live loss plot",
    )

    # A new flush appears within one refresh interval (500 ms; generous bound for loaded CI machines).
    writer.append(*demo.chunk(2131, 2400), None)
    writer.add_events([e for e in demo.events() if e["kind"] == "full"])
    start = time.monotonic()
    _wait(
        browser, lambda d: "step 2,400" in _text(d, "live-steps"), timeout=15, message="live update"
    )
    latency = time.monotonic() - start
    _wait(browser, lambda d: _graph(d, "live-loss", "Math.max(...g.data[0].x)") == 2400, timeout=5)
    assert "Fully diverged" in _text(browser, "live-badge")
    alert = _text(browser, "live-alert")
    assert "Full divergence detected" in alert and "step-c 2,160" in alert
    assert "Clippy" in _text(browser, "live-factor-table")
    print(f"live update shown {latency:.2f} s after the flush")
    assert latency < 10
    time.sleep(0.3)  # let plotly finish drawing
    assert browser.save_screenshot(str(screenshot_path("dash_live.png", tmp_path)))


def test_browser_replay_slider_and_play_button(server, browser, browser_logdir, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    run = load_run(browser_logdir / "naive")
    browser.set_window_size(1500, 1720)
    browser.get(server)
    _select_run(browser, "naive")
    _show(browser, "Replay")
    _wait(
        browser,
        lambda d: _text(d, "replay-step") == "Step 2,100 — step-b",
        message="replay at step-b",
    )

    def bars():
        return _graph(browser, "replay-bars", "g.data[2].y")  # ‖r/w‖∞ per layer

    def expected(step):
        return run.layer("update_weight_linf")[step - 1].astype(float).tolist()

    _wait(
        browser,
        lambda d: bars() is not None and np.allclose(bars(), expected(STEP_B)),
        message="bars at step-b",
    )
    _wait(
        browser,
        lambda d: (
            "full divergence" in _text(d, "replay-summary")
            or "Full divergence" in _text(d, "replay-summary")
        ),
    )
    _wait(browser, lambda d: _graph(d, "replay-fig4", "g.data.length") == 6)
    summary = _text(browser, "replay-summary")
    assert "How each rule reacts at step-b, thresholds calibrated" in summary
    assert "at the paper's thresholds, as you would train with them" in summary
    time.sleep(0.5)
    assert browser.save_screenshot(str(screenshot_path("dash_replay.png", tmp_path)))

    # Keyboard on the slider's handle: five steps to the right.
    handle = browser.find_element(By.CSS_SELECTOR, "#replay-slider [role=slider]")
    for _ in range(5):
        handle.send_keys(Keys.ARROW_RIGHT)
    _wait(
        browser,
        lambda d: _text(d, "replay-step").startswith("Step 2,105"),
        message="slider moved by keys",
    )
    _wait(browser, lambda d: np.allclose(bars(), expected(2105)), message="bars at step 2105")
    cursor = "g.layout.shapes.find(s => s.name === 'cursor').x0"
    _wait(
        browser,
        lambda d: _graph(d, "replay-loss", cursor) == 2105,
        timeout=5,
        message="loss cursor at step 2105",
    )  # a graph of its own

    # A click on the track, past step-c.
    track = browser.find_element(By.CSS_SELECTOR, "#replay-slider .dash-slider-track")
    ActionChains(browser).move_to_element_with_offset(
        track, int(track.rect["width"] * 0.4), 0
    ).click().perform()
    _wait(
        browser,
        lambda d: "after step-c" in _text(d, "replay-step"),
        message="slider moved by a click",
    )
    step = int(_text(browser, "replay-step").split()[1].replace(",", ""))
    assert step > STEP_C
    _wait(browser, lambda d: np.allclose(bars(), expected(step)))

    # Play walks forward; pause stops.
    play = browser.find_element(By.ID, "replay-play")
    play.click()
    _wait(browser, lambda d: "Pause" in d.find_element(By.ID, "replay-play").text)
    _wait(
        browser,
        lambda d: int(_text(d, "replay-step").split()[1].replace(",", "")) > step,
        timeout=15,
        message="play advances",
    )
    browser.find_element(By.ID, "replay-play").click()
    _wait(browser, lambda d: "Play" in d.find_element(By.ID, "replay-play").text)


def test_browser_compare_view(server, browser, tmp_path):
    browser.set_window_size(1500, 1050)
    browser.get(server)
    _show(browser, "Compare")
    browser.execute_script("window.scrollTo(0, 0)")
    _wait(
        browser,
        lambda d: _graph(d, "compare-graph", "g.layout.xaxis2 !== undefined && g.data.length > 0"),
        message="compare graph",
    )
    _wait(browser, lambda d: all(n in _text(d, "compare-table") for n in ("naive", "clippy")))
    time.sleep(0.5)
    assert browser.save_screenshot(str(screenshot_path("dash_compare.png", tmp_path)))


@pytest.fixture(scope="module")
def issue17_server(tmp_path_factory):
    """A server on two records of issue 17: an AUC collapse, a run consistently micro-diverging."""
    from clippy_monitor.dashboards.dash_app import make_server

    from clippy_monitor.evaluations import Evaluation, auc_collapse
    from tests.test_evaluations import MICROS, micro_record, write_record

    root = tmp_path_factory.mktemp("issue17_dash")
    evals = [Evaluation(s, {"auc/click": v}) for s, v in [(79, 0.7), (159, 0.5), (239, 0.5)]]
    write_record(root / "auc", [e.to_record() for e in evals] + [auc_collapse(evals).to_record()])
    write_record(root / "repeated", [micro_record(s) for s in MICROS])
    yield from _serve(make_server(root, "127.0.0.1", _free_port(), refresh_ms=500))


def test_browser_badge_shows_an_auc_collapse_and_consistent_micro_divergence(
    issue17_server, browser
):
    browser.get(issue17_server)
    _wait(browser, lambda d: "repeated" in _text(d, "run-list"), message="run list")
    _select_run(browser, "auc")
    _wait(browser, lambda d: "Fully diverged" in _text(d, "live-badge"), message="auc badge")
    assert "auc collapse" in _text(browser, "live-badge")
    assert "auc/click fell to chance at step 159" in _text(browser, "live-alert")
    _select_run(browser, "repeated")
    _wait(
        browser,
        lambda d: "consistently micro-diverging" in _text(d, "live-badge"),
        message="repeated-micro badge",
    )
    assert "3 micro-divergences in steps 100-260" in _text(browser, "live-badge")
