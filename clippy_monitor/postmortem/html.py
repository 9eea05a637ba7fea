"""A self-contained HTML post-mortem: plotly.js inlined, no network needed to open it.

Sections, after the verdict (paper 2.1):

1. the loss and the task losses with step-a/b/c marked (Figure 4a), and what the
   recovery ladder did: rollbacks, skipped steps, giving up (marked on the plot, then
   a "Recovery" section; ``clippy_monitor.recovered``); for a run recorded with
   ``sharpness_every``, the sharpness at the probed steps with the line at 2
   (``clippy_monitor.sharpness_reading``);
2. how each rule reacts at step-b with thresholds calibrated on the run's healthy
   steps (``clippy_monitor.sensitivity``: jump ratios, calibrated factors; Figure 4b),
   then the recorded factors of GC, AGC and Clippy at the paper's thresholds, log
   scale (Figure 4b right, appendix B Figure 7);
3. the culprit table (layers ranked by how early and how far they left their baseline);
4. per-layer heatmaps, layers x steps, log colour scale, around the event at full
   resolution and over the whole run downsampled with :mod:`clippy_monitor.display`
   (max per bucket for norms, min for factors, so no spike disappears).
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from clippy_monitor import catalog
from clippy_monitor.catalog import KIND_COLORS, Metric
from clippy_monitor.display import (
    bucket_max,
    bucket_min,
    bucket_starts,
    hline,
    minmax_envelope,
    nullable,
    vline,
)
from clippy_monitor.postmortem.report import (
    REACTION_HEADER,
    REPLAY_HEADER,
    ROLLBACK_HEADER,
    after_line,
    fixed_thresholds_text,
    gave_up_line,
    reaction_layer_rows,
    reaction_rows,
    replay_rows,
    rollback_rows,
    sharpness_line,
    skipped_line,
)
from clippy_monitor.record import Run
from clippy_monitor.record.protect import record_file_at, write_text_atomic
from clippy_monitor.sharpness_reading import COLORS, PRECONDITIONED, SHARPNESS, THRESHOLD

_KIND_ORDER = {"measurement": 0, "factor": 1}  # then every other kind


def heatmap_metrics() -> list[Metric]:
    """The catalog's shown metrics, one heatmap each: measurements, then factors, then the
    rest, Clippy's first within each (the paper's subject), otherwise in catalog order."""
    shown = [m for m in catalog.metrics() if m.shown]
    return sorted(shown, key=lambda m: (_KIND_ORDER.get(m.kind, 2), not catalog.is_clippys(m.name)))


def is_zoomed(metric: Metric) -> bool:
    """Also drawn at full resolution around the event: the measurements and Clippy's factor."""
    return metric.kind == "measurement" or (
        metric.kind == "factor" and catalog.is_clippys(metric.name)
    )


# --------------------------------------------------------------------------
# Data helpers
# --------------------------------------------------------------------------
def _log_matrix(values: np.ndarray) -> np.ndarray:
    """log10 of finite values; zeros and negatives at the smallest positive value (the bottom
    of the colour scale: a dead layer's ‖g‖₂ = 0 must show, not vanish); NaN/inf stay NaN."""
    finite = np.isfinite(values)
    positive = values[finite & (values > 0)]
    floor = positive.min() if positive.size else 1.0
    with np.errstate(all="ignore"):
        return np.where(finite, np.log10(np.maximum(np.where(finite, values, 1.0), floor)), np.nan)


def _moment_marks(
    moments: Mapping[str, int | None], y_label: bool = True
) -> tuple[list[dict], list[dict]]:
    """Plotly shapes (dashed vertical lines) and annotations for step-a/b/c."""
    shapes, notes = [], []
    for name, step in moments.items():
        if step is None:
            continue
        color = catalog.moment(name).color
        shapes.append(vline(step, color, dash="dash"))
        if y_label:
            anchor = "right" if name == "step_a" else "left"  # a and b are often adjacent steps
            notes.append(
                {
                    "x": step,
                    "y": 1.0,
                    "xref": "x",
                    "yref": "paper",
                    "yanchor": "bottom",
                    "xanchor": anchor,
                    "text": f" {catalog.moment(name).label} ",
                    "showarrow": False,
                    "font": {"color": color, "size": 11},
                }
            )
    return shapes, notes


def _event_bands(events: Sequence[Mapping[str, Any]], limit: int = 200) -> list[dict]:
    """Light bands over each event's abnormal span (micro: step-b..recovered; full: step-b..step-c)."""
    bands = []
    for e in events[:limit]:
        start = e.get("step_b")
        end = e.get("recovered") if e["kind"] == "micro" else e.get("step_c")
        if start is None:
            continue
        color = "#ffcc80" if e["kind"] == "micro" else "#ef9a9a"
        bands.append(
            {
                "type": "rect",
                "xref": "x",
                "yref": "paper",
                "x0": start,
                "x1": end if end is not None else start,
                "y0": 0,
                "y1": 1,
                "fillcolor": color,
                "opacity": 0.35,
                "line": {"width": 0},
                "layer": "below",
            }
        )
    return bands


