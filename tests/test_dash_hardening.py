"""The Dash app under hostile or careless use: aliased run names, bad ports, forged callback values.

* Open runs are keyed by their real path and bounded (least recently used closed).
* ``clippy-monitor dash`` refuses a bad port, a port in use and an unknown host with one line.
* Every value a client can send to ``/_dash-update-component`` is checked: a forged one
  gets HTTP 400 with a message naming the input, never a 500.
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from clippy_monitor.dashboards.dash_app import callbacks as C
from clippy_monitor.dashboards.dash_app import data as D

from clippy_monitor import cli
from clippy_monitor.record import load_run
from clippy_monitor.record.format import RECORD_FILE
from clippy_monitor.tensorboard_plugin.demo import DemoRun

STEP_B = 400


def _write(path: Path, n_steps: int = 600, seed: int = 2) -> None:
    DemoRun(n_steps, 4, micro=[200], full=STEP_B, clippy=False, seed=seed).write(
        path, tensorboard=False
    )


def _mapped(run_dir: Path) -> int:
    """How many memory maps of this process show the run's record file."""
    record = os.path.realpath(run_dir / RECORD_FILE)
    with open("/proc/self/maps") as f:
        return sum(
            1 for line in f if line.rstrip().endswith(record) or f"{record} (deleted)" in line
        )


# Outside CI, a machine without /proc skips; under CI=true (Linux) its absence is a failure.
needs_proc_maps = pytest.mark.skipif(
    not os.path.exists("/proc/self/maps") and os.environ.get("CI") != "true",
    reason="needs /proc/self/maps (Linux)",
)


# ------------------------------------------------------------- open runs: aliases and bound


def test_aliased_run_names_share_one_live_run(tmp_path):
    _write(tmp_path / "big")
    cat = D.Catalog(tmp_path)
    first = cat.live("big")
    for alias in ("./big", "././big", "big/", "big/.", "./big/./", "big//"):
        assert cat.live(alias) is first, alias
    assert cat.open_runs == ["big"]
    assert first.name == "big"  # the name under the served directory, whatever alias opened it
    (tmp_path / "link").symlink_to(tmp_path / "big", target_is_directory=True)
    assert cat.live("link") is first  # a link inside the directory is the same run


@needs_proc_maps
def test_open_runs_are_bounded_and_the_least_recently_used_is_closed(tmp_path):
    names = ["r0", "r1", "r2", "r3"]
    for i, name in enumerate(names):
        _write(tmp_path / name, seed=i)
    cat = D.Catalog(tmp_path, max_open=3)
    runs = {name: cat.live(name) for name in names[:3]}
    assert all(_mapped(tmp_path / n) >= 1 for n in names[:3])
    cat.live("r0")  # r0 becomes the most recently used; r1 is now the least
    fourth = cat.live("r3")
    assert cat.open_runs == ["r2", "r0", "r3"]
    assert runs["r1"].closed and len(runs["r1"]) == 0
    assert _mapped(tmp_path / "r1") == 0  # its memory maps are released
    assert _mapped(tmp_path / "r0") >= 1 and not runs["r0"].closed
    assert len(fourth) == 600

    again = cat.live("r1")  # reopened: a fresh LiveRun that reads the whole record again
    assert again is not runs["r1"] and not again.closed
    expected = load_run(tmp_path / "r1")
    np.testing.assert_array_equal(again.steps, expected.steps)
    np.testing.assert_array_equal(again.series("loss"), expected.series("loss"))
    assert cat.open_runs == ["r0", "r3", "r1"] and runs["r2"].closed
    out = C.render_live(cat, "r1", None)
    assert (
        out["badge_class"] == "cm-badge cm-badge--diverged" and "600 steps recorded" in out["steps"]
    )


@needs_proc_maps
def test_a_run_in_use_is_closed_only_when_its_last_user_is_done(tmp_path):
    for name in ("a", "b", "c"):
        _write(tmp_path / name)
    cat = D.Catalog(tmp_path, max_open=1)
    with cat.open("a") as held:
        assert cat.live("b") is not held  # evicts "a" from the catalog ...
        assert not held.closed and len(held) == 600  # ... but its user still reads it
        assert held.series("loss").shape == (600,)
    assert held.closed and _mapped(tmp_path / "a") == 0
    assert cat.open_runs == ["b"]


