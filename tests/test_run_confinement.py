"""One confinement rule for served runs, shared by the Dash app and the TensorBoard tab.

The same symlink fixtures are refused by :func:`clippy_monitor.record.paths.confined_run`,
by Dash's ``Catalog.resolve`` and by the TensorBoard plugin (HTTP 4xx, not listed).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from clippy_monitor.dashboards.dash_app import data as D

from clippy_monitor.record import RecordError
from clippy_monitor.record.format import (
    EVENTS_FILE,
    META_FILE,
    RECORD_FILE,
    RECORD_FILES,
    WRITER_FILE,
)
from clippy_monitor.record.paths import RunRefused, confined_run, is_inside
from clippy_monitor.tensorboard_plugin.demo import DemoRun
from tests.test_tensorboard_plugin import plugin_client

ACCEPTED = ("ok", "inside", "inside_relative")
#: run name -> why it is refused (a word the message must hold)
REFUSED = {
    "link_meta": META_FILE,
    "link_record": RECORD_FILE,
    "link_events": EVENTS_FILE,
    "link_writer": WRITER_FILE,
    "dangling_record": RECORD_FILE,  # a dangling link that points outside
    "escape": "outside",  # a symlinked directory pointing outside
}
BAD_NAMES = ("../outside/secret", "ok/../../outside/secret", "ok\\..\\..", "", "a\x00b", None, 7)


def _copy_run(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    for file in RECORD_FILES:
        shutil.copy(src / file, dst / file)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """``served/`` (runs, some with record files linked outside) and ``outside/secret``."""
    base = tmp_path_factory.mktemp("confinement")
    served, secret = base / "served", base / "outside" / "secret"
    DemoRun(n_steps=60, n_layers=2, micro=[10]).write(served / "ok", tensorboard=False)
    DemoRun(n_steps=90, n_layers=3, micro=[20]).write(secret, tensorboard=False)
    for stem, file in (
        ("meta", META_FILE),
        ("record", RECORD_FILE),
        ("events", EVENTS_FILE),
        ("writer", WRITER_FILE),
    ):
        run = served / f"link_{stem}"
        _copy_run(served / "ok", run)
        (run / file).unlink()
        (run / file).symlink_to(secret / file)  # absolute link to a file outside
    _copy_run(served / "ok", served / "dangling_record")
    (served / "dangling_record" / RECORD_FILE).unlink()
    (served / "dangling_record" / RECORD_FILE).symlink_to(secret / "gone.bin")
    (served / "escape").symlink_to(secret, target_is_directory=True)
    (served / "inside").mkdir()
    (served / "inside_relative").mkdir()
    for file in RECORD_FILES:
        (served / "inside" / file).symlink_to(served / "ok" / file)  # absolute, stays inside
        (served / "inside_relative" / file).symlink_to(Path("..") / "ok" / file)
    return base


# ----------------------------------------------------------------- the shared rule


def test_confined_run_refuses_names_and_links_that_leave_the_root(tree, monkeypatch):
    served = tree / "served"
    for name in ACCEPTED:
        assert confined_run(served, name) == (served / name).resolve()
    assert confined_run(served, ".") == served.resolve()
    assert confined_run(served, "./ok/") == (served / "ok").resolve()
    for name, why in REFUSED.items():
        with pytest.raises(RunRefused, match="refused") as info:
            confined_run(served, name)
        assert why in str(info.value) and repr(name) in str(info.value)
        assert isinstance(info.value, RecordError)  # every reader already handles RecordError
    for name in (*BAD_NAMES, str(tree / "outside" / "secret")):
        with pytest.raises(RunRefused, match="refused|invalid run name"):
            confined_run(served, name)

    # A relative root (as TensorBoard's --logdir may be) and a root that is itself a symlink.
    monkeypatch.chdir(tree)
    assert confined_run("served", "inside") == (served / "inside").resolve()
    with pytest.raises(RunRefused, match=RECORD_FILE):
        confined_run("served", "link_record")
    (tree / "alias").symlink_to(served, target_is_directory=True)
    assert confined_run(tree / "alias", "ok") == (served / "ok").resolve()
    with pytest.raises(RunRefused):
        confined_run(tree / "alias", "link_meta")


def test_is_inside():
    root = Path("/a/b")
    assert is_inside(Path("/a/b"), root) and is_inside(Path("/a/b/c/d"), root)
    assert not is_inside(Path("/a/bc"), root) and not is_inside(Path("/a"), root)


# ---------------------------------------------------------------------------- Dash


def test_dash_catalog_applies_the_shared_rule(tree):
    served = tree / "served"
    catalog = D.Catalog(served)
    for name in ACCEPTED:
        assert catalog.resolve(name) == (served / name).resolve()
    for name, why in REFUSED.items():
        with pytest.raises(RunRefused, match=why):
            catalog.resolve(name)
    for name in BAD_NAMES:
        with pytest.raises(RunRefused):
            catalog.resolve(name)
    assert D.RunRefused is RunRefused  # one definition


# --------------------------------------------------------------------- TensorBoard


def _plugin(logdir: str):
    return plugin_client(logdir)[1]


def test_tensorboard_applies_the_shared_rule(tree, monkeypatch):
    monkeypatch.chdir(tree)
    get = _plugin("served")  # a relative --logdir; run names are relative to it
    status, body = get("/runs")
    assert status == 200
    assert [r["run"] for r in json.loads(body)["runs"]] == sorted(
        ACCEPTED
    )  # refused runs are not listed
    for name in ACCEPTED:
        status, body = get("/summary", run=name)
        assert status == 200 and json.loads(body)["steps"] == 60, body
    for name, why in REFUSED.items():
        for route, params in (("/summary", {}), ("/series", {}), ("/layers", {"step": 1})):
            status, body = get(route, run=name, **params)
            assert status == 403 and "refused" in body and why in body, (route, name, body)
    for name in ("../outside/secret", str(tree / "outside" / "secret"), "ok/../../outside/secret"):
        status, body = get("/summary", run=name)
        assert status == 403 and "refused" in body, (name, body)


def test_tensorboard_refuses_a_link_made_after_the_run_was_listed(tmp_path, monkeypatch):
    served, secret = tmp_path / "served", tmp_path / "secret"
    DemoRun(n_steps=40, n_layers=2).write(served / "run", tensorboard=False)
    DemoRun(n_steps=80, n_layers=2).write(secret, tensorboard=False)
    get = _plugin(str(served))
    assert get("/summary", run="run")[0] == 200
    os.unlink(served / "run" / RECORD_FILE)
    (served / "run" / RECORD_FILE).symlink_to(secret / RECORD_FILE)
    status, body = get("/summary", run="run")
    assert status == 403 and RECORD_FILE in body and "refused" in body
    assert json.loads(get("/runs")[1])["runs"] == []