def _vline(step: int, color: str, dash: str = "solid") -> dict:
    """A vertical line at ``step`` across the plot."""
    return vline(step, color, width=2, dash=dash)


def _inside_label(step: int, text: str, color: str, y: float, span: Sequence[int]) -> dict:
    """A label beside ``step`` inside the top of the plot (step-a/b/c sit above it): to its
    right, or to its left in the last fifth of the x range ``span`` so it is not cut off."""
    first, last = span
    right_edge = step > first + 0.8 * (last - first)
    return {
        "x": step,
        "y": y,
        "xref": "x",
        "yref": "paper",
        "yanchor": "top",
        "xanchor": "right" if right_edge else "left",
        "text": f" {text} ",
        "showarrow": False,
        "bgcolor": "rgba(255,255,255,0.8)",
        "font": {"color": color, "size": 11},
    }


def _recovery_marks(
    recovery: Mapping | None, steps: np.ndarray, limit: int = 200
) -> tuple[list[dict], list[dict]]:
    """Shapes and labels of the recovery ladder on a plot of ``steps``: per rollback a line
    at the step it acted (``rollback -> <snapshot step>``) over a light band of the discarded
    steps; a dotted line where it gave up."""
    if recovery is None or not len(steps):
        return [], []
    span = (int(steps[0]), int(steps[-1]))
    color = KIND_COLORS["rollback"]
    shapes, notes = [], []
    for r in recovery["rollbacks"][:limit]:
        shapes.append(
            {
                "type": "rect",
                "xref": "x",
                "yref": "paper",
                "x0": r["snapshot_step"],
                "x1": r["step"],
                "y0": 0,
                "y1": 1,
                "fillcolor": color,
                "opacity": 0.1,
                "line": {"width": 0},
                "layer": "below",
            }
        )
        shapes.append(_vline(r["step"], color))
        notes.append(
            _inside_label(r["step"], f"rollback -> {r['snapshot_step']}", color, 0.98, span)
        )
    gave_up = recovery["gave_up"]
    if gave_up is not None:
        shapes.append(_vline(gave_up["step"], KIND_COLORS["gave_up"], "dot"))
        notes.append(_inside_label(gave_up["step"], "gave up", KIND_COLORS["gave_up"], 0.9, span))
    return shapes, notes


def _skipped_trace(recovery: Mapping | None, steps: np.ndarray, max_points: int) -> dict | None:
    """Markers along the bottom of the loss plot at the steps whose update was skipped."""
    if recovery is None or not recovery["skipped_steps"] or not len(steps):
        return None
    skipped = np.asarray(recovery["skipped_steps"], np.int64)
    skipped = skipped[(skipped >= steps[0]) & (skipped <= steps[-1])]
    if not len(skipped):
        return None
    shown = skipped[bucket_starts(len(skipped), max_points)]
    return {
        "type": "scatter",
        "mode": "markers",
        "name": f"skipped step ({len(skipped)})",
        "x": shown.tolist(),
        "y": [0.03] * len(shown),
        "yaxis": "y2",
        "marker": {"symbol": "triangle-up", "color": KIND_COLORS["skipped"], "size": 9},
        "hovertemplate": "step %{x}: update skipped<extra></extra>",
    }


def _loss_figure(run: Run, report: Mapping, rows: slice, max_points: int, title: str) -> dict:
    names = [n for n in run.series_names if n == "loss" or n.startswith("loss/")]
    steps = run.steps[rows]
    traces, positive = [], True
    for name in names:
        xs, ys = minmax_envelope(steps, np.asarray(run.series(name)[rows], np.float64), max_points)
        finite = ys[np.isfinite(ys)]
        positive &= bool(finite.size == 0 or finite.min() > 0)
        traces.append(
            {
                "type": "scattergl" if len(xs) > 2000 else "scatter",
                "mode": "lines",
                "name": "total loss" if name == "loss" else name[5:],
                "x": xs.tolist(),
                "y": nullable(ys, 5),
                "line": {"width": 2.2 if name == "loss" else 1.2},
            }
        )
    if "loss" in names:
        bad = steps[~np.isfinite(run.series("loss")[rows])]
        if len(bad):
            bad = bad[bucket_starts(len(bad), max_points)]
            traces.append(
                {
                    "type": "scatter",
                    "mode": "markers",
                    "name": "non-finite loss",
                    "x": bad.tolist(),
                    "y": [1.0] * len(bad),
                    "yaxis": "y2",
                    "marker": {"symbol": "x", "color": "#d50000", "size": 7},
                }
            )
    skipped = _skipped_trace(report.get("recovery"), steps, max_points)
    if skipped is not None:
        traces.append(skipped)
    shapes, notes = _moment_marks(report["moments"])
    ladder_shapes, ladder_notes = _recovery_marks(report.get("recovery"), steps)
    layout = {
        "title": {"text": title, "x": 0, "font": {"size": 15}},
        "height": 360,
        "margin": {"l": 70, "r": 20, "t": 50, "b": 45},
        "xaxis": {
            "title": {"text": "step"},
            "range": [int(steps[0]), int(steps[-1])] if len(steps) else None,
        },
        "yaxis": {"title": {"text": "loss"}, "type": "log" if positive else "linear"},
        "yaxis2": {"overlaying": "y", "range": [0, 1.05], "visible": False, "fixedrange": True},
        "shapes": _event_bands(report["events"]) + ladder_shapes + shapes,
        "annotations": notes + ladder_notes,
        "legend": {"orientation": "h", "y": -0.22},
    }
    return {"data": traces, "layout": layout}