def test_callbacks_in_many_threads_over_more_runs_than_the_bound(tmp_path):
    names = [f"r{i}" for i in range(5)]
    for i, name in enumerate(names):
        _write(tmp_path / name, n_steps=450, seed=i)
    cat = D.Catalog(tmp_path, max_open=2)
    failures: list[str] = []

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(25):
            a, b = (str(n) for n in rng.choice(names, 2, replace=False))
            live = C.render_live(cat, a, None)
            compare = C.render_compare(cat, [a, b, a], None)
            for out in (live, compare):
                if "Internal error" in str(out) or "Cannot show" in str(out):
                    failures.append(str(out)[:300])
            if "450 steps recorded" not in live["steps"]:
                failures.append(live["steps"])

    threads = [threading.Thread(target=work, args=(seed,), daemon=True) for seed in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), "deadlock"
    assert failures == []
    assert len(cat.open_runs) == 2


def test_the_bound_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="max_open"):
        D.Catalog(tmp_path, max_open=0)


# ------------------------------------------------------------------------- CLI: port, host


@pytest.fixture
def no_serving(monkeypatch):
    """A server that would start serving fails the test instead of blocking it."""
    from werkzeug.serving import BaseWSGIServer

    def serve_forever(self, *args, **kwargs):
        pytest.fail(f"served on {self.host}:{self.server_address[1]}")

    monkeypatch.setattr(BaseWSGIServer, "serve_forever", serve_forever)


@pytest.mark.parametrize("port", ["99999", "65536", "0", "-1", "abc", "80.5", ""])
def test_dash_refuses_a_bad_port_with_one_line(port, tmp_path, capsys, no_serving):
    with pytest.raises(SystemExit) as stop:
        cli.main(["dash", "--logdir", str(tmp_path), "--port", port])
    assert stop.value.code == 2
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("clippy-monitor dash: error: argument --port: ")
    assert "1..65535" in err[0] and captured.out == ""


@pytest.mark.parametrize("ms", ["99", "-5", "abc", "1e3"])
def test_dash_refuses_a_bad_refresh_interval_with_one_line(ms, tmp_path, capsys, no_serving):
    with pytest.raises(SystemExit) as stop:
        cli.main(["dash", "--logdir", str(tmp_path), "--refresh-ms", ms])
    assert stop.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(
        "clippy-monitor dash: error: argument --refresh-ms: "
    ), err


def test_dash_accepts_the_ports_at_the_ends_of_the_range(monkeypatch, tmp_path):
    from clippy_monitor.dashboards.dash_app import app as app_module

    calls = []
    monkeypatch.setattr(app_module, "serve", lambda *a, **k: calls.append(k["port"]))
    for port in ("1", "65535", " 8060 "):
        assert cli.main(["dash", "--logdir", str(tmp_path), "--port", port]) == 0
    assert calls == [1, 65535, 8060]


def test_dash_refuses_a_port_in_use_with_one_line(tmp_path, capsys, no_serving):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = cli.main(["dash", "--logdir", str(tmp_path), "--port", str(port)])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.splitlines() == [
        f"clippy-monitor dash: error: port {port} on 127.0.0.1 is in use"
    ]
    assert captured.out == ""


@pytest.mark.parametrize("host", ["no.such.host.invalid", "300.1.1.1", "", "bad host"])
def test_dash_refuses_a_bad_host_with_one_line(host, tmp_path, capsys, no_serving):
    try:
        code = cli.main(["dash", "--logdir", str(tmp_path), "--host", host, "--port", "1"])
    except SystemExit as stop:  # refused by the argument parser
        code = stop.code
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("clippy-monitor dash: error: ") and "host" in err[0]


def test_the_server_binds_the_port_it_was_given(tmp_path):
    from clippy_monitor.dashboards.dash_app import app as app_module

    server = app_module.make_server(tmp_path, port=0)
    try:
        port = server.port
        assert port > 0 and server.socket.getsockname() == ("127.0.0.1", port)
        with pytest.raises(app_module.CannotServe, match=f"port {port} on 127.0.0.1 is in use"):
            app_module.make_server(tmp_path, port=port)
        client = server.dash_app.server.test_client()
        assert client.get("/").status_code == 200
    finally:
        server.server_close()


# ------------------------------------------------------------------- forged callback values


@pytest.fixture(scope="module")
def forge_logdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("forge")
    _write(root / "naive")
    _write(root / "other", seed=3)
    return root


@pytest.fixture(scope="module")
def app(forge_logdir):
    from clippy_monitor.dashboards.dash_app import create_app

    return create_app(forge_logdir)


@pytest.fixture(scope="module")
def client(app):
    return app.server.test_client()


def _good_values(app) -> dict[tuple[str, str], object]:
    """A plausible value per (component, property), so forged values reach deep code paths."""
    live = app.clippy_catalog.live("naive")
    key = D.episodes(live)[0]["key"]
    return {
        ("run-list", "value"): "naive",
        ("compare-runs", "value"): ["naive", "other"],
        ("compare-runs", "options"): [{"label": "naive", "value": "naive"}],
        ("replay-episode", "value"): key,
        ("replay-layer", "value"): live.layers[0],
        ("replay-slider", "value"): STEP_B,
        ("replay-interval", "disabled"): False,
        ("view", "value"): "replay",
    }


