"""What the Dash app shows, as plain data: run catalog, live run state, figures and tables.

Nothing here imports Dash or TensorFlow; figures are plain plotly dicts (cheap
to build, easy to assert on), so the tests call these functions directly.

* :class:`Catalog` -- the runs under the served directory.  A run is named by
  its path relative to that directory; :meth:`Catalog.resolve` refuses any name
  that leaves it (``..``, an absolute path, a symlink pointing outside: real
  paths are resolved and checked for containment).  Callbacks hold a run with
  :meth:`Catalog.open`; aliases of a run share one :class:`LiveRun`, and at most
  ``max_open`` are kept (the least recently used is closed).
* :class:`LiveRun` -- a run followed live, a :class:`~clippy_monitor.record.LiveRecord`:
  each :meth:`LiveRun.refresh` reads only the bytes appended since the last
  one (three ``stat`` calls when nothing changed) and keeps per-step derived
  arrays (the lowest factor per rule and its layer) up to date incrementally.
  A deleted or corrupted run raises :class:`~clippy_monitor.record.RecordError`.
* ``*_figure`` / ``*_table`` functions -- Live, Replay and Compare views.
  Line plots go through :func:`clippy_monitor.display.minmax_envelope`, so a
  one-step spike survives any downsampling.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import math
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clippy_monitor import catalog as vocab  # the metric vocabulary (Catalog: the runs)
from clippy_monitor.display import minmax_envelope
from clippy_monitor.episodes import Event, events_of, open_episode, read_episodes
from clippy_monitor.record import LiveRecord, RecordError, RunRefused, confined_run, load_run
from clippy_monitor.record.paths import run_name, served_runs
from clippy_monitor.record.format import EVENTS_FILE, FACTOR_METRICS, META_FILE, RECORD_FILE, optimizer_name
from clippy_monitor.record.format import METRIC_LABELS  # noqa: F401  (re-exported for the readers)
from clippy_monitor.record.status import ABNORMAL, DIVERGED, HEALTHY, decode_status

# ----------------------------------------------------------------------------- names

# Rules, metrics and moments are the catalog's (clippy_monitor.catalog), as in every reader.
RULES = vocab.RULE_NAMES
RULE_LABELS = vocab.RULE_LABELS
MEASUREMENTS = vocab.measurements()
SHOWN_RULES = vocab.figure_4b_rules()  # the paper's Figure 4b (right)
METRIC_COLORS = {m.name: m.color for m in vocab.METRICS if m.color}
RULE_COLORS = vocab.RULE_COLORS
NEUTRAL_COLOR = "#6b7280"  # a metric the catalog gives no colour
TASK_COLORS = ["#2563eb", "#db2777", "#059669", "#d97706", "#7c3aed", "#0891b2", "#65a30d", "#be123c"]
LOSS_COLOR = "#111827"
MOMENT_COLORS = vocab.MOMENT_COLORS
MOMENT_LABELS = vocab.MOMENT_LABELS
RECOVERED_COLOR = vocab.RECOVERED.color

DEFAULT_MAX_POINTS = 2000  # per line series, min/max envelope
MAX_OPEN_RUNS = 16  # LiveRuns a Catalog keeps open; beyond it the least recently used is closed
MAX_SHAPES = 60  # event markers drawn on a plot (the most recent ones)


# --------------------------------------------------------------------------- catalog


#: What reading a run can raise; the views show it as a message.
READ_ERRORS = (RecordError, OSError, KeyError, ValueError)


@dataclass(eq=False)
class _Opened:
    """A :class:`LiveRun` held by a :class:`Catalog`, and how many callbacks use it now."""

    live: LiveRun
    users: int = 0
    dropped: bool = False  # out of the catalog: closed once its last user is done


class Catalog:
    """The runs under ``logdir`` and a :class:`LiveRun` per opened run.

    Only directories inside ``logdir`` (after resolving symlinks) are served.
    The directory is re-scanned for new runs at most every ``scan_ttl`` seconds.
    Open runs are keyed by their real directory, so every alias of a run
    (``big``, ``./big``, a link inside ``logdir``) shares one :class:`LiveRun`;
    at most ``max_open`` are kept, and the least recently used one is closed
    (its memory maps released) as soon as no callback is using it.
    Thread-safe (Dash serves callbacks from several threads).
    """

    def __init__(self, logdir: str | os.PathLike, scan_ttl: float = 2.0, max_open: int = MAX_OPEN_RUNS):
        given = Path(logdir).expanduser()
        if not given.is_dir():
            raise RecordError(f"{given}: no such directory")
        if isinstance(max_open, bool) or not isinstance(max_open, int) or max_open < 1:
            raise ValueError(f"max_open must be a positive integer, got {max_open!r}")
        self.logdir = given
        self.root = Path(os.path.realpath(given))
        self.scan_ttl = scan_ttl
        self.max_open = max_open
        self._lock = threading.Lock()
        self._names: list[str] = []
        self._scanned_at = -math.inf
        self._live: collections.OrderedDict[Path, _Opened] = collections.OrderedDict()  # least recently used first
        self._events_cache: dict[Path, tuple[tuple, list[dict]]] = {}

    # -- names ----------------------------------------------------------------------

    def run_names(self, force: bool = False) -> list[str]:
        """Relative names of the runs under the directory ("." for the directory itself)."""
        with self._lock:
            if force or time.monotonic() - self._scanned_at >= self.scan_ttl:
                self._names = list(served_runs(self.root))  # the rule shared with the TensorBoard tab
                self._scanned_at = time.monotonic()
            return list(self._names)

    def resolve(self, name: Any) -> Path:
        """The real directory of run ``name``; :class:`RunRefused` if it leaves the served directory.

        :class:`RecordError` if it holds no record (never existed, deleted, moved).
        """
        real = confined_run(self.root, name)  # the rule shared with the TensorBoard tab
        if not (real / META_FILE).is_file():
            raise RecordError(f"run {name!r}: no record in {real} (deleted or moved?)")
        return real

    def _name_of(self, path: Path) -> str:
        """The name of the run in ``path`` (a real directory under the root)."""
        return run_name(self.root, path)

    # -- runs -----------------------------------------------------------------------

    @contextlib.contextmanager
    def open(self, name: Any) -> Iterator[LiveRun]:
        """The refreshed :class:`LiveRun` of ``name``, locked and kept open for the ``with`` block.

        Reads only what was appended since the last refresh.  :class:`RunRefused`
        or :class:`RecordError` if ``name`` is not a readable run.
        """
        with self._held(self.resolve(name)) as live:
            yield live

    def live(self, name: Any) -> LiveRun:
        """The refreshed :class:`LiveRun` of ``name``, not held: for scripts and tests.

        The catalog may close it once more than ``max_open`` other runs were opened;
        callbacks use :meth:`open` instead.
        """
        with self.open(name) as live:
            return live

    @contextlib.contextmanager
    def open_many(self, names: Sequence[Any]) -> Iterator[tuple[list[LiveRun], list[tuple[Any, Exception]]]]:
        """``(runs, failures)``: the refreshed LiveRuns of ``names`` (each run once, in the
        order given), all held for the ``with`` block, and ``(name, error)`` for the others.

        Locks are taken in the order of the runs' paths, so two callbacks that
        show the same runs cannot wait for each other.
        """
        paths: dict[Path, Any] = {}
        failures: list[tuple[Any, Exception]] = []
        for name in names:
            try:
                paths.setdefault(self.resolve(name), name)
            except READ_ERRORS as exc:
                failures.append((name, exc))
        with contextlib.ExitStack() as stack:
            held: dict[Path, LiveRun] = {}
            for path in sorted(paths):
                try:
                    held[path] = stack.enter_context(self._held(path))
                except READ_ERRORS as exc:
                    failures.append((paths[path], exc))
            yield [held[p] for p in paths if p in held], failures

    @contextlib.contextmanager
    def peek(self, name: Any) -> Iterator[LiveRun | None]:
        """The LiveRun of ``name`` if it is open (not refreshed), held as by :meth:`open`; else None."""
        try:
            path = self.resolve(name)
        except READ_ERRORS:
            path = None
        with self._lock:
            entry = self._live.get(path) if path is not None else None
            if entry is not None:
                entry.users += 1
        if entry is None:
            yield None
            return
        try:
            with entry.live.lock:
                yield entry.live
        finally:
            self._release(entry)

    def opened(self, name: Any) -> LiveRun | None:
        """The LiveRun of ``name`` if it is open (not refreshed, not held)."""
        with self.peek(name) as live:
            return live

    @property
    def open_runs(self) -> list[str]:
        """Names of the runs held open, least recently used first."""
        with self._lock:
            return [entry.live.name for entry in self._live.values()]

    @contextlib.contextmanager
    def _held(self, path: Path) -> Iterator[LiveRun]:
        entry = self._acquire(path)
        try:
            with entry.live.lock:
                try:
                    entry.live.refresh()
                except Exception:
                    self._drop(path, entry)  # start afresh if the run comes back
                    raise
                yield entry.live
        finally:
            self._release(entry)

    def _acquire(self, path: Path) -> _Opened:
        """The entry of ``path`` (created if needed), most recently used, with one more user;
        closes the least recently used entries beyond ``max_open`` that no one uses."""
        idle = []
        with self._lock:
            entry = self._live.get(path)
            if entry is None:
                entry = self._live[path] = _Opened(LiveRun(self._name_of(path), path))
            self._live.move_to_end(path)
            entry.users += 1
            while len(self._live) > self.max_open:
                _, old = self._live.popitem(last=False)
                old.dropped = True
                if not old.users:
                    idle.append(old.live)
        for live in idle:
            live.close()
        return entry

    def _drop(self, path: Path, entry: _Opened) -> None:
        with self._lock:
            if self._live.get(path) is entry:
                del self._live[path]
            entry.dropped = True

    def _release(self, entry: _Opened) -> None:
        with self._lock:
            entry.users -= 1
            done = entry.dropped and not entry.users
        if done:
            entry.live.close()

    def recorded_events(self, name: str) -> list[dict]:
        """The events file of ``name`` (cheap: no record is read); [] if unreadable."""
        try:
            real = self.resolve(name)
            path = real / EVENTS_FILE
            st = os.stat(path)
        except (RecordError, OSError):
            return []
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        cached = self._events_cache.get(real)
        if cached and cached[0] == key:
            return cached[1]
        events = []
        try:
            for line in path.read_bytes().split(b"\n"):
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict):
                    events.append(event)
        except OSError:
            return []
        self._events_cache[real] = (key, events)
        return events


# -------------------------------------------------------------------------- live run


class LiveRun(LiveRecord):
    """Run ``name`` of the served directory, followed live; every step is kept (display downsamples).

    A :class:`~clippy_monitor.record.LiveRecord` (``steps``, ``events``,
    ``skipped``, :meth:`series`, :meth:`layer_rows`, ``version``,
    ``last_delta_rows``, ``reloads``) with the lowest factor per rule
    (:meth:`min_factor`).  :meth:`cached` keeps one result: the replay window.
    """

    _CACHE_SIZE = 1  # one window per run is enough (the one being replayed)
    _OPENINGS = itertools.count(1)

    def __init__(self, name: str, path: str | os.PathLike) -> None:
        super().__init__(path, name=name)
        self._opening = next(self._OPENINGS)

    @property
    def revision(self) -> str:
        """Changes whenever what the views show may change, also when the run was closed and reopened."""
        return f"{self._opening}.{self.version}"

    @property
    def rules(self) -> list[str]:
        return [r for r in RULES if FACTOR_METRICS[r] in self.layer_metrics]

    def min_factor(self, rule: str) -> tuple[np.ndarray, np.ndarray]:
        """``(lowest factor over layers, index of that layer)`` per step; the layer is -1 if all NaN."""
        if rule not in self.rules:
            raise self._missing("factor rule", rule)
        return self.per_row(("min_factor", rule), lambda run: _min_and_argmin(run.factor(rule)))


def _min_and_argmin(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the minimum ignoring NaN (NaN if all NaN) and its column (-1 if all NaN)."""
    if values.shape[1] == 0:
        return np.full(len(values), np.nan, np.float32), np.full(len(values), -1, np.int32)
    nan = np.isnan(values)
    where = np.argmin(np.where(nan, np.inf, values), axis=1).astype(np.int32)
    all_nan = nan.all(axis=1)
    where[all_nan] = -1
    low = np.fmin.reduce(values, axis=1).astype(np.float32)
    return low, where