def _probed_trace(run: Run, name: str, axis: str, color: str, max_points: int) -> dict | None:
    """Markers and lines through the probed (not NaN) steps of series ``name``."""
    values = np.asarray(run.series(name), np.float64)
    probed = ~np.isnan(values)
    if not probed.any():
        return None
    xs, ys = minmax_envelope(run.steps[probed], values[probed], max_points)
    return {
        "type": "scatter",
        "mode": "lines+markers",
        "name": name.replace("_", " "),
        "x": xs.tolist(),
        "y": nullable(ys, 5),
        "yaxis": axis,
        "line": {"color": color, "width": 1.5},
        "marker": {"size": 5, "color": color},
    }


def _sharpness_figure(run: Run, report: Mapping, max_points: int) -> dict | None:
    """Preconditioned sharpness (left axis, a line at 2) and sharpness (right axis) at the
    probed steps, step-a/b/c marked; None when the record has neither series."""
    if PRECONDITIONED not in run.series_names and SHARPNESS not in run.series_names:
        return None
    traces = [
        _probed_trace(run, name, axis, color, max_points)
        for name, axis, color in (
            (PRECONDITIONED, "y", COLORS[PRECONDITIONED]),
            (SHARPNESS, "y2", COLORS[SHARPNESS]),
        )
        if name in run.series_names
    ]
    scales = {
        t["yaxis"]: "log" if all(v is None or v > 0 for v in t["y"]) else "linear"
        for t in traces
        if t is not None
    }
    scale = scales.get("y", "log")
    shapes, notes = _moment_marks(report["moments"])
    line = hline(THRESHOLD, COLORS[PRECONDITIONED], width=None, dash="dot")
    at = math.log10(THRESHOLD) if scale == "log" else THRESHOLD  # annotations: log10 on a log axis
    label = {"x": 0, "y": at, "xref": "paper", "yref": "y", "showarrow": False}
    label |= {"text": f" {THRESHOLD:g}: stability limit ", "xanchor": "left", "yanchor": "bottom"}
    layout = {
        "title": {"text": "Sharpness at the probed steps", "x": 0, "font": {"size": 15}},
        "height": 320,
        "margin": {"l": 70, "r": 70, "t": 50, "b": 45},
        "xaxis": {"title": {"text": "step"}, "range": [int(run.steps[0]), int(run.steps[-1])]},
        "yaxis": {"title": {"text": "preconditioned sharpness"}, "type": scale},
        "yaxis2": {
            "title": {"text": "sharpness"},
            "overlaying": "y",
            "side": "right",
            "type": scales.get("y2", "log"),
        },
        "shapes": [*shapes, line],
        "annotations": [*notes, label],
        "legend": {"orientation": "h", "y": -0.25},
    }
    return {"data": [t for t in traces if t is not None], "layout": layout}


def _factor_figure(
    report: Mapping, factors: Mapping[str, Mapping[str, Any]], title: str, max_layers: int = 48
) -> dict | None:
    """GC's, AGC's and Clippy's factor per layer (``{layer: {rule: σ}}``), layers in culprit order."""
    if not factors:
        return None
    order = [d["name"] for d in report["layer_departures"] if d["name"] in factors] or list(factors)
    order = order[:max_layers]
    traces = [
        {
            "type": "bar",
            "name": rule.label,
            "x": order,
            "y": [factors[n].get(rule.name) for n in order],
            "marker": {"color": rule.color},
        }
        for rule in map(catalog.rule, catalog.figure_4b_rules())
    ]
    layout = {
        "title": {"text": title, "x": 0, "font": {"size": 15}},
        "barmode": "group",
        "height": 420,
        "margin": {"l": 70, "r": 20, "t": 50, "b": 150},
        "yaxis": {"type": "log", "title": {"text": "factor σ"}, "exponentformat": "power"},
        "xaxis": {"tickangle": -40, "automargin": True},
        "legend": {"orientation": "h", "y": 1.08, "x": 1, "xanchor": "right"},
    }
    return {"data": traces, "layout": layout}


