"""What the Clippy tab shows, computed from our run records (no TensorBoard, no TensorFlow).

* :class:`Catalog` maps a TensorBoard logdir to its runs (directories holding a
  record, found with :func:`clippy_monitor.record.find_runs`), re-scanned at
  most every ``ttl`` seconds, and keeps one :class:`RunView` per run.
* :class:`RunView` is a cached, live view of one record read through
  :class:`clippy_monitor.record.RunFollower`: the first request reads the whole
  record; later requests ``stat`` its files and, only if they changed, read
  just the appended bytes (training rewinds are applied).  Every step is kept.
* ``*_payload`` functions build the JSON-able answers of the plugin's routes.
  Line series are downsampled with a min/max envelope and heatmaps with
  per-bucket max (magnitudes) or min (factors), see :mod:`clippy_monitor.display`;
  nothing is ever strided, so a one-step spike survives any zoom level.

Non-finite numbers: in line series they become ``null`` (a gap) and their
steps are listed in ``nonfinite_steps``; in the layer table they are the
strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` (TensorBoard's convention);
heatmaps are raw little-endian float32 (base64), so NaN/inf survive as such.
"""

from __future__ import annotations

import base64
import collections
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from clippy_monitor.display import bucket_max, bucket_min, bucket_starts, minmax_envelope
from clippy_monitor.record import RecordError, RunFollower, find_runs, read_meta
from clippy_monitor.record.format import EVENTS_FILE, META_FILE, RECORD_FILE
from clippy_monitor.tensorboard_plugin.metadata import HEATMAP_REDUCE, METRIC_LABELS

EVENT_STEP_KEYS = ("step_a", "step_b", "step_c", "recovered")
STATUS_NAMES = {0: "healthy", 1: "abnormal", 2: "diverged"}


# --------------------------------------------------------------------------- views


