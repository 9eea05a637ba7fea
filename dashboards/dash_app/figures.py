"""The Live and Compare views' figures and tables, as plain plotly dicts."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from clippy_monitor.dashboards.dash_app.health import episodes, fmt_step, health, task_name
from clippy_monitor.dashboards.dash_app.recovery import (
    rollback_annotations,
    rollback_shapes,
    skip_axis,
    skipped_trace,
)
from clippy_monitor.dashboards.dash_app.runs import LiveRun
from clippy_monitor.dashboards.dash_app.style import (
    DEFAULT_MAX_POINTS,
    LOSS_COLOR,
    RULE_COLORS,
    RULE_LABELS,
    TASK_COLORS,
    axis,
    empty_figure,
    event_shapes,
    figure_layout,
    line_trace,
)

from clippy_monitor.record.format import optimizer_name
from clippy_monitor.recovered import Recovery, read_recovery


def live_loss_figure(live: LiveRun, max_points: int = DEFAULT_MAX_POINTS) -> dict:
    """Total loss and task losses over the whole run (min/max envelope), episodes marked;
    the recovery ladder's rollbacks (labelled lines) and skipped steps (markers) too."""
    if not len(live):
        return empty_figure("Waiting for the first flush…", 340)
    recovery = read_recovery(live)
    data = []
    for i, name in enumerate(live.loss_series):
        color = LOSS_COLOR if name == "loss" else TASK_COLORS[(i - 1) % len(TASK_COLORS)]
        label = "total loss" if name == "loss" else task_name(name)
        data.append(
            line_trace(
                live.steps,
                live.series(name),
                max_points,
                name=label,
                line={"color": color, "width": 1.6 if name == "loss" else 1.1},
            )
        )
    skipped = skipped_trace(recovery)
    if skipped is not None:
        data.append(skipped)
    layout = _live_layout(
        live,
        340,
        "Loss (shaded amber: micro-divergence; red: step-b → step-c)",
        axis(title={"text": "loss"}),
        recovery,
    )
    layout["annotations"] = rollback_annotations(recovery)
    if skipped is not None:
        layout["yaxis2"] = skip_axis()
    return {"data": data, "layout": layout}


def live_factor_figure(live: LiveRun, max_points: int = DEFAULT_MAX_POINTS) -> dict:
    """Per rule, the lowest factor over layers at every step (log scale; 1 = no clipping)."""
    if not len(live) or not live.rules:
        return empty_figure(
            "No clipping factors recorded" if len(live) else "Waiting for the first flush…", 300
        )
    data = []
    for rule in live.rules:
        low, where = live.min_factor(rule)
        data.append(
            line_trace(
                live.steps,
                low,
                max_points,
                name=f"min σ {RULE_LABELS[rule]}",
                line={
                    "color": RULE_COLORS[rule],
                    "width": 1.2,
                    "dash": "dot" if rule == "applied" else "solid",
                },
            )
        )
    layout = _live_layout(
        live,
        300,
        "Lowest clipping factor over layers (1 = no clipping)",
        axis(type="log", title={"text": "σ (log)"}, exponentformat="power"),
        read_recovery(live),
    )
    return {"data": data, "layout": layout}


def _live_layout(
    live: LiveRun, height: int, title: str, yaxis: dict, recovery: Recovery | None = None
) -> dict:
    """A Live figure's layout over steps: episodes shaded, rollbacks drawn, zoom kept
    across refreshes."""
    shapes = event_shapes(episodes(live)) + rollback_shapes(recovery)
    layout = figure_layout(height, title, shapes=shapes, uirevision=live.name)
    layout["xaxis"] = axis(title={"text": "step"})
    layout["yaxis"] = yaxis
    return layout


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


# ---------------------------------------------------------------------- compare view


COMPARE_ROWS = (
    ("loss", "loss", "linear"),
    ("grad_norm", "global ‖g‖₂", "log"),
    ("factor", "lowest σ over layers", "log"),
)
COMPARE_HEIGHT = 620
HEALTH_COLORS = {"healthy": "#166534", "micro": "#92400e", "diverged": "#b91c1c"}


@dataclass(frozen=True)
class _Grid:
    """Where panel (row, column) of the compare figure sits, in paper coordinates."""

    ncols: int
    nrows: int
    gap_x: float = 0.04
    gap_y: float = 0.08

    @property
    def width(self) -> float:
        return (1 - self.gap_x * (self.ncols - 1)) / self.ncols

    @property
    def height(self) -> float:
        return (1 - self.gap_y * (self.nrows - 1)) / self.nrows

    def suffix(self, r: int, c: int) -> str:
        """Plotly's axis suffix of a panel: "" for the first, then "2", "3", …"""
        k = r * self.ncols + c + 1
        return "" if k == 1 else str(k)

    def x0(self, c: int) -> float:
        return c * (self.width + self.gap_x)

    def y1(self, r: int) -> float:
        return 1 - r * (self.height + self.gap_y)