# ------------------------------------------------------------------- health & events


def health(live: LiveRun) -> dict:
    """The detector state of the last recorded step, for the health badge.

    ``{"state": "waiting" | "healthy" | "micro" | "diverged" | "unknown", "title", "detail", "step"}``.
    """
    if not len(live):
        return {"state": "waiting", "title": "Waiting for data", "detail": "no step recorded yet", "step": None}
    last = int(live.steps[-1])
    recorded = events_of(live)
    full = next((e for e in recorded if e.kind == "full"), None)
    if not live.has_series("detector/status"):
        if full is not None:
            return {"state": "diverged", "title": "Fully diverged", "detail": f"at step {_fmt_step(full.step_c)}", "step": last}
        return {"state": "unknown", "title": "No detector", "detail": "this record has no detector/status series", "step": last}
    status = live.series("detector/status")
    code, reason = decode_status(status[-1])
    if code == HEALTHY:
        micro = sum(1 for e in recorded if e.kind == "micro")
        detail = f"{micro} micro-divergence{'s' if micro != 1 else ''} recovered so far" if micro else "no divergence detected"
        return {"state": "healthy", "title": "Healthy", "detail": detail, "step": last}
    if code == ABNORMAL:
        episode = open_episode(live)
        task = f" · task {_task(episode.series)}" if episode is not None and episode.series else ""
        return {
            "state": "micro",
            "title": "Micro-divergence in progress",
            "detail": f"loss rising since step {_fmt_step(episode.step_b if episode else None)}{task}",
            "step": last,
        }
    diverged = np.flatnonzero(status >= DIVERGED - 1e-3)
    step_c = int(live.steps[diverged[0]]) if diverged.size else last
    if full is not None and full.step_c is not None:
        step_c = full.step_c
        reason = full.reason or reason
    return {
        "state": "diverged",
        "title": "Fully diverged",
        "detail": f"since step {step_c:,} · {(reason or 'no_recovery').replace('_', ' ')}",
        "step": last,
    }