class RunView:
    """A live, cached view of the record in ``path``; every step, never sampled.

    Call :meth:`refresh` before reading (cheap when nothing changed: three
    ``stat`` calls).  ``version`` increases whenever the content changes, so
    derived results can be cached against it.  Thread-safe: hold ``lock``
    while reading several attributes that must agree.
    """

    _CACHE_SIZE = 64  # derived payloads kept per view
    # Each poll that finds new rows keeps one more memory map (its rows are views
    # into it); past this many the record is read afresh into a single map, so
    # a run followed for days cannot exhaust the process's map count.
    _MAX_SEGMENTS = 256

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.lock = threading.RLock()
        self.version = 0
        self._reset()

    def _reset(self) -> None:
        self.meta: dict = {}
        self.layers: list[str] = []
        self.layer_metrics: list[str] = []
        self.series_names: list[str] = []
        self.steps = np.zeros(0, np.int64)
        self.events: list[dict] = []
        self.skipped: list[str] = []
        self._follower: RunFollower | None = None
        self._series = np.zeros((0, 0))  # [n_series, n_steps] float64
        self._segments: list[list] = []  # [delta Run, rows still in effect], in step order
        self._layer_cache: dict[str, np.ndarray] = {}  # metric -> [n_steps, n_layers]
        self._signature: tuple | None = None
        self._derived: collections.OrderedDict = collections.OrderedDict()
        self.version += 1

    # -- updating ------------------------------------------------------------------

    def refresh(self) -> bool:
        """Read what was appended since the last refresh; True if anything changed."""
        with self.lock:
            signature = _signature(self.path)
            if signature == self._signature:
                return False
            if self._replaced(signature) or len(self._segments) >= self._MAX_SEGMENTS:
                self._reset()
            try:
                if self._follower is None:
                    self._open()
                delta = self._follower.poll()
            except RecordError:
                # A record file shrank under us (replaced by a new record): read afresh.
                self._reset()
                self._open()
                delta = self._follower.poll()
            self._apply(delta)
            self._signature = signature
            return True

    def _open(self) -> None:
        self._follower = RunFollower(self.path)
        self.meta = self._follower.meta
        self.layers = list(self.meta["layers"])
        self.layer_metrics = list(self.meta["layer_metrics"])
        self.series_names = list(self.meta["series"])
        self._series = np.zeros((len(self.series_names), 0))

    def _replaced(self, signature: tuple) -> bool:
        """True if a file was replaced or shrank (a new record in the same directory)."""
        if self._signature is None:
            return False
        for old, new in zip(self._signature, signature):
            if old is None:
                continue
            if new is None or new[0] != old[0] or new[1] < old[1]:
                return True
        return False

    def _apply(self, delta) -> None:
        if delta.empty:
            return
        if delta.rewind_from is not None:
            self._truncate(int(np.searchsorted(self.steps, delta.rewind_from)))
        if len(delta):
            self._segments.append([delta, len(delta)])
            self.steps = _frozen(np.concatenate([self.steps, delta.steps]))
            new_series = np.stack([delta.series(name) for name in self.series_names])
            self._series = _frozen(np.concatenate([self._series, new_series], axis=1))
            for metric, values in self._layer_cache.items():
                self._layer_cache[metric] = _frozen(np.concatenate([values, delta.layer(metric)]))
        self.events = self.events + list(delta.events)
        self.skipped = self.skipped + list(delta.skipped)
        self._derived.clear()
        self.version += 1

    def _truncate(self, keep: int) -> None:
        """Keep only the first ``keep`` rows (a rewind superseded the rest)."""
        self.steps = self.steps[:keep]
        self._series = self._series[:, :keep]
        self._layer_cache = {m: v[:keep] for m, v in self._layer_cache.items()}
        held, segments = 0, []
        for run, rows in self._segments:
            if held >= keep:
                break
            rows = min(rows, keep - held)
            segments.append([run, rows])
            held += rows
        self._segments = segments

    # -- reading ---------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.steps)

    def series(self, name: str) -> np.ndarray:
        """float64 [n_steps]."""
        try:
            return self._series[self.series_names.index(name)]
        except ValueError:
            raise KeyError(f"no series {name!r}") from None

    def layer(self, metric: str) -> np.ndarray:
        """float32 [n_steps, n_layers], assembled once per metric and extended as the run grows."""
        with self.lock:
            if metric not in self.layer_metrics:
                raise KeyError(f"no layer metric {metric!r}")
            if metric not in self._layer_cache:
                parts = [run.layer(metric)[:rows] for run, rows in self._segments]
                values = (
                    np.concatenate(parts)
                    if parts
                    else np.zeros((0, len(self.layers)), np.float32)
                )
                self._layer_cache[metric] = _frozen(values)
            return self._layer_cache[metric]

    @property
    def tasks(self) -> list[str]:
        tasks = self.meta.get("tasks")
        if isinstance(tasks, list) and tasks:
            return [str(t) for t in tasks]
        return [n[len("loss/") :] for n in self.series_names if n.startswith("loss/")]

    def row_range(self, start: int | None, end: int | None) -> tuple[int, int]:
        """Rows ``[i0, i1)`` whose steps lie in ``[start, end]`` (None: unbounded)."""
        i0 = 0 if start is None else int(np.searchsorted(self.steps, start, side="left"))
        i1 = len(self.steps) if end is None else int(np.searchsorted(self.steps, end, side="right"))
        return i0, max(i0, i1)

    def cached(self, key: tuple, compute):
        """``compute()`` memoised against ``key`` and the current version."""
        with self.lock:
            full_key = (self.version, *key)
            if full_key in self._derived:
                self._derived.move_to_end(full_key)
                return self._derived[full_key]
            value = compute()
            self._derived[full_key] = value
            while len(self._derived) > self._CACHE_SIZE:
                self._derived.popitem(last=False)
            return value


