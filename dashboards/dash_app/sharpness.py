"""Sharpness in the Replay view: the probed steps around an episode, its plot and its note.

The series are ``DivergenceMonitor(..., sharpness_every=N)``'s ``sharpness`` and
``preconditioned_sharpness`` (NaN on steps not probed); the reading against step-b
is :func:`clippy_monitor.sharpness_reading.read_crossing` (the one every reader
calls).  Plain dicts for plotly, no Dash.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from clippy_monitor.dashboards.dash_app.runs import LiveRun
from clippy_monitor.dashboards.dash_app.style import axis, figure_layout

from clippy_monitor.display import hline, nullable
from clippy_monitor.sharpness_reading import (
    COLORS,
    PRECONDITIONED,
    SERIES,
    SHARPNESS,
    THRESHOLD,
    Crossing,
    read_crossing,
)

SHARPNESS_COLORS = COLORS
SHARPNESS_LABELS = {PRECONDITIONED: "preconditioned sharpness", SHARPNESS: "sharpness"}
#: The label of the dashed line at the threshold.
LIMIT_LABEL = f"{THRESHOLD:g} (stability limit, preconditioned)"
SHARPNESS_HEIGHT = 250


@dataclass(frozen=True)
class ProbedSharpness:
    """The probes of a replay window: ``steps`` (the window's probes plus the nearest one
    on either side, so the lines enter and leave it), the two series at those steps
    (NaN where one was not measured), the probes inside the window, and the run's
    crossing of the threshold read against the episode's step-b."""

    steps: np.ndarray
    values: dict[str, np.ndarray]  # series name -> values at ``steps``
    in_window: int
    crossing: Crossing

    def note(self) -> str:
        """The line under the plot: the reading, and a word when no probe fell in the window."""
        text = f"Preconditioned sharpness: {self.crossing.describe()}."
        if not self.in_window:
            text += " No probe in this window."
        return text


def probed_sharpness(
    live: LiveRun, step_b: int | None, start: int, end: int
) -> ProbedSharpness | None:
    """The probes around ``[start, end]`` and the crossing against ``step_b``; None when
    the record has neither sharpness series (recorded without ``sharpness_every``)."""
    present = [name for name in SERIES if name in live.series_names]
    if not present:
        return None
    columns = {name: np.asarray(live.series(name), np.float64) for name in present}
    probed = np.flatnonzero(np.any([~np.isnan(v) for v in columns.values()], axis=0))
    steps = np.asarray(live.steps)[probed]
    inside = (steps >= start) & (steps <= end)
    keep = inside.copy()
    before, after = np.flatnonzero(steps < start), np.flatnonzero(steps > end)
    if before.size:
        keep[before[-1]] = True
    if after.size:
        keep[after[0]] = True
    return ProbedSharpness(
        steps=steps[keep],
        values={name: v[probed][keep] for name, v in columns.items()},
        in_window=int(inside.sum()),
        crossing=read_crossing(live, step_b),
    )


def sharpness_trace(probes: ProbedSharpness, name: str) -> dict:
    """One series as markers joined by lines; the plain sharpness on the right axis."""
    color = SHARPNESS_COLORS[name]
    label = SHARPNESS_LABELS[name]
    return {
        "type": "scatter",
        "mode": "lines+markers",
        "name": label,
        "x": probes.steps.tolist(),
        "y": nullable(probes.values[name]),
        "yaxis": "y" if name == PRECONDITIONED else "y2",
        "connectgaps": True,
        "line": {
            "color": color,
            "width": 1.5,
            "dash": "solid" if name == PRECONDITIONED else "dot",
        },
        "marker": {"color": color, "size": 6},
        "hovertemplate": f"step %{{x}}<br>{label} = %{{y:.3g}}<extra></extra>",
    }


def log_range(values: np.ndarray, include: float | None = None) -> list[float] | None:
    """log10 ``[low, high]`` around the finite positive ``values`` (and ``include``), padded;
    None when a value is not positive (the axis is linear then) or there is none."""
    finite = values[np.isfinite(values)]
    if finite.size and finite.min() <= 0:
        return None
    shown = [*finite.tolist(), *([include] if include is not None else [])]
    if not shown:
        return None
    lo, hi = math.log10(min(shown)), math.log10(max(shown))
    pad = 0.1 * max(hi - lo, 0.5)
    return [lo - pad, hi + pad]


def limit_marks(y_range: list[float] | None) -> tuple[dict, dict]:
    """The dashed horizontal line at the threshold on the left axis, and its label
    (annotations take log10 on a log axis)."""
    color = SHARPNESS_COLORS[PRECONDITIONED]
    line = hline(THRESHOLD, color, width=1.2, dash="dash", name="stability limit")
    label = {
        "xref": "paper",
        "yref": "y",
        "x": 0.005,
        "y": math.log10(THRESHOLD) if y_range is not None else THRESHOLD,
        "xanchor": "left",
        "yanchor": "bottom",
        "text": LIMIT_LABEL,
        "showarrow": False,
        "font": {"size": 10, "color": SHARPNESS_COLORS[PRECONDITIONED]},
    }
    return line, label


def sharpness_layout(probes: ProbedSharpness, start: int, end: int) -> tuple[dict, list, list]:
    """The figure's layout (left axis: preconditioned, right: plain; log when positive),
    and the threshold line and label when the preconditioned series was measured."""
    layout = figure_layout(SHARPNESS_HEIGHT, "Sharpness at the probed steps")
    layout["margin"] = {"l": 64, "r": 64, "t": 60, "b": 40}
    layout["legend"] = {**layout["legend"], "y": 1.12}  # above step-a/b/c's labels
    layout["xaxis"] = axis(title={"text": "step"}, range=[start, end])
    shapes, annotations = [], []
    pre = probes.values.get(PRECONDITIONED)
    if pre is not None and np.isfinite(pre).any():
        rng = log_range(pre, THRESHOLD)
        y = {"type": "log", "range": rng} if rng else {}
        layout["yaxis"] = axis(title={"text": "preconditioned"}, tickformat=".3~g", **y)
        line, label = limit_marks(rng)
        shapes, annotations = [line], [label]
    plain = probes.values.get(SHARPNESS)
    if plain is not None:
        rng = log_range(plain)
        y = {"type": "log", "range": rng} if rng else {}
        layout["yaxis2"] = axis(
            title={"text": "sharpness"},
            overlaying="y",
            side="right",
            showgrid=False,
            tickformat=".3~g",
            **y,
        )
    return layout, shapes, annotations