def _outputs(output: str) -> list[dict] | dict:
    """The output spec the browser sends for callback ``output`` (a key of ``app.callback_map``)."""
    if output.startswith(".."):
        return [_outputs(part) for part in output[2:-2].split("...")]
    id_, prop = output.rsplit(".", 1)
    return {"id": id_, "property": prop}


def _body(app, output: str, values: dict[int, object], good: dict) -> dict:
    cb = app.callback_map[output]
    specs = cb["inputs"] + cb["state"]
    items = [
        {**spec, "value": values.get(i, good.get((spec["id"], spec["property"])))}
        for i, spec in enumerate(specs)
    ]
    n = len(cb["inputs"])
    changed = [f"{s['id']}.{s['property']}" for s in cb["inputs"]]
    return {
        "output": output,
        "outputs": _outputs(output),
        "inputs": items[:n],
        "state": items[n:],
        "changedPropIds": changed,
    }


def _post(client, body) -> tuple[int, str]:
    response = client.post(
        "/_dash-update-component", data=json.dumps(body), content_type="application/json"
    )
    return response.status_code, response.get_data(as_text=True)


FORGED = [
    "x",
    "",
    ["a"],
    [1, 2],
    {"a": 1},
    {"run": ["x"], "version": "v"},
    None,
    True,
    10**30,
    -(10**30),
    1e308,
    math.nan,
    math.inf,
    -1,
    1.5,
    "../../etc/passwd",
    ["x"] * 50,
]


def test_every_callback_input_is_covered_by_a_check(app):
    declared = {
        (s["id"], s["property"])
        for cb in app.callback_map.values()
        for s in cb["inputs"] + cb["state"]
    }
    assert declared and declared <= set(C.INPUT_CHECKS), declared - set(C.INPUT_CHECKS)


def test_forged_callback_values_never_give_a_server_error(app, client):
    good = _good_values(app)
    assert app.callback_map, "no callbacks discovered"
    for output, cb in app.callback_map.items():
        specs = cb["inputs"] + cb["state"]
        status, text = _post(client, _body(app, output, {}, good))
        assert status in (200, 204), (output, status, text[-500:])
        for i, spec in enumerate(specs):
            where = f"{spec['id']}.{spec['property']}"
            for value in FORGED:
                status, text = _post(client, _body(app, output, {i: value}, good))
                assert status in (200, 204, 400), (output, where, value, status, text[-300:])
                if status == 400:
                    assert where in text and "Traceback" not in text, (where, value, text)


def test_a_forged_slider_value_is_refused_with_a_message(app, client):
    good = _good_values(app)
    output = next(
        k
        for k, cb in app.callback_map.items()
        if cb["inputs"] == [{"id": "replay-slider", "property": "value"}]
    )
    status, text = _post(client, _body(app, output, {0: "x"}, good))
    assert status == 400
    assert (
        text.strip()
        == "clippy-monitor: bad callback input: replay-slider.value must be a step number, got 'x'"
    )
    status, _ = _post(client, _body(app, output, {0: STEP_B + 3}, good))
    assert status == 200


@pytest.mark.parametrize(
    "forge",
    [
        lambda body: [],  # not an object
        lambda body: {k: v for k, v in body.items() if k != "output"},
        lambda body: {**body, "output": "nope.children"},
        lambda body: {**body, "output": 7},
        lambda body: {**body, "inputs": body["inputs"][:-1]},
        lambda body: {
            **body,
            "inputs": [*body["inputs"], {"id": "x", "property": "y", "value": 1}],
        },
        lambda body: {**body, "inputs": "x"},
        lambda body: {**body, "inputs": [[i] for i in body["inputs"]]},
        lambda body: {**body, "state": None},
        lambda body: {**body, "outputs": body["outputs"][:1]},
        lambda body: {**body, "outputs": {"id": "x", "property": "y"}},
        lambda body: {**body, "changedPropIds": ['{"a":1}.value']},
        lambda body: {**body, "changedPropIds": "x"},
    ],
)
def test_a_forged_request_envelope_gets_400(app, client, forge):
    good = _good_values(app)
    output = next(
        k
        for k, cb in app.callback_map.items()
        if len(cb["inputs"]) > 1 and cb["state"] and k.startswith("..")
    )
    status, text = _post(client, forge(_body(app, output, {}, good)))
    assert status == 400, text[-500:]
    assert text.startswith("clippy-monitor: bad callback request: ")
    assert len(text.strip().splitlines()) == 1