def _calibrated_factors(report: Mapping) -> dict[str, dict[str, Any]]:
    """``{layer: {rule: calibrated σ at step-b}}`` from ``sensitivity_at_step_b`` ({} without one)."""
    s = report.get("sensitivity_at_step_b")
    if not s or not s["rules"]:
        return {}
    return {
        layer: {rule: x["factor"] for rule, x in rules.items()}
        for layer, rules in s["layers"].items()
    }


def _factor_figures(report: Mapping) -> list[tuple[str, dict]]:
    """The calibrated factors at step-b, then those at the recorded (the paper's) thresholds."""
    b = report["moments"]["step_b"]
    calibrated = _factor_figure(
        report,
        _calibrated_factors(report),
        f"σ at step-b ({b}), thresholds calibrated on this run's healthy steps — smaller clips harder",
    )
    fixed = _factor_figure(
        report,
        report["factors_at_step_b"],
        f"σ at step-b ({b}) at the paper's thresholds — smaller clips harder",
    )
    pairs = [("calibrated_factors", calibrated), ("factors", fixed)]
    return [(name, fig) for name, fig in pairs if fig is not None]


@dataclasses.dataclass(frozen=True)
class HeatmapGrid:
    """One layer metric over a row window, bucketed into heatmap columns."""

    z: np.ndarray  # [layers, columns]: the bucket's max or min, log10 where log-scaled
    x: np.ndarray  # [columns]: the first step of each bucket
    broken: np.ndarray  # [layers, columns]: True where the bucket holds a NaN/inf
    n_steps: int  # steps in the window (more than columns when bucketed)


def _heatmap_grid(
    run: Run, metric: str, reduce: str, log: bool, rows: slice, max_columns: int
) -> HeatmapGrid:
    """Bucket ``metric`` over ``rows`` into at most ``max_columns`` columns (max or min per
    bucket, :mod:`clippy_monitor.display`), NaN/inf cells marked apart."""
    values = run.layer(metric)[rows]  # [steps, layers]
    steps = run.steps[rows]
    reducer = bucket_max if reduce == "max" else bucket_min
    starts = bucket_starts(len(steps), max_columns)
    z = np.asarray(reducer(values, max_columns, axis=0), np.float64).T  # [layers, buckets]
    broken = ~np.isfinite(values)
    broken = (
        np.logical_or.reduceat(broken, starts, axis=0) if len(starts) < len(steps) else broken
    ).T
    z = _log_matrix(z) if log else np.where(np.isfinite(z), z, np.nan)
    return HeatmapGrid(z=z, x=steps[starts], broken=broken, n_steps=len(steps))