def _task(series: Any) -> str:
    text = str(series)
    return text[len("loss/") :] if text.startswith("loss/") else text


def _fmt_step(step: Any) -> str:
    return f"{int(step):,}" if isinstance(step, (int, float)) and math.isfinite(step) else "?"


#: Dash lists episodes most severe first: full divergences, the open one, micro-divergences.
_EPISODE_ORDER = {"full": 0, "open": 1, "micro": 2}


def episodes(live: LiveRun) -> list[dict]:
    """Divergence episodes to replay (:func:`clippy_monitor.episodes.read_episodes`): the
    recorded events, an episode still open at the last step, a full divergence seen only in
    the detector series.

    Each: the record's event dict (``"task"``: the loss series, e.g. ``"loss/click"``) plus
    ``"key"`` and ``"label"``: full divergences, the open episode, then micro-divergences,
    each latest first.
    """
    shown = [e for e in read_episodes(live) if e.kind in _EPISODE_ORDER and e.step_b is not None]
    shown.sort(key=lambda e: (_EPISODE_ORDER[e.kind], -e.step_b))
    out = []
    for e in shown:
        episode = {**e.to_record(), "key": f"{e.kind}:{e.step_b}"}
        out.append({**episode, "label": episode_label(episode)})
    return out


def episode_label(e: dict) -> str:
    task = f" ({_task(e['task'])})" if e.get("task") else ""
    if e["kind"] == "full":
        return f"Full divergence{task}: step-a {_fmt_step(e.get('step_a'))} → step-b {_fmt_step(e['step_b'])} → step-c {_fmt_step(e.get('step_c'))}"
    if e["kind"] == "micro":
        return f"Micro-divergence{task}: step-b {_fmt_step(e['step_b'])}, recovered at {_fmt_step(e.get('recovered'))}"
    return f"In progress{task}: step-b {_fmt_step(e['step_b'])}, not recovered yet"


def alerts(live: LiveRun, max_events: int = 3) -> list[dict]:
    """Alerts for the page, most severe first: ``{"level": "danger" | "warning", "text"}``."""
    out = []
    eps = episodes(live)
    for e in [e for e in eps if e["kind"] == "full"][:1]:
        task = f" in task {_task(e['task'])}" if e.get("task") else ""
        reason = f" ({str(e['reason']).replace('_', ' ')})" if e.get("reason") else ""
        out.append(
            {
                "level": "danger",
                "text": f"Full divergence detected{task}: healthy until step-a {_fmt_step(e.get('step_a'))}, "
                f"loss rising from step-b {_fmt_step(e['step_b'])}, fully diverged at step-c "
                f"{_fmt_step(e.get('step_c'))}{reason}. Open Replay to see why.",
            }
        )
    for e in [e for e in eps if e["kind"] == "open"]:
        task = f" in task {_task(e['task'])}" if e.get("task") else ""
        out.append(
            {
                "level": "warning",
                "text": f"Micro-divergence in progress{task}: the loss has been above its baseline since step {_fmt_step(e['step_b'])}.",
            }
        )
    micro = sorted((e for e in eps if e["kind"] == "micro"), key=lambda e: -e["step_b"])
    for e in micro[:max_events]:
        task = f" in task {_task(e['task'])}" if e.get("task") else ""
        out.append(
            {
                "level": "warning",
                "text": f"Micro-divergence detected{task} at step {_fmt_step(e['step_b'])}; recovered at step {_fmt_step(e.get('recovered'))}.",
            }
        )
    if len(micro) > max_events:
        out.append({"level": "warning", "text": f"… and {len(micro) - max_events} earlier micro-divergences."})
    if live.reloads:
        out.append({"level": "warning", "text": "The record shrank or was replaced while displayed; it was read again from the start."})
    if live.skipped:
        more = f" (+{len(live.skipped) - 1} more)" if len(live.skipped) > 1 else ""
        out.append({"level": "warning", "text": f"Damaged bytes skipped while reading: {live.skipped[-1]}{more}"})
    return out


def lowest_factors(live: LiveRun) -> list[dict]:
    """Per rule: the lowest factor over layers at the last step, and over the whole run.

    ``{"rule", "label", "now", "now_layer", "low", "low_step", "low_layer"}`` (None where unknown).
    """
    rows = []
    for rule in live.rules:
        low, where = live.min_factor(rule)
        entry = {"rule": rule, "label": RULE_LABELS[rule], "now": None, "now_layer": None, "low": None, "low_step": None, "low_layer": None}
        if len(low):
            if math.isfinite(low[-1]):
                entry["now"] = float(low[-1])
                entry["now_layer"] = live.layers[int(where[-1])] if low[-1] < 1 else None  # 1: no layer clipped
            if np.isfinite(low).any():
                i = int(np.nanargmin(low))
                layer = live.layers[int(where[i])] if low[i] < 1 else None
                entry.update(low=float(low[i]), low_step=int(live.steps[i]), low_layer=layer)
        rows.append(entry)
    return rows


