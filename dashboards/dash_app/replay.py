"""The Replay view: the rows around one episode and the figures drawn from them (the paper's Figure 4)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from clippy_monitor.dashboards.dash_app.health import task_name
from clippy_monitor.dashboards.dash_app.recovery import (
    rollback_annotations,
    rollback_shapes,
    skip_axis,
    skipped_trace,
    step_note,
)
from clippy_monitor.dashboards.dash_app.runs import LiveRun
from clippy_monitor.dashboards.dash_app.sharpness import (
    SHARPNESS_COLORS,
    ProbedSharpness,
    probed_sharpness,
    sharpness_layout,
    sharpness_trace,
)
from clippy_monitor.dashboards.dash_app.style import (
    DEFAULT_MAX_POINTS,
    LOSS_COLOR,
    MEASUREMENTS,
    METRIC_COLORS,
    MOMENT_COLORS,
    MOMENT_LABELS,
    NEUTRAL_COLOR,
    RECOVERED_COLOR,
    RULE_COLORS,
    RULE_LABELS,
    SHOWN_RULES,
    TASK_COLORS,
    axis,
    empty_figure,
    figure_layout,
    line_trace,
)

from clippy_monitor import catalog as vocab
from clippy_monitor.display import hline, nullable, vline
from clippy_monitor.record.format import FACTOR_METRICS, METRIC_LABELS
from clippy_monitor.recovered import Recovery, read_recovery


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
    recovery: Recovery | None = None  # what the recovery ladder did in the whole run
    sharpness: ProbedSharpness | None = None  # None: recorded without sharpness_every

    def row(self, step: int) -> int:
        return max(int(np.searchsorted(self.steps, step, side="right")) - 1, 0)

    def moments(self) -> dict[str, int | None]:
        e = self.episode
        end = (
            e.get("step_c")
            if e["kind"] == "full"
            else (e.get("recovered") if e["kind"] == "micro" else None)
        )
        return {"step_a": e.get("step_a"), "step_b": e["step_b"], "step_c": end}


def replay_window(live: LiveRun, episode: dict, pad: int | None = None) -> ReplayWindow:
    """The window ``[step-a - pad, step-c + pad]`` (step-c: full divergence; recovery: micro;
    the last step: still open; or the rollback that answered the episode, if later),
    ``pad`` = half the a..c span, at least 10 steps.  Cached per version."""
    if not len(live):
        raise KeyError(f"run {live.name!r} has no steps")
    b = int(episode["step_b"])
    a = episode.get("step_a") if episode.get("step_a") is not None else b - 1
    end = episode.get("step_c") or episode.get("recovered") or int(live.steps[-1])
    recovery = read_recovery(live)
    if recovery is not None and episode.get("step_a") is not None:
        answers = [r.step for r in recovery.rollbacks if r.step_a == episode["step_a"]]
        end = max([int(end), *answers])
    pad = max(10, (int(end) - int(a)) // 2) if pad is None else pad
    first, last = int(live.steps[0]), int(live.steps[-1])
    start, stop = max(first, int(a) - pad), min(last, int(end) + pad)
    return live.cached(
        ("replay", start, stop, episode.get("key")),
        lambda: _replay_window(live, episode, start, stop),
    )


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
        recovery=read_recovery(live),
    )
    window.sharpness = probed_sharpness(live, episode["step_b"], window.start, window.end)
    bars = [m.name for m in bar_metrics()]
    for metric in (*bars, *(FACTOR_METRICS[r] for r in SHOWN_RULES)):
        if metric in live.layer_metrics:
            window.metrics[metric] = live.layer_rows(metric, i0, i1)
    window.norm_range = _log_range([window.metrics[m] for m in bars if m in window.metrics])
    factors = [
        window.metrics[FACTOR_METRICS[r]]
        for r in SHOWN_RULES
        if FACTOR_METRICS[r] in window.metrics
    ]
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
    """The moments at ``step`` ("step-b · step-c" when they share it), or None."""
    labels = [
        MOMENT_LABELS[moment]
        if moment != "step_c" or window.episode["kind"] == "full"
        else "recovered"
        for moment, s in window.moments().items()
        if s is not None and s == step
    ]
    return " · ".join(labels) or None


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
        phase = (
            " — between step-b and step-c"
            if window.episode["kind"] == "full"
            else " — loss above baseline"
        )
    note = step_note(window.recovery, at)
    return f"Step {at:,}{phase}{' · ' + note if note else ''}"


def moment_shapes(window: ReplayWindow, xref: str = "x") -> tuple[list, list]:
    """step-a/b/c (or the recovery of a micro-divergence) as labelled vertical lines;
    moments at the same step (step-b = step-c at a non-finite step) share one label."""
    shapes, annotations = [], []
    full = window.episode["kind"] == "full"
    labelled: dict[int, dict] = {}  # step -> its annotation
    for moment, x in window.moments().items():
        if x is None:
            continue
        label = MOMENT_LABELS[moment] if moment != "step_c" or full else "recovered"
        color = MOMENT_COLORS[moment] if moment != "step_c" or full else RECOVERED_COLOR
        if x in labelled:
            labelled[x]["text"] += f" · {label}"
            continue
        shapes.append(vline(x, color, dash="dot" if moment == "step_a" else "dash", xref=xref))
        # step-a is usually the step just before step-b: its label goes left of its line, step-b's right.
        anchor = {"step_a": "right", "step_b": "left", "step_c": "left"}[moment]
        labelled[x] = {
            "xref": xref,
            "yref": "paper",
            "x": x,
            "y": 1.0,
            "yanchor": "bottom",
            "xanchor": anchor,
            "xshift": -2 if anchor == "right" else 2,
            "text": label,
            "showarrow": False,
            "font": {"size": 11, "color": color},
        }
        annotations.append(labelled[x])
    return shapes, annotations


def replay_loss_figure(
    window: ReplayWindow, step: int, max_points: int = DEFAULT_MAX_POINTS
) -> dict:
    """The loss around the episode (Figure 4a), step-a/b/c marked, a cursor at ``step``;
    the recovery ladder's rollbacks and skipped steps in the window marked as in Live."""
    data = []
    for i, (name, values) in enumerate(window.losses.items()):
        color = LOSS_COLOR if name == "loss" else TASK_COLORS[(i - 1) % len(TASK_COLORS)]
        data.append(
            line_trace(
                window.steps,
                values,
                max_points,
                name="total loss" if name == "loss" else task_name(name),
                line={"color": color, "width": 1.6 if name == "loss" else 1.1},
            )
        )
    shapes, annotations = moment_shapes(window)
    shapes += rollback_shapes(window.recovery, start=window.start, end=window.end)
    annotations += rollback_annotations(window.recovery, start=window.start, end=window.end)
    skipped = skipped_trace(window.recovery, window.start, window.end)
    if skipped is not None:
        data.append(skipped)
    shapes.append(cursor_shape(window, step))
    layout = figure_layout(
        270,
        "Loss around the divergence (cursor = replayed step)",
        shapes=shapes,
        annotations=annotations,
    )
    layout["legend"] = {
        "x": 0.01,
        "xanchor": "left",
        "y": 0.97,
        "yanchor": "top",
        "bgcolor": "rgba(255,255,255,0.8)",
        "font": {"size": 11},
    }
    layout["xaxis"] = axis(title={"text": "step"}, range=[window.start, window.end])
    layout["yaxis"] = axis(title={"text": "loss"})
    if skipped is not None:
        layout["yaxis2"] = skip_axis()
    layout["margin"]["t"] = 56
    return {"data": data, "layout": layout}