def _colorbar(z: np.ndarray, log: bool) -> dict[str, Any]:
    """The colour bar; a log scale gets ticks labelled ``1eN`` at whole powers of ten."""
    finite = z[np.isfinite(z)]
    colorbar: dict[str, Any] = {"thickness": 12, "len": 0.95}
    if log and finite.size:
        lo, hi = math.floor(finite.min()), math.ceil(finite.max())
        step = max(1, (hi - lo) // 6)
        ticks = list(range(lo, hi + 1, step))
        colorbar |= {"tickvals": ticks, "ticktext": [f"1e{t}" for t in ticks]}
    return colorbar


def _heatmap_traces(run: Run, grid: HeatmapGrid, reduce: str, log: bool) -> list[dict]:
    """The values trace, then the NaN/inf cells (if any) in a fixed colour on top."""
    trace = {
        "type": "heatmap",
        "z": nullable(grid.z, 4),
        "x": grid.x.tolist(),
        "y": list(run.layers),
        "colorscale": "Viridis",
        "reversescale": reduce == "min",
        "colorbar": _colorbar(grid.z, log),
        "hovertemplate": "step %{x}<br>%{y}<br>"
        + ("log10 = %{z:.2f}" if log else "%{z:.3f}")
        + "<extra></extra>",
        "zsmooth": False,
    }
    if not log:
        trace |= {"zmin": 0.0, "zmax": 1.0}
    if not grid.broken.any():
        return [trace]
    # A fixed colour so that NaN/inf cells cannot pass for "no data".
    broken = {
        "type": "heatmap",
        "z": np.where(grid.broken, 1.0, None).tolist(),
        "x": grid.x.tolist(),
        "y": list(run.layers),
        "colorscale": [[0, "#ff1744"], [1, "#ff1744"]],
        "showscale": False,
        "hovertemplate": "step %{x}<br>%{y}<br>non-finite<extra></extra>",
        "zsmooth": False,
    }
    return [trace, broken]


def _heatmap_title(title: str, reduce: str, log: bool, grid: HeatmapGrid) -> str:
    """``title`` with its colour scale, bucketing and NaN/inf colour spelled out."""
    bucket = (
        ""
        if len(grid.x) == grid.n_steps
        else f", {reduce} over buckets of ~{grid.n_steps / len(grid.x):.0f} steps"
    )
    return (
        f"{title}{' — log colour scale, 0 at the bottom' if log else ''}{bucket}"
        f"{'; red: NaN/inf' if grid.broken.any() else ''}"
    )


def _heatmap_figure(
    run: Run,
    metric: str,
    title: str,
    reduce: str,
    log: bool,
    rows: slice,
    max_columns: int,
    moments: Mapping[str, int | None],
) -> dict | None:
    """A layers x steps heatmap of ``metric`` over ``rows``, step-a/b/c marked; None if the
    record lacks the metric or the window is empty."""
    if metric not in run.layer_metrics or rows.stop <= rows.start:
        return None
    grid = _heatmap_grid(run, metric, reduce, log, rows, max_columns)
    shapes, _ = _moment_marks(moments, y_label=False)
    layout = {
        "title": {
            "text": _heatmap_title(title, reduce, log, grid),
            "x": 0,
            "font": {"size": 14},
        },
        "height": max(220, 16 * len(run.layers) + 90),
        "margin": {"l": 60, "r": 20, "t": 40, "b": 40},
        "xaxis": {"title": {"text": "step"}},
        "yaxis": {"automargin": True, "autorange": "reversed", "tickfont": {"size": 10}},
        "shapes": shapes,
    }
    return {"data": _heatmap_traces(run, grid, reduce, log), "layout": layout}


# --------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------
def _fmt(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, str):
        return html.escape(x)
    return f"{x:.3g}"


def _verdict_kind(verdict: str) -> str:
    return verdict.split(":", 1)[0].split(" ")[0] if verdict else "no data"


def _culprit_table(report: Mapping, max_rows: int = 64) -> str:
    table, factors = report["table"], report["factors_at_step_b"]
    dead = report["dead_units"]
    before = (dead.get("before") or {}).get("by_layer", {})
    after = (dead.get("after") or {}).get("by_layer", {})
    culprits = set(report["culprits"])
    head = (
        "<tr><th>#</th><th>layer</th><th>left at</th><th>first by</th><th>max |z|</th>"
        "<th>‖g‖₂ a → b → c</th><th>‖g‖₂/‖w‖₂ b</th><th>‖r/w‖∞ b</th>"
        "<th>GC b</th><th>AGC b</th><th>Clippy b</th><th>Clippy/GC</th><th>Clippy/AGC</th>"
        "<th>dead before → after</th></tr>"
    )
    body = []
    for i, d in enumerate(report["layer_departures"][:max_rows]):
        name = d["name"]
        t = table.get(name, {})
        g = " → ".join(
            _fmt((t.get(m) or {}).get("grad_norm")) for m in ("step_a", "step_b", "step_c")
        )
        b = t.get("step_b") or {}
        f = factors.get(name, {})
        cls = ' class="culprit"' if name in culprits else ""
        body.append(
            f"<tr{cls}><td>{i + 1}</td><td class='name'>{html.escape(name)}</td><td>{_fmt(d['departed_at'])}</td>"
            f"<td>{_fmt(catalog.label(d['metric']))}</td><td>{_fmt(d['max_z'])}</td><td>{g}</td>"
            f"<td>{_fmt(b.get('grad_weight_ratio'))}</td><td>{_fmt(b.get('update_weight_linf'))}</td>"
            f"<td>{_fmt(f.get('gc'))}</td><td>{_fmt(f.get('agc'))}</td><td>{_fmt(f.get('clippy'))}</td>"
            f"<td>{_fmt(f.get('clippy_over_gc'))}</td><td>{_fmt(f.get('clippy_over_agc'))}</td>"
            f"<td>{_fmt(before.get(name))} → {_fmt(after.get(name))}</td></tr>"
        )
    if not body:
        return "<p class='muted'>No event to explain: no culprit table.</p>"
    return f"<table class='culprits'><thead>{head}</thead><tbody>{''.join(body)}</tbody></table>"


def _events_table(
    events: Sequence[Mapping[str, Any]], focus: int | None, max_rows: int = 50
) -> str:
    if not events:
        return "<p class='muted'>No divergence events.</p>"
    rows = []
    for i, e in enumerate(events[:max_rows]):
        cls = ' class="focus"' if i == focus else ""
        task = e["task"] or e["series"]  # an auc_collapse names its metric, not a task
        rows.append(
            f"<tr{cls}><td>{i}</td><td>{html.escape(e['kind'])}</td><td>{_fmt(e['step_a'])}</td><td>{_fmt(e['step_b'])}</td>"
            f"<td>{_fmt(e['step_c'])}</td><td>{_fmt(e.get('decided_at'))}</td><td>{_fmt(e['recovered'])}</td><td>{_fmt(task)}</td><td>{_fmt(e['reason'])}</td></tr>"
        )
    more = (
        f"<p class='muted'>… and {len(events) - max_rows} more (see --json)</p>"
        if len(events) > max_rows
        else ""
    )
    return (
        "<table class='events'><thead><tr><th>#</th><th>kind</th><th>step-a</th><th>step-b</th><th>step-c</th>"
        "<th title='the step the detector declared the full divergence'>decided</th>"
        f"<th>recovered</th><th>task</th><th>reason</th></tr></thead><tbody>{''.join(rows)}</tbody></table>{more}"
    )


_CSS = """
body {
  font-family: -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif;
  margin: 0; color: #212121; background: #fafafa;
}
main { max-width: 1280px; margin: 0 auto; padding: 18px 24px 40px; }
h1 { font-size: 22px; margin: 4px 0 2px; }
h2 { font-size: 17px; margin: 26px 0 8px; border-bottom: 1px solid #e0e0e0; padding-bottom: 4px; }
.meta { color: #616161; font-size: 13px; margin-bottom: 10px; word-break: break-all; }
.verdict {
  border-left: 6px solid var(--kind); background: white; padding: 10px 14px;
  font-size: 15px; line-height: 1.45; box-shadow: 0 1px 2px rgba(0,0,0,.08);
}
.verdict b { color: var(--kind); }
.warning { background: #fff8e1; border-left: 6px solid #f9a825; padding: 8px 12px; margin-top: 10px; font-size: 13px; }
.plot { background: white; margin: 10px 0; box-shadow: 0 1px 2px rgba(0,0,0,.08); }
table { border-collapse: collapse; font-size: 12px; background: white; box-shadow: 0 1px 2px rgba(0,0,0,.08); }
th, td { padding: 3px 6px; border-bottom: 1px solid #eeeeee; text-align: right; white-space: nowrap; }
th { background: #f5f5f5; position: sticky; top: 0; }
td.name { text-align: left; font-family: ui-monospace, Menlo, Consolas, monospace; }
tr.culprit td.name { font-weight: 600; color: #b71c1c; } tr.focus { background: #fff3e0; }
.tablewrap { overflow-x: auto; max-height: 560px; } .muted { color: #757575; font-size: 13px; }
.recovery p { margin: 6px 0; font-size: 14px; } .recovery .summary { font-size: 15px; }
table.rollbacks td:last-child { text-align: left; }
p.reaction { font-size: 14px; line-height: 1.45; } table.reactions { margin: 8px 0; }
.grid { display: grid; grid-template-columns: 1fr 1fr; gap: 0 14px; }
@media (max-width: 1000px) { .grid { grid-template-columns: 1fr; } }
"""


def _zoom_rows(run: Run, report: Mapping[str, Any]) -> slice | None:
    """The rows around the focused event (its baseline to its last window), or None:
    no event, or a zoom covering most of the run (the whole run then says it)."""
    windows = report["windows"]
    if report["focus"] is None or not windows["baseline"]:
        return None
    start = int(np.searchsorted(run.steps, windows["baseline"][0]))
    last = (windows["after"] or windows["scan"] or windows["baseline"])[1]
    stop = int(np.searchsorted(run.steps, last, side="right"))
    return slice(start, stop) if stop - start < 0.6 * len(run) else None


def _figures(
    run: Run, report: Mapping[str, Any], zoom_rows: slice | None, max_points: int, max_columns: int
) -> list[tuple[str, dict]]:
    """``(id, plotly figure)`` of every plot of the page: loss, factors, zoom, whole run."""
    figures: list[tuple[str, dict]] = []
    whole = slice(0, len(run))
    moments = report["moments"]
    if len(run):
        figures.append(
            (
                "loss",
                _loss_figure(
                    run,
                    report,
                    whole,
                    max_points,
                    "Training loss and task losses (min/max envelope)",
                ),
            )
        )
    sharpness = _sharpness_figure(run, report, max_points) if len(run) else None
    if sharpness is not None:
        figures.append(("sharpness", sharpness))
    figures.extend(_factor_figures(report))
    if zoom_rows is not None:
        steps = f"{run.steps[zoom_rows.start]}..{run.steps[zoom_rows.stop - 1]}"
        figures.append(
            (
                "zoom_loss",
                _loss_figure(
                    run, report, zoom_rows, max_points, f"Around the event: steps {steps}"
                ),
            )
        )
        for m in filter(is_zoomed, heatmap_metrics()):
            fig = _heatmap_figure(
                run, m.name, m.heading, m.reduce, m.log_scale, zoom_rows, max_columns, moments
            )
            if fig is not None:
                figures.append((f"zoom_{m.name}", fig))
    for m in heatmap_metrics():
        fig = _heatmap_figure(
            run, m.name, m.heading, m.reduce, m.log_scale, whole, max_columns, moments
        )
        if fig is not None:
            figures.append((f"whole_{m.name}", fig))
    return figures


def _skipped_html(skipped: Sequence[str]) -> str:
    """A warning listing the unreadable parts of the record, or "" when all was read."""
    if not skipped:
        return ""
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in skipped)
    return (
        "<div class='warning'><b>Parts of the record could not be read and were skipped</b>; "
        f"the analysis covers the readable steps.<ul>{notes}</ul></div>"
    )