WRITING_S = 60  # a record appended to within this many seconds is shown as being written


def run_entry(catalog: Catalog, name: str) -> dict:
    """A line of the run list, cheap: the run's state if it was opened, else its events file."""
    entry = _run_state(catalog, name)
    try:
        age = time.time() - os.stat(catalog.root / name / RECORD_FILE).st_mtime
    except OSError:
        age = math.inf
    if age < WRITING_S:
        entry["detail"] = f"writing · {entry['detail']}"
    return entry


def _run_state(catalog: Catalog, name: str) -> dict:
    with catalog.peek(name) as live:
        if live is not None and len(live):
            h = health(live)
            return {"name": name, "state": h["state"], "detail": f"{h['title']} · {len(live):,} steps"}
    events = catalog.recorded_events(name)
    if any(e.get("kind") == "full" for e in events):
        return {"name": name, "state": "diverged", "detail": "full divergence recorded"}
    micro = sum(1 for e in events if e.get("kind") == "micro")
    if micro:
        return {"name": name, "state": "micro-done", "detail": f"{micro} micro-divergence{'s' if micro > 1 else ''}"}
    return {"name": name, "state": "unknown", "detail": "no divergence recorded"}


# ---------------------------------------------------------------------- figure bits


def _axis(**kw) -> dict:
    base = {"gridcolor": "#e5e7eb", "zeroline": False, "showline": True, "linecolor": "#9ca3af", "ticks": "outside", "tickcolor": "#9ca3af"}
    base.update(kw)
    return base


def _layout(height: int, title: str | None = None, **kw) -> dict:
    layout = {
        "height": height,
        "margin": {"l": 64, "r": 16, "t": 40 if title else 16, "b": 44},
        "paper_bgcolor": "#ffffff",
        "plot_bgcolor": "#ffffff",
        "font": {"family": "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif", "size": 12, "color": "#1f2937"},
        "legend": {"orientation": "h", "x": 1, "xanchor": "right", "y": 1.0, "yanchor": "bottom", "font": {"size": 11}},
        "hoverlabel": {"namelength": -1},
        "xaxis": _axis(),
        "yaxis": _axis(),
    }
    if title:
        layout["title"] = {"text": title, "x": 0.01, "xanchor": "left", "y": 0.98, "yanchor": "top", "font": {"size": 14}}
    layout.update(kw)
    return layout


def empty_figure(message: str, height: int = 300) -> dict:
    """A blank figure showing ``message`` (errors, no data yet)."""
    layout = _layout(height)
    layout["xaxis"] = {"visible": False}
    layout["yaxis"] = {"visible": False}
    layout["annotations"] = [{"text": message, "showarrow": False, "xref": "paper", "yref": "paper", "x": 0.5, "y": 0.5, "font": {"size": 14, "color": "#6b7280"}}]
    return {"data": [], "layout": layout}


def _nullable(values: np.ndarray) -> list:
    """Values as a list with None (a gap) where not finite."""
    values = np.asarray(values, np.float64)
    finite = np.isfinite(values)
    if finite.all():
        return values.tolist()
    out = values.astype(object)
    out[~finite] = None
    return out.tolist()


def _line(steps: np.ndarray, values: np.ndarray, max_points: int, **trace) -> dict:
    xs, ys = minmax_envelope(steps, values, max_points)
    return {"type": "scattergl" if len(xs) > 5000 else "scatter", "mode": "lines", "x": xs.tolist(), "y": _nullable(ys), **trace}


def event_shapes(eps: list[dict], xref: str = "x", yref: str = "paper") -> list:
    """Shapes marking episodes on a whole-run plot: a micro-divergence shaded amber from
    step-b to its recovery; a full divergence shaded red from step-b to step-c, a line at step-c."""
    shapes = []
    for e in eps[-MAX_SHAPES:]:
        if e["kind"] == "micro":
            end = e.get("recovered") or e["step_b"]
            shapes.append({"type": "rect", "xref": xref, "yref": yref, "x0": e["step_b"], "x1": end, "y0": 0, "y1": 1, "fillcolor": "#f59e0b", "opacity": 0.2, "line": {"width": 0}, "layer": "below"})
            continue
        end = e.get("step_c")
        if end is not None:
            shapes.append({"type": "rect", "xref": xref, "yref": yref, "x0": e["step_b"], "x1": end, "y0": 0, "y1": 1, "fillcolor": "#ef4444", "opacity": 0.15, "line": {"width": 0}, "layer": "below"})
        x = end if end is not None else e["step_b"]
        shapes.append({"type": "line", "xref": xref, "yref": yref, "x0": x, "x1": x, "y0": 0, "y1": 1, "line": {"color": MOMENT_COLORS["step_c"], "width": 1.2, "dash": "dash"}})
    return shapes


# ------------------------------------------------------------------------ live view


def live_loss_figure(live: LiveRun, max_points: int = DEFAULT_MAX_POINTS) -> dict:
    """Total loss and task losses over the whole run (min/max envelope), episodes marked."""
    if not len(live):
        return empty_figure("Waiting for the first flush…", 340)
    data = []
    for i, name in enumerate(live.loss_series):
        color = LOSS_COLOR if name == "loss" else TASK_COLORS[(i - 1) % len(TASK_COLORS)]
        label = "total loss" if name == "loss" else _task(name)
        data.append(_line(live.steps, live.series(name), max_points, name=label, line={"color": color, "width": 1.6 if name == "loss" else 1.1}))
    layout = _layout(340, "Loss (shaded amber: micro-divergence; red: step-b → step-c)", shapes=event_shapes(episodes(live)), uirevision=live.name)
    layout["xaxis"] = _axis(title={"text": "step"})
    layout["yaxis"] = _axis(title={"text": "loss"})
    return {"data": data, "layout": layout}


def live_factor_figure(live: LiveRun, max_points: int = DEFAULT_MAX_POINTS) -> dict:
    """Per rule, the lowest factor over layers at every step (log scale; 1 = no clipping)."""
    if not len(live) or not live.rules:
        return empty_figure("No clipping factors recorded" if len(live) else "Waiting for the first flush…", 300)
    data = []
    for rule in live.rules:
        low, where = live.min_factor(rule)
        data.append(
            _line(
                live.steps,
                low,
                max_points,
                name=f"min σ {RULE_LABELS[rule]}",
                line={"color": RULE_COLORS[rule], "width": 1.2, "dash": "dot" if rule == "applied" else "solid"},
            )
        )
    layout = _layout(300, "Lowest clipping factor over layers (1 = no clipping)", shapes=event_shapes(episodes(live)), uirevision=live.name)
    layout["xaxis"] = _axis(title={"text": "step"})
    layout["yaxis"] = _axis(type="log", title={"text": "σ (log)"}, exponentformat="power")
    return {"data": data, "layout": layout}


