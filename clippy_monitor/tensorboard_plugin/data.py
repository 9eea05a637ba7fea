"""What the Clippy tab shows, computed from our run records (no TensorBoard, no TensorFlow).

* :class:`Catalog` maps a TensorBoard logdir to its runs, re-scanned at most
  every ``ttl`` seconds, and keeps a :class:`RunView` per opened run (the
  shared :class:`clippy_monitor.record.catalog.RunCatalog`).
* :class:`RunView` is a cached, live view of one record, a
  :class:`clippy_monitor.record.LiveRecord`: the first request reads the whole
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
import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from clippy_monitor import catalog as vocab  # the metric vocabulary (Catalog: the runs)
from clippy_monitor.display import bucket_max, bucket_min, bucket_starts, minmax_envelope, nullable
from clippy_monitor.episodes import (
    ACTION_KINDS,
    AUC_COLLAPSE,
    EVALUATION_KIND,
    read_episodes,
    repeated_micro,
)
from clippy_monitor.postmortem.analysis import focus_event
from clippy_monitor.record import LiveRecord, RecordError, confined_run, read_meta
from clippy_monitor.record.catalog import MAX_OPEN_RUNS, RunCatalog
from clippy_monitor.record.format import RECORD_FILE, optimizer_name
from clippy_monitor.record.status import ABNORMAL, DIVERGED, HEALTHY, decode_status
from clippy_monitor.recovered import read_recovery
from clippy_monitor.sensitivity import event_sensitivity
from clippy_monitor.sharpness_reading import PRECONDITIONED, SHARPNESS, THRESHOLD, read_crossing

EVENT_STEP_KEYS = ("step_a", "step_b", "step_c", "recovered")
#: ``/summary``'s ``status``: the name of the decoded last ``detector/status``.
STATUS_NAMES = {HEALTHY: "healthy", ABNORMAL: "abnormal", DIVERGED: "diverged"}


# ------------------------------------------------------------------------- catalog

#: A cached, live view of one record (every step, never sampled): the one live-record class.
RunView = LiveRecord


class Catalog(RunCatalog):
    """The runs under a logdir (re-scanned at most every ``ttl`` seconds) and their live views.

    :class:`~clippy_monitor.record.catalog.RunCatalog` (the Dash app's too) with
    TensorBoard's conventions: the logdir may be unset (no runs), and only a
    listed run is opened (KeyError otherwise).  Run names are paths relative to
    the logdir ("." for the logdir itself), as TensorBoard names runs.
    """

    def __init__(
        self, logdir: str | os.PathLike | None, ttl: float = 5.0, max_open: int = MAX_OPEN_RUNS
    ):
        self.logdir = Path(logdir).expanduser() if logdir else None
        super().__init__(self.logdir or Path.cwd(), scan_ttl=ttl, max_open=max_open)

    def runs(self, force: bool = False) -> dict[str, Path]:
        """Run name -> directory, sorted by name."""
        return super().runs(force) if self.logdir is not None else {}

    @contextlib.contextmanager
    def open_view(self, name: str) -> Iterator[RunView]:
        """The refreshed view of run ``name``, held (never closed) and locked for the ``with`` block.

        :class:`~clippy_monitor.record.RunRefused` if ``name`` or one of its
        record files leads outside the logdir; KeyError if there is no such run.
        """
        if self.logdir is None:
            raise KeyError(name)
        path = confined_run(self.root, name)  # again: links may have changed since the scan
        if self.runs().get(name) != path:
            raise KeyError(name)
        with self.open(name) as view:
            yield view

    def view(self, name: str) -> RunView:
        """The refreshed view of run ``name``, not held: it may be closed once more than
        ``max_open`` other runs were opened (prefer :meth:`open_view`)."""
        with self.open_view(name) as view:
            return view


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


def catalog_payload() -> dict:
    """``/summary``'s ``catalog``: the metric and rule vocabulary, and which metrics the tab draws where.

    Heatmaps of the measurements and factors are shown at first, the other metrics
    are offered; the layer table has the measurements, factors and counts.
    """
    rows = vocab.metrics()
    return {
        **vocab.to_json(),
        "heatmaps": [m.name for m in rows if m.primary],
        "extra_heatmaps": [m.name for m in rows if not m.primary],
        "table_metrics": [m.name for m in rows if m.primary or m.kind == "count"],
    }


def summary_payload(name: str, view: RunView) -> dict:
    """``/summary``: the shape of a run, its divergence events, its current detector status
    and what the recovery ladder did (``recovery``: :meth:`Recovery.to_report
    <clippy_monitor.recovered.Recovery.to_report>`, None if the run was recorded without it)."""
    with view.lock:
        recovery = read_recovery(view)
        steps = view.steps
        status = None
        if len(steps) and "detector/status" in view.series_names:
            status = STATUS_NAMES[decode_status(view.series("detector/status")[-1])[0]]
        episodes = read_episodes(view)
        if any(e.kind == "full" and e.reason == AUC_COLLAPSE for e in episodes):
            status = STATUS_NAMES[DIVERGED]  # judged by the evaluation AUC: no status 2
        repeated = repeated_micro(episodes)
        meta = view.meta
        return {
            "run": name,
            "version": view.version,
            "steps": len(steps),
            "first_step": int(steps[0]) if len(steps) else None,
            "last_step": int(steps[-1]) if len(steps) else None,
            "layers": view.layers,
            "layer_metrics": view.layer_metrics,
            "metric_labels": {m: vocab.label(m) for m in view.layer_metrics},
            "heatmap_reduce": {m: vocab.reduce_of(m) for m in view.layer_metrics},
            "catalog": catalog_payload(),
            "series": view.series_names,
            "loss_series": view.loss_series,
            "tasks": view.tasks,
            "events": _clean_events(view.events),
            "status": status,
            "recovery": recovery.to_report() if recovery is not None else None,
            "repeated_micro": repeated.to_report() if repeated is not None else None,
            "skipped": view.skipped,
            "thresholds": _cleanse(meta.get("thresholds")),
            "optimizer": optimizer_name(meta.get("optimizer")),
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
    names = names or view.loss_series
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
                    "values": nullable(ys),
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
            "sharpness": sharpness_payload(view, i0, i1, max_points),
        }

    return view.cached(("series", tuple(names), start, end, max_points), compute)


def focused_event(view: RunView) -> dict | None:
    """The episode the post-mortem explains (its ``focus_event``, as a report event), or None."""
    events = [e.to_report() for e in read_episodes(view)]
    focus = focus_event(view, events)
    return None if focus is None else events[focus]


def focus_step_b(view: RunView) -> int | None:
    """Step-b of the episode the post-mortem explains (its ``focus_event``), or None."""
    event = focused_event(view)
    return None if event is None else event["step_b"]


def sensitivity_payload(view: RunView) -> dict | None:
    """``/layers``'s ``sensitivity``: how each rule reacts at the focused episode's step-b with
    thresholds calibrated on the run's healthy steps (:meth:`Sensitivity.to_report
    <clippy_monitor.sensitivity.Sensitivity.to_report>`, Figure 4b); None without an episode.
    Computed once per record version."""

    def compute() -> dict | None:
        event = focused_event(view)
        return None if event is None else event_sensitivity(view, event).to_report()

    return view.cached(("sensitivity",), compute)


def sharpness_payload(view: RunView, i0: int, i1: int, max_points: int) -> dict | None:
    """``/series``'s ``sharpness``: the probed steps of rows ``[i0, i1)`` of each sharpness
    series (NaN -> null; min/max envelope past ``max_points``), the threshold, and the
    reading against the post-mortem's step-b (``crossing``: :meth:`Crossing.to_report
    <clippy_monitor.sharpness_reading.Crossing.to_report>`); None for a run recorded
    without ``sharpness_every``."""
    present = [n for n in (PRECONDITIONED, SHARPNESS) if n in view.series_names]
    if not present:
        return None
    steps = view.steps[i0:i1]
    columns = {n: np.asarray(view.series(n)[i0:i1], np.float64) for n in present}
    probed = np.any([~np.isnan(v) for v in columns.values()], axis=0)
    out = []
    for series_name, values in columns.items():
        xs, ys = minmax_envelope(steps[probed], values[probed], max_points)
        out.append({"name": series_name, "steps": xs.tolist(), "values": nullable(ys)})
    crossing = read_crossing(view, focus_step_b(view))
    return {"series": out, "threshold": THRESHOLD, "crossing": crossing.to_report()}


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
    reduce = reduce or vocab.reduce_of(metric)
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
            "label": vocab.label(metric),
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
    The factors are those recorded at the run's thresholds; ``sensitivity`` compares
    the rules at thresholds calibrated on the healthy steps (:func:`sensitivity_payload`).
    """
    with view.lock:
        if not len(view.steps):
            raise KeyError("the run has no steps yet")
        row = view.row_at(step)
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
            "metric_labels": [vocab.label(m) for m in view.layer_metrics],
            "layers": view.layers,
            "values": [[_cleanse(float(v)) for v in r] for r in table],
            "series": series,
            "events": _events_at(view.events, at),
            "thresholds": _cleanse(view.meta.get("thresholds")),
            "sensitivity": sensitivity_payload(view),
        }


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
    pick = np.nanargmin if vocab.reduce_of(metric) == "min" else np.nanargmax
    return i0 + int(pick(values))


def _clean_events(events: list[dict]) -> list[dict]:
    """Divergence events as plain JSON (non-finite floats as strings), sorted by onset; the
    recovery ladder's events (``ACTION_KINDS``) are left out (``/summary``'s ``recovery``),
    and so are the evaluations."""
    skip = (*ACTION_KINDS, EVALUATION_KIND)
    episodes = [e for e in events if e.get("kind") not in skip]
    cleaned = [{k: _cleanse(v) for k, v in e.items()} for e in episodes]

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