def cursor_shape(window: ReplayWindow, step: int) -> dict:
    """The replayed step (the last recorded step at or before ``step``) as a dark line."""
    at = int(window.steps[window.row(step)])
    return vline(at, "#111827", width=2.5, name="cursor")


def replay_sharpness_figure(window: ReplayWindow, step: int) -> dict | None:
    """Preconditioned sharpness (left axis, a dashed line at 2) and sharpness (right axis)
    at the probed steps around the episode, step-a/b/c and the cursor marked; None when
    the record has no sharpness series."""
    probes = window.sharpness
    if probes is None:
        return None
    data = [sharpness_trace(probes, name) for name in SHARPNESS_COLORS if name in probes.values]
    layout, limit, label = sharpness_layout(probes, window.start, window.end)
    shapes, annotations = moment_shapes(window)
    layout["shapes"] = [*shapes, *limit, cursor_shape(window, step)]
    layout["annotations"] = [*annotations, *label]
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
        data.append(
            {
                "type": "bar",
                "name": m.label,
                "x": names,
                "y": nullable(np.where(values > 0, values, np.nan)),
                "marker": {"color": m.color or NEUTRAL_COLOR},
                "customdata": window.layers,
                "hovertemplate": "%{customdata}<br>" + m.label + " = %{y:.3g}<extra></extra>",
            }
        )
    at = int(window.steps[row])
    return _per_layer_figure(
        names,
        data,
        shown,
        window.norm_range or [-6, 2],
        f"Per-layer statistics at step {at:,}",
        "log scale",
    )


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
        data.append(
            {
                "type": "bar",
                "name": f"σ {RULE_LABELS[rule]}",
                "x": names,
                "y": nullable(values),
                "marker": {"color": RULE_COLORS[rule]},
                "customdata": window.layers,
                "hovertemplate": "%{customdata}<br>σ "
                + RULE_LABELS[rule]
                + " = %{y:.3g}<extra></extra>",
            }
        )
    at = int(window.steps[row])
    rng = window.factor_range or [-1.2, math.log10(1.8)]
    figure = _per_layer_figure(
        names,
        data,
        shown,
        rng,
        f"Clipping factors σ at step {at:,} at the paper's thresholds (shorter = clips harder)",
        "σ (log)",
    )
    figure["layout"]["shapes"] = [hline(1, "#9ca3af", width=1, dash="dash")]
    return figure