def live_summary(live: LiveRun) -> dict:
    """Step count and what the last refresh read, for the status line."""
    return {
        "steps": len(live),
        "first_step": int(live.steps[0]) if len(live) else None,
        "last_step": int(live.steps[-1]) if len(live) else None,
        "layers": len(live.layers),
        "new_rows": live.last_delta_rows,
        "optimizer": optimizer_name(live.meta.get("optimizer")),
    }


# ---------------------------------------------------------------------- replay view


@dataclass
class ReplayWindow:
    """The rows around one episode, with every statistic the replay shows at each step."""

    episode: dict
    start: int  # first step of the window
    end: int  # last step of the window
    steps: np.ndarray
    losses: dict[str, np.ndarray]
    layers: list[str]
    metrics: dict[str, np.ndarray] = field(default_factory=dict)  # metric -> [rows, layers]
    norm_range: list[float] | None = None  # log10 y-range of the measurements
    factor_range: list[float] | None = None  # log10 y-range of the factors

    def row(self, step: int) -> int:
        return max(int(np.searchsorted(self.steps, step, side="right")) - 1, 0)

    def moments(self) -> dict[str, int | None]:
        e = self.episode
        end = e.get("step_c") if e["kind"] == "full" else (e.get("recovered") if e["kind"] == "micro" else None)
        return {"step_a": e.get("step_a"), "step_b": e["step_b"], "step_c": end}