def compare_figure(runs: list[LiveRun], max_points: int = 1500) -> dict:
    """Runs side by side (one column each), aligned by step: loss, global ‖g‖₂, lowest factor.

    x axes are shared by every panel, y axes by every panel of a row.
    """
    if not runs:
        return empty_figure("Pick two or more runs to compare", 560)
    grid = _Grid(len(runs), len(COMPARE_ROWS))
    two_lines = len(runs) >= 3  # narrow columns: the health goes under the run's name
    title_px = 38 if two_lines else 22  # height of the run titles above the panels
    layout = figure_layout(COMPARE_HEIGHT, None)
    layout["margin"] = {"l": 70, "r": 16, "t": 100 if two_lines else 80, "b": 44}
    layout["annotations"] = []
    layout["showlegend"] = True
    data: list[dict] = []
    legend_seen: set[str] = set()
    for c, live in enumerate(runs):
        eps = episodes(live)
        for r, (kind, label, scale) in enumerate(COMPARE_ROWS):
            suffix = grid.suffix(r, c)
            layout[f"xaxis{suffix}"], layout[f"yaxis{suffix}"] = _compare_axes(
                grid, r, c, label, scale
            )
            traces = _compare_traces(live, kind, max_points)
            data += _compare_panel_data(traces, suffix, max_points, legend_seen)
            if not traces:
                layout["annotations"].append(_not_recorded(suffix))
            layout.setdefault("shapes", []).extend(
                event_shapes(eps, xref=f"x{suffix}", yref=f"y{suffix} domain")
            )
        layout["annotations"].append(_run_title(live, grid.x0(c) + grid.width / 2, two_lines))
    layout["legend"] = {
        "orientation": "h",
        "x": 0.5,
        "xanchor": "center",
        "y": 1 + (title_px + 8) / _plot_height(layout),  # just above the run titles
        "yanchor": "bottom",
        "font": {"size": 11},
    }
    return {"data": data, "layout": layout}


def _plot_height(layout: dict) -> int:
    """Pixels between the top and bottom margins: what 1 in paper coordinates measures."""
    return layout["height"] - layout["margin"]["t"] - layout["margin"]["b"]


def _compare_axes(grid: _Grid, r: int, c: int, label: str, scale: str) -> tuple[dict, dict]:
    """The x and y axes of panel (r, c): x shared by all panels, y by the panels of a row."""
    suffix = grid.suffix(r, c)
    last_row = r == grid.nrows - 1
    x0, y1 = grid.x0(c), grid.y1(r)
    xa = axis(domain=[x0, x0 + grid.width], anchor=f"y{suffix}", showticklabels=last_row)
    if suffix:
        xa["matches"] = "x"
    if last_row:
        xa["title"] = {"text": "step"}
    ya = axis(domain=[y1 - grid.height, y1], anchor=f"x{suffix}", type=scale)
    if scale == "log":
        ya["exponentformat"] = "power"
    if c == 0:
        ya["title"] = {"text": label}
    else:
        ya["matches"] = f"y{grid.suffix(r, 0)}"
        ya["showticklabels"] = False
    return xa, ya


def _compare_panel_data(
    traces: list[tuple], suffix: str, max_points: int, legend_seen: set[str]
) -> list[dict]:
    """Plotly traces of one panel; each name enters the legend once (``legend_seen`` grows)."""
    out = []
    for name, color, steps, values, dash in traces:
        tr = line_trace(
            steps,
            values,
            max_points,
            name=name,
            legendgroup=name,
            showlegend=name not in legend_seen,
            line={"color": color, "width": 1.2, "dash": dash},
        )
        legend_seen.add(name)
        tr["xaxis"], tr["yaxis"] = f"x{suffix}", f"y{suffix}"
        out.append(tr)
    return out


def _not_recorded(suffix: str) -> dict:
    """The grey "not recorded" note in the middle of an empty panel."""
    return {
        "text": "not recorded",
        "showarrow": False,
        "xref": f"x{suffix} domain",
        "yref": f"y{suffix} domain",
        "x": 0.5,
        "y": 0.5,
        "font": {"color": "#9ca3af"},
    }


def _run_title(live: LiveRun, x: float, two_lines: bool = False) -> dict:
    """A column's heading: the run's name and health, coloured by health."""
    h = health(live)
    return {
        "text": f"<b>{live.name}</b>{'<br>' if two_lines else ' · '}{h['title']}",
        "showarrow": False,
        "xref": "paper",
        "yref": "paper",
        "x": x,
        "y": 1.0,
        "yanchor": "bottom",
        "yshift": 6,
        "font": {"size": 13, "color": HEALTH_COLORS.get(h["state"], "#374151")},
    }


def _compare_traces(live: LiveRun, kind: str, max_points: int) -> list[tuple]:
    if not len(live):
        return []
    if kind == "loss":
        out = []
        for i, name in enumerate(live.loss_series):
            color = LOSS_COLOR if name == "loss" else TASK_COLORS[(i - 1) % len(TASK_COLORS)]
            out.append(
                (
                    "total loss" if name == "loss" else task_name(name),
                    color,
                    live.steps,
                    live.series(name),
                    "solid",
                )
            )
        return out
    if kind == "grad_norm":
        if live.has_series("grad_norm"):
            values = live.series("grad_norm")
            return [
                (
                    "global ‖g‖₂",
                    "#0f766e",
                    live.steps,
                    np.where(values > 0, values, np.nan),
                    "solid",
                )
            ]
        return []
    out = []
    for rule in live.rules:
        if rule in ("clippy", "applied"):
            low, _ = live.min_factor(rule)
            out.append(
                (
                    f"min σ {RULE_LABELS[rule]}",
                    RULE_COLORS[rule],
                    live.steps,
                    low,
                    "dot" if rule == "applied" else "solid",
                )
            )
    return out


def compare_table(runs: list[LiveRun]) -> list[dict]:
    """One row per run: optimizer, steps, health, events, last loss, lowest applied factor."""
    out = []
    for live in runs:
        h = health(live)
        eps = episodes(live)
        last_loss = (
            float(live.series("loss")[-1]) if len(live) and live.has_series("loss") else None
        )
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
                "full": f"step-b {full['step_b']:,} → step-c {fmt_step(full.get('step_c'))}"
                if full
                else "—",
                "last_loss": last_loss,
                "min_applied": low,
            }
        )
    return out
