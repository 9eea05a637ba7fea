"""Callbacks: each is a plain ``render_*`` function (tests call them directly) wired by
:func:`register_callbacks`.

A run deleted, moved or corrupted while displayed, or a refused run name,
raises :class:`~clippy_monitor.record.RecordError` (or ``OSError``) inside a
render function; it is caught there and shown as an alert in the page.
A request the page cannot have sent (unknown callback, a value of the wrong
type) is refused with HTTP 400 before any callback runs (:func:`check_callback_request`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dash
import flask
from clippy_monitor.dashboards.dash_app import data as D
from clippy_monitor.dashboards.dash_app import layout as L
from dash import Input, Output, State, ctx
from dash.exceptions import PreventUpdate

from clippy_monitor.record import RecordError
from clippy_monitor.record.format import RECORD_FILE

_log = logging.getLogger(__name__)

#: What a broken run raises; shown to the user as a message.
DATA_ERRORS = D.READ_ERRORS
MAX_COMPARE = 4
PLAY_FRAMES = 80  # a replay walks its window in about this many frames
NO_UPDATE = dash.no_update


def _message(exc: BaseException) -> str:
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    return " ".join(str(exc).split()) or type(exc).__name__


# ------------------------------------------------------------------------ run list


def render_runs(
    catalog: D.Catalog,
    current: str | None,
    compare_value: list | None,
    compare_options: list | None,
) -> dict:
    """Run list options; selects the most recently written run if none is selected."""
    names = catalog.run_names()
    options = [L.run_option(D.run_entry(catalog, n)) for n in names]
    value: Any = NO_UPDATE
    if current not in names:
        value = _most_recent(catalog, names)
    compare_opts = [{"label": n, "value": n} for n in names]
    compare_val: Any = NO_UPDATE
    if not compare_value and not compare_options and names:
        # First list: compare every run if there are few, else the selected one and another.
        selected = value if value is not NO_UPDATE else current
        others = [n for n in names if n != selected]
        compare_val = (
            names
            if len(names) <= MAX_COMPARE
            else ([selected] if selected else []) + others[: 2 - bool(selected)]
        )
    elif compare_value:
        kept = [n for n in compare_value if n in names]
        compare_val = kept if kept != compare_value else NO_UPDATE
    note = (
        f"{len(names)} run{'s' if len(names) != 1 else ''} under {catalog.logdir}"
        if names
        else f"No runs under {catalog.logdir} yet; new runs appear here."
    )
    return {
        "options": options,
        "value": value,
        "compare_options": compare_opts,
        "compare_value": compare_val,
        "note": note,
    }


def _most_recent(catalog: D.Catalog, names: list[str]) -> str | None:
    best, best_time = None, None
    for name in names:
        try:
            mtime = os.stat(catalog.resolve(name) / RECORD_FILE).st_mtime
        except (RecordError, OSError):
            continue
        if best_time is None or mtime > best_time:
            best, best_time = name, mtime
    return best or (names[0] if names else None)


# ------------------------------------------------------------------------ live view


def render_live(
    catalog: D.Catalog, run: str | None, shown: dict | None, max_points: int = D.DEFAULT_MAX_POINTS
) -> dict | None:
    """Everything the Live view shows, or None when nothing changed since ``shown``.

    Reads only what was appended since the last call (``LiveRun.refresh``).
    """
    if not run:
        return _live_error(None, "No run selected.", shown, level="waiting")
    try:
        with catalog.open(run) as live:  # locked: another request may be refreshing the same run
            return _render_live(live, run, shown, max_points)
    except DATA_ERRORS as exc:
        return _live_error(run, f"Cannot show run {run!r}: {_message(exc)}", shown)


def _render_live(live: D.LiveRun, run: str, shown: dict | None, max_points: int) -> dict | None:
    try:
        if (
            shown
            and shown.get("run") == run
            and shown.get("version") == live.revision
            and shown.get("path") == str(live.path)
        ):
            return None
        h = D.health(live)
        s = D.live_summary(live)
        steps = (
            f"step {s['last_step']:,} · {s['steps']:,} steps recorded · {s['layers']} layers"
            + (f" · {s['optimizer']}" if s["optimizer"] else "")
            if s["steps"]
            else "no steps yet"
        )
        return {
            "loss": D.live_loss_figure(live, max_points),
            "factors": D.live_factor_figure(live, max_points),
            "badge": L.badge(h["state"], h["title"], h["detail"], h["recovery"]),
            "badge_class": f"cm-badge cm-badge--{h['state']}",
            "steps": steps,
            "table": L.factor_table(D.lowest_factors(live)),
            "alert": L.alert_list(D.alerts(live)),
            "shown": {
                "run": run,
                "version": live.revision,
                "path": str(live.path),
                "last_step": s["last_step"],
            },
        }
    except DATA_ERRORS as exc:
        return _live_error(run, f"Cannot show run {run!r}: {_message(exc)}", shown)


def _live_error(
    run: str | None, message: str, shown: dict | None, level: str = "error"
) -> dict | None:
    if shown and shown.get("run") == run and shown.get("error") == message:
        return None
    figure = D.empty_figure(message if level == "error" else "Select a run on the left", 340)
    return {
        "loss": figure,
        "factors": D.empty_figure("", 300),
        "badge": L.badge(level, "Unavailable" if level == "error" else "No run", ""),
        "badge_class": f"cm-badge cm-badge--{level}",
        "steps": "",
        "table": None,
        "alert": L.error_alert(message) if level == "error" else [],
        "shown": {"run": run, "error": message, "version": None},
    }


# ---------------------------------------------------------------------- replay view


def render_episodes(
    catalog: D.Catalog, run: str | None, current: str | None, run_changed: bool = True
) -> dict:
    """Replay's episode choices and the selected one: after a change of run, the full
    divergence (else the episode in progress, else the latest micro-divergence); while the
    same run grows, the current choice is kept."""
    if not run:
        return {"options": [], "value": None, "alert": []}
    try:
        with catalog.open(run) as live:
            eps = D.episodes(live)
    except DATA_ERRORS as exc:
        return {
            "options": [],
            "value": None,
            "alert": L.error_alert(f"Cannot replay run {run!r}: {_message(exc)}"),
        }
    options = [{"label": e["label"], "value": e["key"]} for e in eps]
    keys = [e["key"] for e in eps]
    value = current if current in keys and not run_changed else (keys[0] if keys else None)
    alert = (
        []
        if eps
        else L.info_alert(
            f"Run {run!r} has no divergence to replay: the detector saw neither a micro nor a full divergence."
        )
    )
    return {"options": options, "value": value if value != current else NO_UPDATE, "alert": alert}


@contextlib.contextmanager
def _episode(catalog: D.Catalog, run: str, key: str) -> Iterator[tuple[D.LiveRun, dict]]:
    """The run, held as by ``Catalog.open``, and its episode ``key`` (KeyError if gone)."""
    with catalog.open(run) as live:
        episode = next((e for e in D.episodes(live) if e["key"] == key), None)
        if episode is None:
            raise KeyError(f"run {run!r} has no episode {key!r} any more")
        yield live, episode


def render_replay_controls(
    catalog: D.Catalog,
    run: str | None,
    key: str | None,
    trigger: str | None,
    value: int | None,
    playing: bool,
) -> dict:
    """The slider (range, step-a/b/c marks, position) and the play state.

    ``trigger``: ``"replay-episode"`` (new window: cursor to step-b, stop),
    ``"replay-play"`` (toggle; restart from the window's start if at its end),
    ``"replay-interval"`` (advance one frame; stop at the end).
    """
    stopped = {"disabled": True, "label": "▶ Play"}
    if not run or not key:
        return {"min": 0, "max": 1, "marks": {}, "value": 0, **stopped}
    try:
        with _episode(catalog, run, key) as (live, episode):
            window = D.replay_window(live, episode)
    except DATA_ERRORS:
        return {"min": 0, "max": 1, "marks": {}, "value": 0, **stopped}
    lo, hi = window.start, window.end
    stride = max(1, (hi - lo) // PLAY_FRAMES)
    marks = slider_marks(window)
    base = {"min": lo, "max": hi, "marks": marks}
    if trigger == "replay-play":
        if playing:
            return {**base, "value": NO_UPDATE, **stopped}
        start = lo if value is None or value >= hi or value < lo else value
        return {**base, "value": start, "disabled": False, "label": "❚❚ Pause"}
    if trigger == "replay-interval":
        if not playing:
            raise PreventUpdate
        nxt = min(hi, (value if value is not None else lo) + stride)
        if nxt >= hi:
            return {**base, "value": hi, **stopped}
        return {**base, "value": nxt, "disabled": False, "label": "❚❚ Pause"}
    return {**base, "value": int(episode["step_b"]), **stopped}


def slider_marks(window: D.ReplayWindow) -> dict:
    """Window ends, step-a/b/c (or the recovery) and the rollbacks in colour; marks closer
    than 4% of the window share one label (step-a is usually step-b - 1)."""
    lo, hi = window.start, window.end
    full = window.episode["kind"] == "full"
    found = []
    for moment, step in window.moments().items():
        if step is not None and lo <= step <= hi:
            label = D.MOMENT_LABELS[moment] if moment != "step_c" or full else "recovered"
            color = D.MOMENT_COLORS[moment] if moment != "step_c" or full else D.RECOVERED_COLOR
            found.append((step, label, color))
    for r in window.recovery.rollbacks if window.recovery is not None else ():
        if lo <= r.step <= hi:
            found.append((r.step, D.KIND_LABELS["rollback"], D.KIND_COLORS["rollback"]))
    moments = []
    for step, label, color in sorted(found, key=lambda m: m[0]):
        if moments and step - moments[-1][0] <= max(1, 0.04 * (hi - lo)):
            moments[-1] = (step, f"{moments[-1][1]} · {label}", color)
        else:
            moments.append((step, label, color))
    marks = {str(lo): f"{lo:,}", str(hi): f"{hi:,}"}
    for step, label, color in moments:
        marks[str(step)] = {
            "label": label,
            "style": {"color": color, "fontWeight": 600, "whiteSpace": "nowrap"},
        }
    return marks


#: The sharpness panel and its note while nothing is shown (no run, no series, an error).
NO_SHARPNESS = {
    "sharpness": {"data": [], "layout": {"height": 250}},
    "sharpness_style": {"display": "none"},
    "sharpness_note": "",
}


def render_replay(catalog: D.Catalog, run: str | None, key: str | None, step: int | None) -> dict:
    """Loss with a cursor, per-layer bars of the measurements and of the factors at ``step``;
    the sharpness plot and its reading when the record has the series (else hidden)."""
    if not run or not key:
        msg = "Select a diverged run and an episode to replay." if run else "No run selected."
        return {
            "loss": D.empty_figure(msg, 270),
            "bars": D.empty_figure("", 300),
            "factors": D.empty_figure("", 300),
            "label": "",
            "alert": NO_UPDATE,
            **NO_SHARPNESS,
        }
    try:
        with _episode(catalog, run, key) as (live, episode):
            window = D.replay_window(live, episode)
        step = int(episode["step_b"]) if step is None else int(step)
        sharpness = D.replay_sharpness_figure(window, step)
        return {
            "loss": D.replay_loss_figure(window, step),
            "bars": D.replay_bars_figure(window, step),
            "factors": D.replay_factor_figure(window, step),
            "label": D.replay_step_label(window, step),
            "alert": [],
            **(
                NO_SHARPNESS
                if sharpness is None
                else {
                    "sharpness": sharpness,
                    "sharpness_style": {"display": "block"},
                    "sharpness_note": window.sharpness.note(),
                }
            ),
        }
    except DATA_ERRORS as exc:
        msg = f"Cannot replay run {run!r}: {_message(exc)}"
        return {
            "loss": D.empty_figure(msg, 270),
            "bars": D.empty_figure("", 300),
            "factors": D.empty_figure("", 300),
            "label": "",
            "alert": L.error_alert(msg),
            **NO_SHARPNESS,
        }


def render_summary(
    catalog: D.Catalog, run: str | None, key: str | None, current_layer: str | None
) -> dict:
    """The post-mortem beside the replay, and the layer choices of the Figure 4b panel."""
    if not run or not key:
        return {"summary": [], "layers": [], "layer": None}
    try:
        with _episode(catalog, run, key) as (live, episode):
            summary = D.postmortem_summary(live, episode)
            window = D.replay_window(live, episode)
    except DATA_ERRORS as exc:
        return {
            "summary": L.error_alert(f"No post-mortem for {run!r}: {_message(exc)}"),
            "layers": [],
            "layer": None,
        }
    layers = [{"label": name, "value": name} for name in window.layers]
    layer = (
        current_layer
        if current_layer in window.layers
        else D.default_layer(window, summary.get("culprits"))
    )
    return {"summary": L.summary_panel(summary, episode), "layers": layers, "layer": layer}


def render_figure4(catalog: D.Catalog, run: str | None, key: str | None, layer: str | None) -> dict:
    if not run or not key or not layer:
        return D.empty_figure("", 330)
    try:
        with _episode(catalog, run, key) as (live, episode):
            window = D.replay_window(live, episode)
        return D.figure4_figure(window, layer)
    except DATA_ERRORS as exc:
        return D.empty_figure(_message(exc), 330)


# --------------------------------------------------------------------- compare view


def render_compare(catalog: D.Catalog, names: list | None, shown: dict | None) -> dict | None:
    """Runs side by side aligned by step; None when none of them changed since ``shown``."""
    names = [n for n in (names or []) if isinstance(n, str)]
    if len(names) > MAX_COMPARE:
        return {
            "figure": D.empty_figure(f"Pick at most {MAX_COMPARE} runs", 620),
            "table": None,
            "alert": [],
            "shown": None,
            "replays": [],
        }
    with catalog.open_many(names) as (runs, failures):  # each run once, all locked
        errors = [f"Cannot show run {name!r}: {_message(exc)}" for name, exc in failures]
        key = [[r.name, r.revision] for r in runs] + [[e, None] for e in errors]
        originals, errors_r = replay_runs(catalog, names)
        key.append([[name, [p.name for p in paths]] for name, _, paths in originals])
        if shown is not None and shown.get("key") == key:
            return None
        replays = []
        for name, path, _ in originals:
            try:
                comparison = D.replay_comparison(name, path)
            except DATA_ERRORS as exc:
                errors_r.append(f"Cannot show the replays of run {name!r}: {_message(exc)}")
                continue
            if comparison is not None:
                replays.append(comparison)
        return {
            "figure": D.compare_figure(runs)
            if runs
            else D.empty_figure("Pick two or more runs to compare", 620),
            "table": L.compare_rows(D.compare_table(runs)) if runs else None,
            "alert": [L.error_alert(e)[0] for e in errors + errors_r],
            "shown": {"key": key},
            "replays": L.replay_panels([(D.replay_figure(c), c.verdicts) for c in replays]),
        }


def replay_runs(
    catalog: D.Catalog, names: list[str]
) -> tuple[list[tuple[str, Path, list[Path]]], list[str]]:
    """``(name, directory, replay records)`` of each picked run with replays (a picked
    replay stands for its run), and the errors; cheap: no record is read."""
    found, errors = [], []
    for name in D.replay_originals(names, catalog.run_names()):
        try:
            path = catalog.resolve(name)
            paths = D.replay_paths(path)
        except DATA_ERRORS as exc:
            errors.append(f"Cannot show the replays of run {name!r}: {_message(exc)}")
            continue
        if paths:
            found.append((name, path, paths))
    return found, errors


# ------------------------------------------------------------------- forged requests

MAX_TEXT = 4096  # characters in a run name, an episode key, a layer name
MAX_LIST = 64  # entries in a list of runs or options
MAX_COUNT = 2**53  # n_clicks, n_intervals and steps: integers a browser represents exactly
VIEW_NAMES = tuple(value for value, _ in L.VIEWS)


class BadCallbackRequest(ValueError):
    """A callback request the page cannot have sent; answered with HTTP 400 and this message."""


def _is_text(value: Any) -> bool:
    return value is None or (isinstance(value, str) and len(value) <= MAX_TEXT)


def _is_count(value: Any) -> bool:
    return value is None or (type(value) is int and 0 <= value <= MAX_COUNT)


def _is_step(value: Any) -> bool:
    return value is None or (
        type(value) in (int, float) and abs(value) <= MAX_COUNT
    )  # NaN compares False


def _is_names(value: Any) -> bool:
    if value is None:
        return True
    return (
        isinstance(value, list)
        and len(value) <= MAX_LIST
        and all(isinstance(v, str) and _is_text(v) for v in value)
    )


def _is_options(value: Any) -> bool:
    return value is None or (
        isinstance(value, list)
        and len(value) <= MAX_LIST
        and all(isinstance(v, dict) for v in value)
    )


@dataclass(frozen=True)
class InputCheck:
    """What a callback input or state may hold: ``accepts(value)``, described as ``what``."""

    what: str
    accepts: Callable[[Any], bool]


#: Every (component, property) a callback reads, and what a client may send for it.
#: A callback reading anything else is refused (tests/test_dash_hardening.py checks the table is complete).
INPUT_CHECKS: dict[tuple[str, str], InputCheck] = {
    ("run-list", "value"): InputCheck("a run name", _is_text),
    ("compare-runs", "value"): InputCheck(f"a list of at most {MAX_LIST} run names", _is_names),
    ("compare-runs", "options"): InputCheck(f"a list of at most {MAX_LIST} options", _is_options),
    ("replay-episode", "value"): InputCheck("an episode key", _is_text),
    ("replay-layer", "value"): InputCheck("a layer name", _is_text),
    ("replay-slider", "value"): InputCheck("a step number", _is_step),
    ("replay-interval", "disabled"): InputCheck(
        "true or false", lambda v: v is None or isinstance(v, bool)
    ),
    ("view", "value"): InputCheck(
        f"one of {', '.join(VIEW_NAMES)}", lambda v: v is None or v in VIEW_NAMES
    ),
    ("runs-interval", "n_intervals"): InputCheck("a count", _is_count),
    ("live-interval", "n_intervals"): InputCheck("a count", _is_count),
    ("replay-interval", "n_intervals"): InputCheck("a count", _is_count),
    ("replay-play", "n_clicks"): InputCheck("a count", _is_count),
    ("live-shown", "data"): InputCheck("an object", lambda v: v is None or isinstance(v, dict)),
    ("compare-shown", "data"): InputCheck("an object", lambda v: v is None or isinstance(v, dict)),
}


def _shown(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) or value is None else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _declared(spec: Any) -> list[tuple[str, str]]:
    """``(id, property)`` of an output spec as Dash keys it (``..a.b...c.d..`` or ``a.b``), ``@`` tags dropped."""
    parts = spec[2:-2].split("...") if spec.startswith("..") else [spec]
    return [(part.rsplit(".", 1)[0], part.rsplit(".", 1)[1].split("@")[0]) for part in parts]


def _dependencies(items: Any, declared: list[dict], field: str) -> list[Any]:
    """The values of ``items`` (the request's inputs or state), in the order the callback declares them."""
    if not isinstance(items, list) or len(items) != len(declared):
        raise BadCallbackRequest(
            f"bad callback request: {field} must be a list of {len(declared)} objects"
        )
    for item, spec in zip(items, declared):
        if (
            not isinstance(item, dict)
            or item.get("id") != spec["id"]
            or item.get("property") != spec["property"]
        ):
            raise BadCallbackRequest(
                f"bad callback request: {field} must be {', '.join(_dotted(d) for d in declared)}"
            )
    return [item.get("value") for item in items]


def _dotted(spec: dict) -> str:
    return f"{spec['id']}.{spec['property']}"


def check_callback_request(callback_map: dict, body: Any) -> None:
    """Refuse (:class:`BadCallbackRequest`) a ``/_dash-update-component`` body the page cannot have
    sent: an unknown callback, inputs, state or outputs other than the callback's, or a value
    :data:`INPUT_CHECKS` does not accept."""
    if not isinstance(body, dict):
        raise BadCallbackRequest("bad callback request: the body must be a JSON object")
    output = body.get("output")
    if not isinstance(output, str) or output not in callback_map:
        raise BadCallbackRequest(f"bad callback request: no callback has output {_shown(output)}")
    callback = callback_map[output]
    outputs = body.get("outputs")
    sent = outputs if isinstance(outputs, list) else [outputs]
    if len(sent) != len(_declared(output)) or any(
        not isinstance(o, dict) or (o.get("id"), str(o.get("property")).split("@")[0]) != d
        for o, d in zip(sent, _declared(output))
    ):
        raise BadCallbackRequest(f"bad callback request: outputs must be those of {output}")
    changed = body.get("changedPropIds", [])
    inputs = {_dotted(spec) for spec in callback["inputs"]}
    if not isinstance(changed, list) or not all(
        isinstance(c, str) and c in inputs for c in changed
    ):
        raise BadCallbackRequest(
            f"bad callback request: changedPropIds must name inputs of {output}"
        )
    values = _dependencies(body.get("inputs"), callback["inputs"], "inputs")
    values += _dependencies(body.get("state", []), callback["state"], "state")
    for spec, value in zip(callback["inputs"] + callback["state"], values):
        check = INPUT_CHECKS.get((spec["id"], spec["property"]))
        if check is None:  # a callback added without its entry in INPUT_CHECKS
            raise BadCallbackRequest(f"bad callback input: {_dotted(spec)} has no declared check")
        if not check.accepts(value):
            raise BadCallbackRequest(
                f"bad callback input: {_dotted(spec)} must be {check.what}, got {_shown(value)}"
            )


def refuse_forged_requests(app: dash.Dash) -> None:
    """Check every callback request before Dash runs it: a forged one gets HTTP 400 and one line."""
    path = app.config.routes_pathname_prefix + "_dash-update-component"

    def check() -> flask.Response | None:
        if flask.request.path != path or flask.request.method != "POST":
            return None
        try:
            check_callback_request(app.callback_map, flask.request.get_json(silent=True))
        except BadCallbackRequest as exc:
            return flask.Response(f"clippy-monitor: {exc}\n", status=400, mimetype="text/plain")
        return None

    app.server.before_request(check)


# ------------------------------------------------------------------------ wiring


def _guarded(fn, fallback):
    """Run ``fn``; an unexpected exception is logged and shown via ``fallback(message)``."""

    def run(*args):
        try:
            return fn(*args)
        except PreventUpdate:
            raise
        except Exception as exc:  # noqa: BLE001 -- a page must never be left without an answer
            _log.exception("dash callback failed")
            return fallback(
                f"Internal error ({type(exc).__name__}: {_message(exc)}); see the server log."
            )

    return run


def register_callbacks(app: dash.Dash, catalog: D.Catalog) -> None:
    """Wire the ``render_*`` functions to the components of ``layout.build_layout``;
    forged callback requests are refused first (:func:`refuse_forged_requests`)."""
    refuse_forged_requests(app)
    _register_runs(app, catalog)
    _register_live(app, catalog)
    _register_replay(app, catalog)
    _register_postmortem(app, catalog)
    _register_compare(app, catalog)


def _register_runs(app: dash.Dash, catalog: D.Catalog) -> None:
    """The run list, the Compare choices, and which view is shown."""

    @app.callback(
        Output("run-list", "options"),
        Output("run-list", "value"),
        Output("compare-runs", "options"),
        Output("compare-runs", "value"),
        Output("runs-note", "children"),
        Input("runs-interval", "n_intervals"),
        Input("live-shown", "data"),  # the selected run's entry follows the Live view at once
        State("run-list", "value"),
        State("compare-runs", "value"),
        State("compare-runs", "options"),
    )
    def _runs(_n, _shown, current, compare_value, compare_options):
        r = render_runs(catalog, current, compare_value, compare_options)
        return r["options"], r["value"], r["compare_options"], r["compare_value"], r["note"]

    @app.callback(
        Output("live-view", "style"),
        Output("replay-view", "style"),
        Output("compare-view", "style"),
        Input("view", "value"),
    )
    def _views(view):
        return tuple({"display": "block" if view == v else "none"} for v, _ in L.VIEWS)


def _register_live(app: dash.Dash, catalog: D.Catalog) -> None:
    """The Live view: loss, lowest factors, health badge, factor table, alerts."""

    live_outputs = ("loss", "factors", "badge", "badge_class", "steps", "table", "alert", "shown")

    def _live_fallback(message):
        r = _live_error("?", message, None)
        return tuple(r[k] for k in live_outputs)

    def _live(_n, run, shown):
        r = render_live(catalog, run, shown)
        if r is None:
            raise PreventUpdate
        return tuple(r[k] for k in live_outputs)

    app.callback(
        Output("live-loss", "figure"),
        Output("live-factors", "figure"),
        Output("live-badge", "children"),
        Output("live-badge", "className"),
        Output("live-steps", "children"),
        Output("live-factor-table", "children"),
        Output("live-alert", "children"),
        Output("live-shown", "data"),
        Input("live-interval", "n_intervals"),
        Input("run-list", "value"),
        State("live-shown", "data"),
    )(_guarded(_live, _live_fallback))


def _register_replay(app: dash.Dash, catalog: D.Catalog) -> None:
    """The Replay view: episode choice, then its controls and figures."""

    def _episodes(run, _shown, current):
        r = render_episodes(catalog, run, current, run_changed=ctx.triggered_id != "live-shown")
        return r["options"], r["value"], r["alert"]

    app.callback(
        Output("replay-episode", "options"),
        Output("replay-episode", "value"),
        Output("replay-alert", "children", allow_duplicate=True),
        Input("run-list", "value"),
        Input("live-shown", "data"),
        State("replay-episode", "value"),
        prevent_initial_call="initial_duplicate",
    )(_guarded(_episodes, lambda m: ([], None, L.error_alert(m))))
    _register_replay_controls(app, catalog)
    _register_replay_figures(app, catalog)


def _register_replay_controls(app: dash.Dash, catalog: D.Catalog) -> None:
    """The Replay view's slider, play button and interval."""

    @app.callback(
        Output("replay-slider", "min"),
        Output("replay-slider", "max"),
        Output("replay-slider", "marks"),
        Output("replay-slider", "value"),
        Output("replay-interval", "disabled"),
        Output("replay-play", "children"),
        Input("replay-episode", "value"),
        Input("replay-play", "n_clicks"),
        Input("replay-interval", "n_intervals"),
        Input("run-list", "value"),
        State("replay-slider", "value"),
        State("replay-interval", "disabled"),
    )
    def _controls(key, _clicks, _ticks, run, value, disabled):
        r = render_replay_controls(catalog, run, key, ctx.triggered_id, value, playing=not disabled)
        return r["min"], r["max"], r["marks"], r["value"], r["disabled"], r["label"]


def _register_replay_figures(app: dash.Dash, catalog: D.Catalog) -> None:
    """The Replay view's figures at the slider's step."""
    replay_outputs = ("loss", "bars", "factors", "label", "alert", *NO_SHARPNESS)

    def _replay(step, run, key):
        r = render_replay(catalog, run, key, step)
        return tuple(r[k] for k in replay_outputs)

    def _replay_fallback(message):
        hidden = tuple(NO_SHARPNESS.values())
        return (
            D.empty_figure(message, 270),
            NO_UPDATE,
            NO_UPDATE,
            "",
            L.error_alert(message),
            *hidden,
        )

    app.callback(
        Output("replay-loss", "figure"),
        Output("replay-bars", "figure"),
        Output("replay-factors", "figure"),
        Output("replay-step", "children"),
        Output("replay-alert", "children", allow_duplicate=True),
        Output("replay-sharpness", "figure"),
        Output("replay-sharpness-panel", "style"),
        Output("replay-sharpness-note", "children"),
        Input("replay-slider", "value"),
        State("run-list", "value"),
        State("replay-episode", "value"),
        prevent_initial_call=True,
    )(_guarded(_replay, _replay_fallback))


def _register_postmortem(app: dash.Dash, catalog: D.Catalog) -> None:
    """Beside the replay: the post-mortem summary and the paper's Figure 4b for one layer."""

    def _summary(key, run, layer):
        r = render_summary(catalog, run, key, layer)
        return r["summary"], r["layers"], r["layer"]

    app.callback(
        Output("replay-summary", "children"),
        Output("replay-layer", "options"),
        Output("replay-layer", "value"),
        Input("replay-episode", "value"),
        Input("run-list", "value"),
        State("replay-layer", "value"),
    )(_guarded(_summary, lambda m: (L.error_alert(m), [], None)))

    app.callback(
        Output("replay-fig4", "figure"),
        Input("replay-layer", "value"),
        Input("replay-episode", "value"),
        Input("run-list", "value"),
    )(
        _guarded(
            lambda layer, key, run: render_figure4(catalog, run, key, layer),
            lambda m: D.empty_figure(m, 330),
        )
    )


def _register_compare(app: dash.Dash, catalog: D.Catalog) -> None:
    """The Compare view: runs side by side and their table."""

    def _compare(names, _n, shown):
        r = render_compare(catalog, names, shown)
        if r is None:
            raise PreventUpdate
        return r["figure"], r["table"], r["alert"], r["shown"], r["replays"]

    app.callback(
        Output("compare-graph", "figure"),
        Output("compare-table", "children"),
        Output("compare-alert", "children"),
        Output("compare-shown", "data"),
        Output("compare-replays", "children"),
        Input("compare-runs", "value"),
        Input("runs-interval", "n_intervals"),
        State("compare-shown", "data"),
    )(_guarded(_compare, lambda m: (D.empty_figure(m, 620), None, L.error_alert(m), None, [])))