def replay_window(live: LiveRun, episode: dict, pad: int | None = None) -> ReplayWindow:
    """The window ``[step-a - pad, step-c + pad]`` (step-c: full divergence; recovery: micro;
    the last step: still open), ``pad`` = half the a..c span, at least 10 steps.  Cached per version."""
    if not len(live):
        raise KeyError(f"run {live.name!r} has no steps")
    b = int(episode["step_b"])
    a = episode.get("step_a") if episode.get("step_a") is not None else b - 1
    end = episode.get("step_c") or episode.get("recovered") or int(live.steps[-1])
    pad = max(10, (int(end) - int(a)) // 2) if pad is None else pad
    first, last = int(live.steps[0]), int(live.steps[-1])
    start, stop = max(first, int(a) - pad), min(last, int(end) + pad)
    return live.cached(("replay", start, stop, episode.get("key")), lambda: _replay_window(live, episode, start, stop))


def _replay_window(live: LiveRun, episode: dict, start: int, stop: int) -> ReplayWindow:
    """The replay window of steps ``[start, stop]`` (run by ``live.cached``, which holds ``live.lock``)."""
    i0 = int(np.searchsorted(live.steps, start, side="left"))
    i1 = int(np.searchsorted(live.steps, stop, side="right"))
    if i1 <= i0:
        raise KeyError(f"run {live.name!r} has no steps between {start} and {stop}")
    window = ReplayWindow(
        episode=episode,
        start=int(live.steps[i0]),
        end=int(live.steps[i1 - 1]),
        steps=live.steps[i0:i1].copy(),
        losses={n: live.series(n)[i0:i1].copy() for n in live.loss_series},
        layers=list(live.layers),
    )
    bars = [m.name for m in bar_metrics()]
    for metric in (*bars, *(FACTOR_METRICS[r] for r in SHOWN_RULES)):
        if metric in live.layer_metrics:
            window.metrics[metric] = live.layer_rows(metric, i0, i1)
    window.norm_range = _log_range([window.metrics[m] for m in bars if m in window.metrics])
    factors = [window.metrics[FACTOR_METRICS[r]] for r in SHOWN_RULES if FACTOR_METRICS[r] in window.metrics]
    low = _log_range(factors)
    window.factor_range = [min(low[0], -1.2) if low else -1.2, math.log10(1.8)]
    return window


def bar_metrics() -> list[vocab.Metric]:
    """What the replay draws per layer as bars on a log scale: the catalog's shown
    measurements and norms (‖g‖₂, ‖g‖₂/‖w‖₂, ‖r/w‖∞), in catalog order."""
    return [m for m in vocab.metrics() if m.shown and m.kind in ("measurement", "norm")]


def _log_range(arrays: list[np.ndarray]) -> list[float] | None:
    """log10 ``[low, high]`` around the finite positive values of ``arrays``, padded."""
    lows, highs = [], []
    for values in arrays:
        positive = values[np.isfinite(values) & (values > 0)]
        if positive.size:
            lows.append(float(positive.min()))
            highs.append(float(positive.max()))
    if not lows:
        return None
    lo, hi = math.log10(min(lows)), math.log10(max(highs))
    pad = 0.08 * max(hi - lo, 1.0)
    return [lo - pad, hi + pad]


def short_layer_names(layers: list[str]) -> list[str]:
    """Layer names without the path prefix that every layer shares (for axis labels)."""
    parts = [name.split("/") for name in layers]
    if len(parts) < 2:
        return list(layers)
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    return ["/".join(p[common:]) for p in parts]


def _tick_angle(names: list[str]) -> int:
    """Slanted layer labels once they would collide (about 8 px per character)."""
    widest = max((len(n) for n in names), default=0)
    return 0 if widest * 8 * len(names) < 900 else -30


def _moment_at(window: ReplayWindow, step: int) -> str | None:
    for moment, s in window.moments().items():
        if s is not None and s == step:
            return MOMENT_LABELS[moment] if moment != "step_c" or window.episode["kind"] == "full" else "recovered"
    return None


def replay_step_label(window: ReplayWindow, step: int) -> str:
    row = window.row(step)
    at = int(window.steps[row])
    moment = _moment_at(window, at)
    m = window.moments()
    phase = ""
    if moment:
        phase = f" — {moment}"
    elif m["step_a"] is not None and at < m["step_b"]:
        phase = " — healthy (before step-b)"
    elif m["step_c"] is not None and at > m["step_c"]:
        phase = " — after step-c" if window.episode["kind"] == "full" else " — recovered"
    else:
        phase = " — between step-b and step-c" if window.episode["kind"] == "full" else " — loss above baseline"
    return f"Step {at:,}{phase}"


def moment_shapes(window: ReplayWindow, xref: str = "x") -> tuple[list, list]:
    """step-a/b/c (or the recovery of a micro-divergence) as labelled vertical lines."""
    shapes, annotations = [], []
    full = window.episode["kind"] == "full"
    for moment, x in window.moments().items():
        if x is None:
            continue
        label = MOMENT_LABELS[moment] if moment != "step_c" or full else "recovered"
        color = MOMENT_COLORS[moment] if moment != "step_c" or full else RECOVERED_COLOR
        shapes.append({"type": "line", "xref": xref, "yref": "paper", "x0": x, "x1": x, "y0": 0, "y1": 1, "line": {"color": color, "width": 1.5, "dash": "dot" if moment == "step_a" else "dash"}})
        # step-a is usually the step just before step-b: its label goes left of its line, step-b's right.
        anchor = {"step_a": "right", "step_b": "left", "step_c": "left"}[moment]
        annotations.append({"xref": xref, "yref": "paper", "x": x, "y": 1.0, "yanchor": "bottom", "xanchor": anchor, "xshift": -2 if anchor == "right" else 2, "text": label, "showarrow": False, "font": {"size": 11, "color": color}})
    return shapes, annotations


def replay_loss_figure(window: ReplayWindow, step: int, max_points: int = DEFAULT_MAX_POINTS) -> dict:
    """The loss around the episode (Figure 4a), step-a/b/c marked, a cursor at ``step``."""
    data = []
    for i, (name, values) in enumerate(window.losses.items()):
        color = LOSS_COLOR if name == "loss" else TASK_COLORS[(i - 1) % len(TASK_COLORS)]
        data.append(_line(window.steps, values, max_points, name="total loss" if name == "loss" else _task(name), line={"color": color, "width": 1.6 if name == "loss" else 1.1}))
    shapes, annotations = moment_shapes(window)
    at = int(window.steps[window.row(step)])
    shapes.append({"type": "line", "xref": "x", "yref": "paper", "x0": at, "x1": at, "y0": 0, "y1": 1, "line": {"color": "#111827", "width": 2.5}, "name": "cursor"})
    layout = _layout(270, "Loss around the divergence (cursor = replayed step)", shapes=shapes, annotations=annotations)
    layout["legend"] = {"x": 0.01, "xanchor": "left", "y": 0.97, "yanchor": "top", "bgcolor": "rgba(255,255,255,0.8)", "font": {"size": 11}}
    layout["xaxis"] = _axis(title={"text": "step"}, range=[window.start, window.end])
    layout["yaxis"] = _axis(title={"text": "loss"})
    layout["margin"]["t"] = 56
    return {"data": data, "layout": layout}


def _nonfinite_trace(x: list, values_by_trace: list[np.ndarray], y_at: float) -> dict | None:
    bad = np.zeros(len(x), bool)
    for values in values_by_trace:
        bad |= ~np.isfinite(values)
    if not bad.any():
        return None
    return {
        "type": "scatter",
        "mode": "markers+text",
        "x": [x[i] for i in np.flatnonzero(bad)],
        "y": [y_at] * int(bad.sum()),
        "text": ["NaN"] * int(bad.sum()),
        "textposition": "top center",
        "textfont": {"color": "#dc2626", "size": 10},
        "marker": {"symbol": "x", "color": "#dc2626", "size": 9},
        "name": "non-finite",
        "hoverinfo": "name",
    }


def replay_bars_figure(window: ReplayWindow, step: int) -> dict:
    """Per layer at ``step``: the :func:`bar_metrics` (‖g‖₂, ‖g‖₂/‖w‖₂, ‖r/w‖∞) as grouped bars, log scale."""
    row = window.row(step)
    names = short_layer_names(window.layers)
    data, shown = [], []
    for m in bar_metrics():
        if m.name not in window.metrics:
            continue
        values = window.metrics[m.name][row].astype(np.float64)
        shown.append(values)
        data.append({"type": "bar", "name": m.label, "x": names, "y": _nullable(np.where(values > 0, values, np.nan)), "marker": {"color": m.color or NEUTRAL_COLOR}, "customdata": window.layers, "hovertemplate": "%{customdata}<br>" + m.label + " = %{y:.3g}<extra></extra>"})
    rng = window.norm_range or [-6, 2]
    bad = _nonfinite_trace(names, shown, 10 ** (rng[0] + 0.04 * (rng[1] - rng[0])))
    if bad:
        data.append(bad)
    at = int(window.steps[row])
    layout = _layout(300, f"Per-layer statistics at step {at:,}", barmode="group", bargap=0.25, bargroupgap=0.05)
    layout["xaxis"] = _axis(tickangle=_tick_angle(names), automargin=True)
    layout["yaxis"] = _axis(type="log", range=rng, title={"text": "log scale"}, exponentformat="power")
    return {"data": data, "layout": layout}


def replay_factor_figure(window: ReplayWindow, step: int) -> dict:
    """Per layer at ``step``: the factors GC, AGC and Clippy would apply (log scale, 1 = none)."""
    row = window.row(step)
    names = short_layer_names(window.layers)
    data, shown = [], []
    for rule in SHOWN_RULES:
        metric = FACTOR_METRICS[rule]
        if metric not in window.metrics:
            continue
        values = window.metrics[metric][row].astype(np.float64)
        shown.append(values)
        data.append({"type": "bar", "name": f"σ {RULE_LABELS[rule]}", "x": names, "y": _nullable(values), "marker": {"color": RULE_COLORS[rule]}, "customdata": window.layers, "hovertemplate": "%{customdata}<br>σ " + RULE_LABELS[rule] + " = %{y:.3g}<extra></extra>"})
    rng = window.factor_range or [-1.2, math.log10(1.8)]
    bad = _nonfinite_trace(names, shown, 10 ** (rng[0] + 0.04 * (rng[1] - rng[0])))
    if bad:
        data.append(bad)
    at = int(window.steps[row])
    layout = _layout(300, f"Clipping factors σ at step {at:,} (shorter = clips harder)", barmode="group", bargap=0.25, bargroupgap=0.05)
    layout["xaxis"] = _axis(tickangle=_tick_angle(names), automargin=True)
    layout["yaxis"] = _axis(type="log", range=rng, title={"text": "σ (log)"}, exponentformat="power")
    layout["shapes"] = [{"type": "line", "xref": "paper", "yref": "y", "x0": 0, "x1": 1, "y0": 1, "y1": 1, "line": {"color": "#9ca3af", "dash": "dash", "width": 1}}]
    return {"data": data, "layout": layout}


def figure4_figure(window: ReplayWindow, layer: str) -> dict:
    """The paper's Figure 4b for one layer: measurements (left) and factors (right) at step-a, b, c."""
    if layer not in window.layers:
        return empty_figure(f"no layer {layer!r}", 300)
    j = window.layers.index(layer)
    moments = {MOMENT_LABELS[k] if k != "step_c" or window.episode["kind"] == "full" else "recovered": s for k, s in window.moments().items() if s is not None}
    labels = list(moments)
    rows = [window.row(s) for s in moments.values()]
    data = []
    for metric in MEASUREMENTS:
        if metric in window.metrics:
            values = np.array([window.metrics[metric][r, j] for r in rows], np.float64)
            data.append({"type": "bar", "name": METRIC_LABELS[metric], "x": labels, "y": _nullable(np.where(values > 0, values, np.nan)), "marker": {"color": METRIC_COLORS[metric]}, "xaxis": "x", "yaxis": "y", "legendgroup": "m", "hovertemplate": METRIC_LABELS[metric] + " = %{y:.3g}<extra>%{x}</extra>"})
    for rule in SHOWN_RULES:
        metric = FACTOR_METRICS[rule]
        if metric in window.metrics:
            values = np.array([window.metrics[metric][r, j] for r in rows], np.float64)
            data.append({"type": "bar", "name": f"σ {RULE_LABELS[rule]}", "x": labels, "y": _nullable(values), "marker": {"color": RULE_COLORS[rule], "pattern": {"shape": "/"}}, "xaxis": "x2", "yaxis": "y2", "legendgroup": "f", "hovertemplate": "σ " + RULE_LABELS[rule] + " = %{y:.3g}<extra>%{x}</extra>"})
    layout = _layout(330, None, barmode="group", bargap=0.2)
    layout["margin"] = {"l": 64, "r": 16, "t": 34, "b": 64}
    layout["legend"] = {"orientation": "h", "x": 0.5, "xanchor": "center", "y": -0.12, "yanchor": "top", "font": {"size": 11}}
    layout["xaxis"] = _axis(domain=[0, 0.45], anchor="y")
    layout["yaxis"] = _axis(type="log", range=window.norm_range, exponentformat="power", title={"text": "log scale"})
    layout["xaxis2"] = _axis(domain=[0.55, 1], anchor="y2")
    layout["yaxis2"] = _axis(type="log", range=window.factor_range, exponentformat="power", anchor="x2", title={"text": "σ (log)"})
    layout["annotations"] = [
        {"text": f"<b>{layer}</b>: ‖g‖₂, ‖g‖₂/‖w‖₂, ‖r/w‖∞", "xref": "x domain", "yref": "paper", "x": 0.5, "y": 1.0, "yanchor": "bottom", "showarrow": False, "font": {"size": 12}},
        {"text": "clipping factor σ (1 = no clipping)", "xref": "x2 domain", "yref": "paper", "x": 0.5, "y": 1.0, "yanchor": "bottom", "showarrow": False, "font": {"size": 12}},
    ]
    return {"data": data, "layout": layout}


def default_layer(window: ReplayWindow, culprits: list[str] | None = None) -> str | None:
    """The layer Figure 4b shows first: the top culprit, else the one Clippy clips hardest at step-b."""
    for name in culprits or []:
        if name in window.layers:
            return name
    metric = FACTOR_METRICS["clippy"]
    if metric in window.metrics and len(window.layers):
        values = window.metrics[metric][window.row(window.episode["step_b"])].astype(np.float64)
        if np.isfinite(values).any():
            return window.layers[int(np.nanargmin(values))]
    return window.layers[-1] if window.layers else None


# -------------------------------------------------------------------- post-mortem


_SUMMARY_CACHE: dict[tuple, dict] = {}
_SUMMARY_LOCK = threading.Lock()


def postmortem_summary(live: LiveRun, episode: dict) -> dict:
    """The post-mortem of ``episode`` for the Replay view (the only use of ``clippy_monitor.postmortem``).

    Returns ``{"source": "postmortem" | "quick", "verdict", "culprits", "first_task",
    "factors_at_step_b": {layer: {gc, agc, clippy, clippy_over_gc, clippy_over_agc}},
    "contrast": {layer, gc, agc, clippy, ...} | None, "dead_units": {...} | None, "note"}``.
    The post-mortem reads the whole record (it is not a live view), once per run version.
    """
    key = (str(live.path), live.version, episode.get("key"))
    with _SUMMARY_LOCK:
        if key in _SUMMARY_CACHE:
            return _SUMMARY_CACHE[key]
    try:
        from clippy_monitor.postmortem import analysis
    except ImportError:
        analysis = None
    summary = None
    if analysis is not None:
        try:
            run = load_run(live.path)
            events = [e.to_report() for e in read_episodes(run)]
            focus = next(
                (i for i, e in enumerate(events) if e["step_b"] == episode["step_b"] and e["kind"] == episode["kind"]),
                None,
            )
            if focus is None:
                events = [*events, Event.from_record(episode, "dashboard").to_report()]
                focus = len(events) - 1
            event = events[focus]
            windows = analysis.event_windows(run, event)
            culprit_names = analysis.culprits(analysis.layer_departures(run, windows))
            tasks = analysis.task_departures(run, windows)
            factors = analysis.factors_at(run, analysis.moment_rows(run, event)["step_b"])
            contrast = analysis.clippy_contrast(factors, culprit_names)
            summary = {
                "source": "postmortem",
                "verdict": analysis.verdict(run, events, focus, culprit_names, contrast, windows),
                "culprits": culprit_names,
                "first_task": next((d.name for d in tasks if d.step is not None), None),
                "factors_at_step_b": factors,
                "contrast": contrast,
                "dead_units": analysis.dead_units(run, windows),
                "note": None,
            }
        except (RecordError, OSError):
            raise
        except Exception as exc:  # noqa: BLE001 -- the post-mortem is still evolving: degrade, don't fail
            summary = None
            note = f"post-mortem unavailable ({type(exc).__name__}: {exc}); quick summary shown"
    else:
        note = "post-mortem module not installed; quick summary shown"
    if summary is None:
        summary = _quick_summary(live, episode)
        summary["note"] = note
    with _SUMMARY_LOCK:
        if len(_SUMMARY_CACHE) > 32:
            _SUMMARY_CACHE.clear()
        _SUMMARY_CACHE[key] = summary
    return summary


def _quick_summary(live: LiveRun, episode: dict) -> dict:
    """A fallback summary from the replay window alone (no culprit ranking)."""
    window = replay_window(live, episode)
    row = window.row(episode["step_b"])
    factors = {}
    for j, layer in enumerate(window.layers):
        entry = {}
        for rule in SHOWN_RULES:
            values = window.metrics.get(FACTOR_METRICS[rule])
            v = float(values[row, j]) if values is not None else math.nan
            entry[rule] = v if math.isfinite(v) else None
        for other in ("gc", "agc"):
            c, o = entry.get("clippy"), entry.get(other)
            entry[f"clippy_over_{other}"] = c / o if c is not None and o else None
        factors[layer] = entry
    usable = {k: v for k, v in factors.items() if v.get("clippy") is not None}
    contrast = None
    if usable:
        layer = min(usable, key=lambda k: usable[k]["clippy"])
        contrast = {"layer": layer, **usable[layer]}
    return {
        "source": "quick",
        "verdict": episode_label(episode),
        "culprits": [],
        "first_task": _task(episode["task"]) if episode.get("task") else None,
        "factors_at_step_b": factors,
        "contrast": contrast,
        "dead_units": None,
        "note": None,
    }


# ---------------------------------------------------------------------- compare view


def compare_figure(runs: list[LiveRun], max_points: int = 1500) -> dict:
    """Runs side by side (one column each), aligned by step: loss, global ‖g‖₂, lowest factor.

    x axes are shared by every panel, y axes by every panel of a row.
    """
    if not runs:
        return empty_figure("Pick two or more runs to compare", 560)
    rows = [("loss", "loss", "linear"), ("grad_norm", "global ‖g‖₂", "log"), ("factor", "lowest σ over layers", "log")]
    ncols, nrows = len(runs), len(rows)
    gap_x, gap_y = 0.04, 0.08
    width = (1 - gap_x * (ncols - 1)) / ncols
    height = (1 - gap_y * (nrows - 1)) / nrows
    layout = _layout(620, None)
    layout["margin"] = {"l": 70, "r": 16, "t": 56, "b": 44}
    layout["annotations"] = []
    layout["showlegend"] = True
    data = []
    legend_seen = set()
    for c, live in enumerate(runs):
        eps = episodes(live)
        for r, (kind, label, scale) in enumerate(rows):
            k = r * ncols + c + 1
            suffix = "" if k == 1 else str(k)
            x0 = c * (width + gap_x)
            y1 = 1 - r * (height + gap_y)
            xa = _axis(domain=[x0, x0 + width], anchor=f"y{suffix}", showticklabels=r == nrows - 1)
            if k != 1:
                xa["matches"] = "x"
            if r == nrows - 1:
                xa["title"] = {"text": "step"}
            ya = _axis(domain=[y1 - height, y1], anchor=f"x{suffix}", type=scale)
            if scale == "log":
                ya["exponentformat"] = "power"
            if c == 0:
                ya["title"] = {"text": label}
            else:
                ya["matches"] = f"y{'' if r * ncols + 1 == 1 else r * ncols + 1}"
                ya["showticklabels"] = False
            layout[f"xaxis{suffix}"] = xa
            layout[f"yaxis{suffix}"] = ya
            traces = _compare_traces(live, kind, max_points)
            for name, color, steps, values, dash in traces:
                show = name not in legend_seen
                legend_seen.add(name)
                tr = _line(steps, values, max_points, name=name, legendgroup=name, showlegend=show, line={"color": color, "width": 1.2, "dash": dash})
                tr["xaxis"], tr["yaxis"] = f"x{suffix}", f"y{suffix}"
                data.append(tr)
            if not traces:
                layout["annotations"].append({"text": "not recorded", "showarrow": False, "xref": f"x{suffix} domain", "yref": f"y{suffix} domain", "x": 0.5, "y": 0.5, "font": {"color": "#9ca3af"}})
            layout.setdefault("shapes", []).extend(event_shapes(eps, xref=f"x{suffix}", yref=f"y{suffix} domain"))
        h = health(live)
        layout["annotations"].append({"text": f"<b>{live.name}</b> · {h['title']}", "showarrow": False, "xref": "paper", "yref": "paper", "x": x0 + width / 2, "y": 1.0, "yanchor": "bottom", "yshift": 6, "font": {"size": 13, "color": {"healthy": "#166534", "micro": "#92400e", "diverged": "#b91c1c"}.get(h["state"], "#374151")}})
    layout["legend"] = {"orientation": "h", "x": 0.5, "xanchor": "center", "y": 1.06, "yanchor": "bottom", "font": {"size": 11}}
    layout["margin"]["t"] = 80
    return {"data": data, "layout": layout}


def _compare_traces(live: LiveRun, kind: str, max_points: int) -> list[tuple]:
    if not len(live):
        return []
    if kind == "loss":
        out = []
        for i, name in enumerate(live.loss_series):
            color = LOSS_COLOR if name == "loss" else TASK_COLORS[(i - 1) % len(TASK_COLORS)]
            out.append(("total loss" if name == "loss" else _task(name), color, live.steps, live.series(name), "solid"))
        return out
    if kind == "grad_norm":
        if live.has_series("grad_norm"):
            values = live.series("grad_norm")
            return [("global ‖g‖₂", "#0f766e", live.steps, np.where(values > 0, values, np.nan), "solid")]
        return []
    out = []
    for rule in live.rules:
        if rule in ("clippy", "applied"):
            low, _ = live.min_factor(rule)
            out.append((f"min σ {RULE_LABELS[rule]}", RULE_COLORS[rule], live.steps, low, "dot" if rule == "applied" else "solid"))
    return out


def compare_table(runs: list[LiveRun]) -> list[dict]:
    """One row per run: optimizer, steps, health, events, last loss, lowest applied factor."""
    out = []
    for live in runs:
        h = health(live)
        eps = episodes(live)
        last_loss = float(live.series("loss")[-1]) if len(live) and live.has_series("loss") else None
        low = None
        if len(live) and "applied" in live.rules:
            values = live.min_factor("applied")[0]
            low = float(np.nanmin(values)) if np.isfinite(values).any() else None
        full = next((e for e in eps if e["kind"] == "full"), None)
        out.append(
            {
                "run": live.name,
                "optimizer": optimizer_name(live.meta.get("optimizer")) or "?",
                "steps": len(live),
                "health": h["title"],
                "state": h["state"],
                "micro": sum(1 for e in eps if e["kind"] == "micro"),
                "full": f"step-b {full['step_b']:,} → step-c {_fmt_step(full.get('step_c'))}" if full else "—",
                "last_loss": last_loss,
                "min_applied": low,
            }
        )
    return out