def _per_layer_figure(
    names: list[str],
    data: list[dict],
    shown: list[np.ndarray],
    rng: list[float],
    title: str,
    y_title: str,
) -> dict:
    """Grouped bars per layer on a log y-axis spanning ``rng`` (log10), with a NaN marker
    at the bottom under each layer where a value of ``shown`` is not finite."""
    bad = _nonfinite_trace(names, shown, 10 ** (rng[0] + 0.04 * (rng[1] - rng[0])))
    if bad:
        data = [*data, bad]
    layout = figure_layout(320, title, barmode="group", bargap=0.25, bargroupgap=0.05)
    layout["xaxis"] = axis(tickangle=_tick_angle(names), automargin=True)
    layout["yaxis"] = axis(type="log", range=rng, title={"text": y_title}, exponentformat="power")
    return {"data": data, "layout": layout}


def figure4_figure(window: ReplayWindow, layer: str) -> dict:
    """The paper's Figure 4b for one layer: measurements (left) and factors (right) at step-a, b, c."""
    if layer not in window.layers:
        return empty_figure(f"no layer {layer!r}", 300)
    j = window.layers.index(layer)
    moments = {
        MOMENT_LABELS[k] if k != "step_c" or window.episode["kind"] == "full" else "recovered": s
        for k, s in window.moments().items()
        if s is not None
    }
    labels = list(moments)
    rows = [window.row(s) for s in moments.values()]

    def at_moments(metric: str) -> np.ndarray:
        return np.array([window.metrics[metric][r, j] for r in rows], np.float64)

    data = [
        _fig4_bars(METRIC_LABELS[metric], labels, at_moments(metric), METRIC_COLORS[metric], "")
        for metric in MEASUREMENTS
        if metric in window.metrics
    ]
    data += [
        _fig4_bars(
            f"σ {RULE_LABELS[rule]}",
            labels,
            at_moments(FACTOR_METRICS[rule]),
            RULE_COLORS[rule],
            "2",
        )
        for rule in SHOWN_RULES
        if FACTOR_METRICS[rule] in window.metrics
    ]
    return {"data": data, "layout": _fig4_layout(window, layer)}


def _fig4_bars(name: str, labels: list[str], values: np.ndarray, color: str, panel: str) -> dict:
    """One bar per moment; panel "" holds the measurements (≤ 0 hidden: log axis), "2" the factors."""
    factors = panel == "2"
    return {
        "type": "bar",
        "name": name,
        "x": labels,
        "y": nullable(values if factors else np.where(values > 0, values, np.nan)),
        "marker": {"color": color, "pattern": {"shape": "/"}} if factors else {"color": color},
        "xaxis": f"x{panel}",
        "yaxis": f"y{panel}",
        "legendgroup": "f" if factors else "m",
        "hovertemplate": name + " = %{y:.3g}<extra>%{x}</extra>",
    }


def _fig4_layout(window: ReplayWindow, layer: str) -> dict:
    """Two log panels side by side, each titled; the legend below."""
    layout = figure_layout(330, None, barmode="group", bargap=0.2)
    layout["margin"] = {"l": 64, "r": 16, "t": 34, "b": 64}
    layout["legend"] = {
        "orientation": "h",
        "x": 0.5,
        "xanchor": "center",
        "y": -0.12,
        "yanchor": "top",
        "font": {"size": 11},
    }
    layout["xaxis"] = axis(domain=[0, 0.45], anchor="y")
    layout["yaxis"] = axis(
        type="log", range=window.norm_range, exponentformat="power", title={"text": "log scale"}
    )
    layout["xaxis2"] = axis(domain=[0.55, 1], anchor="y2")
    layout["yaxis2"] = axis(
        type="log",
        range=window.factor_range,
        exponentformat="power",
        anchor="x2",
        title={"text": "σ (log)"},
    )
    layout["annotations"] = [
        _panel_title(f"<b>{layer}</b>: ‖g‖₂, ‖g‖₂/‖w‖₂, ‖r/w‖∞", "x domain"),
        _panel_title("clipping factor σ (1 = no clipping)", "x2 domain"),
    ]
    return layout


def _panel_title(text: str, xref: str) -> dict:
    """A title centred above one panel of a figure with several."""
    return {
        "text": text,
        "xref": xref,
        "yref": "paper",
        "x": 0.5,
        "y": 1.0,
        "yanchor": "bottom",
        "showarrow": False,
        "font": {"size": 12},
    }


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