def _plot_div(name: str) -> str:
    """The placeholder that the page's script draws figure ``name`` into."""
    return f"<div class='plot' id='plot_{name}'></div>"


def _page_title(report: Mapping[str, Any]) -> str:
    """``clippy-monitor post-mortem — <run directory name>`` (not yet HTML-escaped)."""
    return (
        "clippy-monitor post-mortem — "
        f"{os.path.basename(str(report['run']).rstrip('/')) or report['run']}"
    )


def _meta_html(report: Mapping[str, Any]) -> str:
    """The line under the title: run path, steps, layers, tasks and where the events came from."""
    return (
        f"{html.escape(str(report['run']))} · {report['steps']} steps "
        f"({_fmt(report['first_step'])}..{_fmt(report['last_step'])}) · "
        f"{len(report['layers'])} layers · "
        f"tasks: {html.escape(', '.join(report['tasks']) or '–')} · "
        f"events: {report['events_source']}"
    )


def _verdict_color(report: Mapping[str, Any]) -> str:
    """The verdict's kind colour; a run the recovery ladder gave up on or recovered by
    rollback takes the ladder's ``gave_up`` / ``rollback`` colour."""
    recovery = report.get("recovery")
    if recovery is not None and recovery["gave_up"] is not None:
        return KIND_COLORS["gave_up"]
    if recovery is not None and recovery["stayed_healthy"]:
        return KIND_COLORS["rollback"]
    return KIND_COLORS.get(_verdict_kind(report["verdict"]), KIND_COLORS["full"])


