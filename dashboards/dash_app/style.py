"""The Dash app's look: colours and names from the catalog, plotly layout and line helpers.

Figures are plain plotly dicts (no Dash, no TensorFlow).  Line plots go through
:func:`clippy_monitor.display.minmax_envelope`, so a one-step spike survives any
downsampling.
"""

from __future__ import annotations

import numpy as np

from clippy_monitor import catalog as vocab  # the metric vocabulary
from clippy_monitor.display import minmax_envelope, nullable, vline

# Rules, metrics and moments are the catalog's (clippy_monitor.catalog), as in every reader.
RULES = vocab.RULE_NAMES
RULE_LABELS = vocab.RULE_LABELS
MEASUREMENTS = vocab.measurements()
SHOWN_RULES = vocab.figure_4b_rules()  # the paper's Figure 4b (right)
METRIC_COLORS = {m.name: m.color for m in vocab.METRICS if m.color}
RULE_COLORS = vocab.RULE_COLORS
NEUTRAL_COLOR = "#6b7280"  # a metric the catalog gives no colour
TASK_COLORS = [
    "#2563eb",
    "#db2777",
    "#059669",
    "#d97706",
    "#7c3aed",
    "#0891b2",
    "#65a30d",
    "#be123c",
]
LOSS_COLOR = "#111827"
MOMENT_COLORS = vocab.MOMENT_COLORS
MOMENT_LABELS = vocab.MOMENT_LABELS
RECOVERED_COLOR = vocab.RECOVERED.color
KIND_COLORS = vocab.KIND_COLORS  # episodes and the recovery ladder: "rollback", "skipped", ...
KIND_LABELS = {k.name: k.label for k in vocab.EVENT_KINDS}

DEFAULT_MAX_POINTS = 2000  # per line series, min/max envelope
MAX_SHAPES = 60  # event markers drawn on a plot (the most recent ones)


def axis(**kw) -> dict:
    """A plotly axis in the app's style; ``kw`` overrides."""
    base = {
        "gridcolor": "#e5e7eb",
        "zeroline": False,
        "showline": True,
        "linecolor": "#9ca3af",
        "ticks": "outside",
        "tickcolor": "#9ca3af",
    }
    base.update(kw)
    return base


def figure_layout(height: int, title: str | None = None, **kw) -> dict:
    """A plotly layout in the app's style, ``height`` px high; ``kw`` overrides."""
    layout = {
        "height": height,
        # With a title, the legend gets a line of its own between the title and the plot.
        "margin": {"l": 64, "r": 16, "t": 60 if title else 16, "b": 44},
        "paper_bgcolor": "#ffffff",
        "plot_bgcolor": "#ffffff",
        "font": {
            "family": "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif",
            "size": 12,
            "color": "#1f2937",
        },
        "legend": {
            "orientation": "h",
            "x": 1,
            "xanchor": "right",
            "y": 1.0,
            "yanchor": "bottom",
            "font": {"size": 11},
        },
        "hoverlabel": {"namelength": -1},
        "xaxis": axis(),
        "yaxis": axis(),
    }
    if title:
        layout["title"] = {
            "text": title,
            "x": 0.01,
            "xanchor": "left",
            "y": 1,
            "yref": "container",
            "yanchor": "top",
            "pad": {"t": 8},
            "font": {"size": 14},
        }
    layout.update(kw)
    return layout


def empty_figure(message: str, height: int = 300) -> dict:
    """A blank figure showing ``message`` (errors, no data yet)."""
    layout = figure_layout(height)
    layout["xaxis"] = {"visible": False}
    layout["yaxis"] = {"visible": False}
    layout["annotations"] = [
        {
            "text": message,
            "showarrow": False,
            "xref": "paper",
            "yref": "paper",
            "x": 0.5,
            "y": 0.5,
            "font": {"size": 14, "color": "#6b7280"},
        }
    ]
    return {"data": [], "layout": layout}


def line_trace(steps: np.ndarray, values: np.ndarray, max_points: int, **trace) -> dict:
    """A line of at most ``max_points`` samples (min/max envelope); NaN/inf are gaps."""
    xs, ys = minmax_envelope(steps, values, max_points)
    return {
        "type": "scattergl" if len(xs) > 5000 else "scatter",
        "mode": "lines",
        "x": xs.tolist(),
        "y": nullable(ys),
        **trace,
    }


def event_shapes(eps: list[dict], xref: str = "x", yref: str = "paper") -> list:
    """Shapes marking episodes on a whole-run plot: a micro-divergence shaded amber from
    step-b to its recovery; a full divergence shaded red from step-b to step-c, a line at step-c."""
    shapes = []
    for e in eps[-MAX_SHAPES:]:
        if e["kind"] == "micro":
            end = e.get("recovered") or e["step_b"]
            shapes.append(_band(xref, yref, e["step_b"], end, "#f59e0b", 0.2))
            continue
        end = e.get("step_c")
        if end is not None:
            shapes.append(_band(xref, yref, e["step_b"], end, "#ef4444", 0.15))
        x = end if end is not None else e["step_b"]
        shapes.append(
            vline(x, MOMENT_COLORS["step_c"], width=1.2, dash="dash", xref=xref, yref=yref)
        )
    return shapes


def _band(xref: str, yref: str, x0: float, x1: float, color: str, opacity: float) -> dict:
    """A shaded band from x0 to x1 over the whole height, drawn below the traces."""
    return {
        "type": "rect",
        "xref": xref,
        "yref": yref,
        "x0": x0,
        "x1": x1,
        "y0": 0,
        "y1": 1,
        "fillcolor": color,
        "opacity": opacity,
        "line": {"width": 0},
        "layer": "below",
    }