def _signature(path: Path) -> tuple:
    out = []
    for name in (META_FILE, RECORD_FILE, EVENTS_FILE):
        try:
            st = os.stat(path / name)
        except FileNotFoundError:
            out.append(None)
        else:
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def _frozen(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


# ------------------------------------------------------------------------- catalog


class Catalog:
    """The runs under a logdir (re-scanned at most every ``ttl`` seconds) and their views.

    Run names are paths relative to the logdir ("." for the logdir itself), as
    TensorBoard names runs.  Only directories found by ``find_runs`` can be
    opened, so a request cannot reach other paths.
    """

    def __init__(self, logdir: str | os.PathLike | None, ttl: float = 5.0):
        self.logdir = Path(logdir).expanduser() if logdir else None
        self.ttl = ttl
        self._lock = threading.Lock()
        self._runs: dict[str, Path] = {}
        self._scanned_at = -math.inf
        self._views: dict[str, RunView] = {}

    def runs(self) -> dict[str, Path]:
        """Run name -> directory, sorted by name."""
        with self._lock:
            if time.monotonic() - self._scanned_at >= self.ttl:
                self._runs = self._scan()
                self._scanned_at = time.monotonic()
                self._views = {k: v for k, v in self._views.items() if k in self._runs}
            return dict(self._runs)

    def _scan(self) -> dict[str, Path]:
        if self.logdir is None or not self.logdir.is_dir():
            return {}
        try:
            paths = find_runs(self.logdir)
        except (RecordError, OSError):
            return {}
        return {_run_name(self.logdir, p): p for p in paths}

    def view(self, name: str) -> RunView:
        """The refreshed view of run ``name``; KeyError if there is no such run."""
        path = self.runs().get(name)
        if path is None:
            raise KeyError(name)
        with self._lock:
            view = self._views.get(name)
            if view is None or view.path != path:
                view = self._views[name] = RunView(path)
        view.refresh()
        return view


def _run_name(logdir: Path, path: Path) -> str:
    rel = os.path.relpath(path, logdir)
    return "." if rel == os.curdir else Path(rel).as_posix()


# ------------------------------------------------------------------------ payloads


def runs_payload(catalog: Catalog) -> dict:
    """``/runs``: every run with what its meta says (cheap: no record is read)."""
    runs = []
    for name, path in catalog.runs().items():
        entry: dict[str, Any] = {"run": name}
        try:
            meta = read_meta(path)
        except RecordError as exc:
            entry["error"] = str(exc)
        else:
            entry["layers"] = len(meta["layers"])
            entry["tasks"] = list(meta.get("tasks") or [])
        try:
            st = os.stat(path / RECORD_FILE)
            entry["bytes"], entry["mtime"] = st.st_size, st.st_mtime
        except FileNotFoundError:
            entry["bytes"], entry["mtime"] = 0, None
        runs.append(entry)
    return {"logdir": str(catalog.logdir) if catalog.logdir else None, "runs": runs}


def summary_payload(name: str, view: RunView) -> dict:
    """``/summary``: the shape of a run, its events and its current detector status."""
    with view.lock:
        steps = view.steps
        status = None
        if len(steps) and "detector/status" in view.series_names:
            code = view.series("detector/status")[-1]
            if np.isfinite(code):
                status = STATUS_NAMES.get(int(math.floor(code + 1e-3)))
        meta = view.meta
        return {
            "run": name,
            "version": view.version,
            "steps": len(steps),
            "first_step": int(steps[0]) if len(steps) else None,
            "last_step": int(steps[-1]) if len(steps) else None,
            "layers": view.layers,
            "layer_metrics": view.layer_metrics,
            "metric_labels": {m: METRIC_LABELS.get(m, m) for m in view.layer_metrics},
            "heatmap_reduce": {m: HEATMAP_REDUCE.get(m, "max") for m in view.layer_metrics},
            "series": view.series_names,
            "loss_series": _loss_series(view),
            "tasks": view.tasks,
            "events": _clean_events(view.events),
            "status": status,
            "skipped": view.skipped,
            "thresholds": _cleanse(meta.get("thresholds")),
            "optimizer": _optimizer_name(meta.get("optimizer")),
        }


def series_payload(
    name: str,
    view: RunView,
    names: list[str] | None,
    start: int | None,
    end: int | None,
    max_points: int,
) -> dict:
    """``/series``: loss and task losses (or ``names``) over ``[start, end]``, min/max envelope."""
    names = names or _loss_series(view)
    for series_name in names:
        if series_name not in view.series_names:
            raise KeyError(f"no series {series_name!r}")

    def compute():
        i0, i1 = view.row_range(start, end)
        steps = view.steps[i0:i1]
        out = []
        for series_name in names:
            values = view.series(series_name)[i0:i1]
            xs, ys = minmax_envelope(steps, values, max_points)
            finite = np.isfinite(values)
            out.append(
                {
                    "name": series_name,
                    "steps": xs.tolist(),
                    "values": _nullable(ys),
                    "nonfinite_steps": steps[~finite].tolist()[:10_000],
                }
            )
        return {
            "run": name,
            "version": view.version,
            "start": int(steps[0]) if len(steps) else None,
            "end": int(steps[-1]) if len(steps) else None,
            "steps_in_range": int(i1 - i0),
            "downsampled": bool(i1 - i0 > max_points),
            "series": out,
            "events": _clean_events(view.events),
        }

    return view.cached(("series", tuple(names), start, end, max_points), compute)


def heatmap_payload(
    name: str,
    view: RunView,
    metric: str,
    start: int | None,
    end: int | None,
    max_columns: int,
    reduce: str | None = None,
) -> dict:
    """``/heatmap``: layers x step-buckets of ``metric``, each cell the bucket's max (or min).

    ``z`` is base64 of little-endian float32, row-major ``[len(layers), columns]``;
    column ``j`` covers steps ``first_steps[j] .. last_steps[j]``.
    """
    if metric not in view.layer_metrics:
        raise KeyError(f"no layer metric {metric!r}")
    reduce = reduce or HEATMAP_REDUCE.get(metric, "max")
    if reduce not in ("max", "min"):
        raise ValueError(f"reduce must be 'max' or 'min', got {reduce!r}")

    def compute():
        i0, i1 = view.row_range(start, end)
        steps = view.steps[i0:i1]
        values = view.layer(metric)[i0:i1].T  # [layers, steps], a view
        reducer = bucket_max if reduce == "max" else bucket_min
        z = np.ascontiguousarray(reducer(values, max_columns), dtype="<f4")
        starts = bucket_starts(len(steps), max_columns)
        ends = np.append(starts[1:], len(steps)) - 1
        finite = z[np.isfinite(z)]
        positive = finite[finite > 0]
        return {
            "run": name,
            "version": view.version,
            "metric": metric,
            "label": METRIC_LABELS.get(metric, metric),
            "reduce": reduce,
            "layers": view.layers,
            "steps_in_range": int(i1 - i0),
            "columns": int(z.shape[1]) if z.ndim == 2 else 0,
            "first_steps": steps[starts].tolist(),
            "last_steps": steps[ends].tolist() if len(steps) else [],
            "z": base64.b64encode(z.tobytes()).decode("ascii"),
            "dtype": "float32",
            "shape": [len(view.layers), int(z.shape[1])],
            "min_positive": float(positive.min()) if len(positive) else None,
            "max": float(finite.max()) if len(finite) else None,
            "nonfinite_cells": int(z.size - len(finite)),
        }

    return view.cached(("heatmap", metric, start, end, max_columns, reduce), compute)


def layer_table_payload(
    name: str,
    view: RunView,
    step: int,
    until: int | None = None,
    layer: int | None = None,
    metric: str | None = None,
) -> dict:
    """``/layers``: every layer's statistics at one step (the paper's Figure 4b, as a table).

    The row used is the last recorded step at or before ``step`` (the first
    step if ``step`` precedes the run).  With ``until``, ``layer`` and ``metric``
    (a click on a heatmap bucket) the step in ``[step, until]`` where that
    layer's metric is most extreme (max, or min for factors) is used instead.
    """
    with view.lock:
        if not len(view.steps):
            raise KeyError("the run has no steps yet")
        row = _row_at(view, step)
        if until is not None and layer is not None and metric is not None:
            row = _extreme_row(view, step, until, layer, metric, row)
        at = int(view.steps[row])
        table = np.stack([view.layer(m)[row] for m in view.layer_metrics], axis=1)  # [L, M]
        series = {s: _cleanse(float(view.series(s)[row])) for s in view.series_names}
        return {
            "run": name,
            "version": view.version,
            "requested_step": step,
            "step": at,
            "exact": at == step,
            "previous_step": int(view.steps[row - 1]) if row > 0 else None,
            "next_step": int(view.steps[row + 1]) if row + 1 < len(view.steps) else None,
            "metrics": view.layer_metrics,
            "metric_labels": [METRIC_LABELS.get(m, m) for m in view.layer_metrics],
            "layers": view.layers,
            "values": [[_cleanse(float(v)) for v in r] for r in table],
            "series": series,
            "events": _events_at(view.events, at),
            "thresholds": _cleanse(view.meta.get("thresholds")),
        }


def _row_at(view: RunView, step: int) -> int:
    return max(int(np.searchsorted(view.steps, step, side="right")) - 1, 0)


def _extreme_row(view, start, until, layer, metric, default):
    if metric not in view.layer_metrics:
        raise KeyError(f"no layer metric {metric!r}")
    if not 0 <= layer < len(view.layers):
        raise KeyError(f"no layer {layer}")
    i0, i1 = view.row_range(start, until)
    if i1 <= i0:
        return default
    values = np.asarray(view.layer(metric)[i0:i1, layer], np.float64)
    if np.isnan(values).all():
        return i0
    pick = np.nanargmin if HEATMAP_REDUCE.get(metric, "max") == "min" else np.nanargmax
    return i0 + int(pick(values))


def _loss_series(view: RunView) -> list[str]:
    names = [n for n in view.series_names if n == "loss" or n.startswith("loss/")]
    return names or view.series_names[:1]


def _optimizer_name(optimizer: Any) -> str | None:
    if isinstance(optimizer, dict):
        config = optimizer.get("config")
        name = optimizer.get("class_name")
        if isinstance(config, dict) and config.get("name"):
            return f"{name} ({config['name']})" if name else str(config["name"])
        return str(name) if name else None
    return str(optimizer) if optimizer else None


def _clean_events(events: list[dict]) -> list[dict]:
    """Events as plain JSON (non-finite floats as strings), sorted by onset."""
    cleaned = [{k: _cleanse(v) for k, v in e.items()} for e in events]

    def onset(e):
        for key in ("step_b", "step_a", "step_c", "recovered", "step"):
            if isinstance(e.get(key), (int, float)) and not isinstance(e.get(key), bool):
                return e[key]
        return math.inf

    return sorted(cleaned, key=onset)


def _events_at(events: list[dict], step: int) -> list[dict]:
    """Which event steps (``step_a`` ...) the given step is, e.g. ``[{"index": 0, "role": "step_b"}]``."""
    out = []
    for i, event in enumerate(_clean_events(events)):
        for key in EVENT_STEP_KEYS:
            if event.get(key) == step:
                out.append({"index": i, "kind": event.get("kind"), "role": key})
    return out


def _cleanse(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _cleanse(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_cleanse(v) for v in value]
    return value


def _nullable(values: np.ndarray) -> list:
    """A list of floats with None where ``values`` is not finite."""
    out = np.asarray(values, np.float64).astype(object)
    out[~np.isfinite(np.asarray(values, np.float64))] = None
    return out.tolist()