def _recovery_html(report: Mapping[str, Any]) -> str:
    """The "Recovery" section: what the ladder did; "" when the run was recorded without it."""
    rec = report.get("recovery")
    if rec is None:
        return ""
    kind = "gave_up" if rec["gave_up"] else "rollback" if rec["rollbacks"] else "skipped"
    parts = [
        f"<p class='summary' style='color: {KIND_COLORS[kind]}'><b>{html.escape(rec['summary'])}</b></p>"
    ]
    skipped = skipped_line(rec)
    if skipped:
        parts.append(f"<p><b>Skipped steps</b> (update not applied): {html.escape(skipped)}</p>")
    if rec["rollbacks"]:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in ROLLBACK_HEADER)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
            for row in rollback_rows(rec)
        )
        parts.append(
            "<p><b>Rollbacks</b> (the diverged steps stay in the record):</p>"
            f"<table class='rollbacks'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        )
        after = after_line(rec, report["last_step"])
        if after:
            parts.append(f"<p><b>After the last rollback:</b> {html.escape(after)}</p>")
    gave_up = gave_up_line(rec)
    if gave_up:
        parts.append(f"<div class='warning gave-up'><b>Gave up</b> {html.escape(gave_up)}</div>")
    return f"<h2>Recovery</h2><div class='recovery'>{''.join(parts)}</div>"


def _replays_html(report: Mapping[str, Any]) -> str:
    """The "Replays" section (``clippy_monitor.replay_reading``), or "" without replays."""
    replays = report.get("replays")
    if not replays:
        return ""
    verdicts = "".join(
        f"<p style='color: {KIND_COLORS['full' if r['diverged'] else 'healthy']}'>"
        f"<b>{html.escape(r['verdict'])}</b></p>"
        for r in replays
    )
    head = "".join(f"<th>{html.escape(h)}</th>" for h in REPLAY_HEADER)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
        for row in replay_rows(report)
    )
    return (
        "<h2>Replays: the divergence trained again from the snapshot before step-a</h2>"
        f"<div class='replays'>{verdicts}<table class='replays'><thead><tr>{head}</tr></thead>"
        f"<tbody>{body}</tbody></table></div>"
    )


def _verdict_html(report: Mapping[str, Any]) -> str:
    """The verdict box, coloured by its kind, the words before the first colon in bold."""
    color = _verdict_color(report)
    head, _, rest = report["verdict"].partition(":")
    return (
        f'<div class="verdict" style="--kind: {color}"><b>{html.escape(head)}</b>'
        f"{':' if rest else ''}{html.escape(rest)}</div>"
    )


def _sharpness_html(report: Mapping[str, Any], ids: Sequence[str]) -> str:
    """The "Sharpness" section (the post-mortem's reading, then the plot), or ""."""
    if "sharpness" not in ids:
        return ""
    line = sharpness_line(report) or ""
    return f"<h2>Sharpness</h2><p class='sharpness'>{html.escape(line)}</p>{_plot_div('sharpness')}"


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str) -> str:
    """A plain table of strings (escaped); the first column is a name."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f"<td{' class=name' if i == 0 else ''}>{html.escape(c)}</td>" for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table class='{cls}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _reaction_html(report: Mapping[str, Any], ids: Sequence[str], max_layers: int = 24) -> str:
    """The calibrated comparison at step-b (Figure 4b: sensitivity): sentence, per-rule table,
    bars, per-layer table; a line saying why there is none."""
    s = report.get("sensitivity_at_step_b")
    if not s:
        return "<p class='muted'>No step-b: nothing to compare.</p>"
    parts = [f"<p class='reaction'><b>{html.escape(s['text'])}</b></p>"]
    if s["rules"]:
        parts.append(
            "<p class='muted'>Per rule and layer, the threshold is the "
            f"{s['quantile']:.0%} quantile of the rule's measurement on the healthy steps "
            f"{s['healthy_steps'][0]}..{s['healthy_steps'][1]}; jump = the measurement at step-b "
            "over its healthy median. Each rule is shown on the layer it clips hardest.</p>"
        )
        parts.append(_html_table(REACTION_HEADER, reaction_rows(s), "reactions"))
        if "calibrated_factors" in ids:
            parts.append(_plot_div("calibrated_factors"))
        order = [d["name"] for d in report["layer_departures"]] or list(s["layers"])
        header, rows = reaction_layer_rows(s, order, max_layers)
        parts.append(f"<div class='tablewrap'>{_html_table(header, rows, 'reactions')}</div>")
    return "".join(parts)


def _fixed_html(report: Mapping[str, Any], ids: Sequence[str]) -> str:
    """The recorded factors at the paper's (the run's) thresholds, labelled as such."""
    if "factors" not in ids:
        return "<p class='muted'>No step-b: nothing to compare.</p>"
    return (
        "<p class='muted'>The factors the monitor recorded at the thresholds stored with the run "
        f"({html.escape(fixed_thresholds_text(report.get('thresholds')))}): what each rule would do "
        "if you trained with those thresholds. They are not a sensitivity comparison: a threshold "
        "that already clips healthy steps hard also clips hard at step-b.</p>"
        + _plot_div("factors")
    )


def _zoom_html(ids: Sequence[str], zoom_rows: slice | None) -> str:
    """The "around the event" section (its loss, then a grid of heatmaps), or "" without one."""
    if zoom_rows is None:
        return ""
    return (
        "<h2>Around the event (full resolution)</h2>"
        + _plot_div("zoom_loss")
        + "<div class='grid'>"
        + "".join(_plot_div(i) for i in ids if i.startswith("zoom_") and i != "zoom_loss")
        + "</div>"
    )


def render_html(
    run: Run, report: Mapping[str, Any], *, max_points: int = 4000, max_columns: int = 800
) -> str:
    """The report page as one HTML string (plotly.js inlined from the installed plotly package)."""
    from plotly.offline import get_plotlyjs

    zoom_rows = _zoom_rows(run, report)
    figures = _figures(run, report, zoom_rows, max_points, max_columns)
    ids = [name for name, _ in figures]
    whole_html = "".join(_plot_div(i) for i in ids if i.startswith("whole_"))
    payload = json.dumps({name: fig for name, fig in figures}, allow_nan=False).replace(
        "</", "<\\/"
    )
    title = _page_title(report)
    loss_html = _plot_div("loss") if "loss" in ids else "<p class='muted'>No steps.</p>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_CSS}</style>
<script>{get_plotlyjs()}</script>
</head><body><main>
<h1>{html.escape(title)}</h1>
<div class="meta">{_meta_html(report)}</div>
{_verdict_html(report)}
{_skipped_html(report["skipped"])}
<h2>Loss</h2>{loss_html}
{_sharpness_html(report, ids)}
{_recovery_html(report)}
{_replays_html(report)}
<h2>Events</h2><div class="tablewrap">{_events_table(report["events"], report["focus"])}</div>
<h2>How each rule reacts at step-b, thresholds calibrated on this run's healthy steps</h2>
{_reaction_html(report, ids)}
<h2>At the paper's thresholds, as you would train with them: factors at step-b</h2>
{_fixed_html(report, ids)}
<h2>Culprits: layers ranked by how early and how far they left their own baseline</h2>
<div class="tablewrap">{_culprit_table(report)}</div>
{_zoom_html(ids, zoom_rows)}
<h2>Per-layer statistics over the whole run</h2>{whole_html}
<script>
const FIGURES = {payload};
for (const [name, fig] of Object.entries(FIGURES)) {{
  Plotly.newPlot('plot_' + name, fig.data, fig.layout, {{responsive: true, displaylogo: false}});
}}
</script>
</main></body></html>
"""


def target_problem(path: str | os.PathLike, run: Run) -> str | None:
    """Why the HTML report must not be written to ``path`` (a directory, or a file of a run
    record: :func:`~clippy_monitor.record.protect.record_file_at`), or None."""
    if os.path.isdir(path):
        return f"{path}: is a directory, not a file for the HTML report"
    clash = record_file_at(path, runs=[run.path])
    if clash is not None:
        return f"{path}: refusing to write the HTML report onto {clash}, a file of a run record"
    return None


def write_html(run: Run, report: Mapping[str, Any], path: str | os.PathLike, **kwargs: Any) -> None:
    """Write :func:`render_html` to ``path`` (UTF-8) via a temporary file and a rename;
    ValueError (see :func:`target_problem`) or OSError if it cannot."""
    problem = target_problem(path, run)
    if problem is not None:
        raise ValueError(problem)
    write_text_atomic(path, render_html(run, report, **kwargs))
