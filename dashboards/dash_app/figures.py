"""The Live and Compare views' figures and tables, as plain plotly dicts."""

from __future__ import annotations

import numpy as np

from clippy_monitor.dashboards.dash_app.health import episodes, fmt_step, health, task_name
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


def live_loss_figure(live: LiveRun, max_points: int = DEFAULT_MAX_POINTS) -> dict:
    """Total loss and task losses over the whole run (min/max envelope), episodes marked."""
    if not len(live):
        return empty_figure("Waiting for the first flush…", 340)
    data = []
    for i, name in enumerate(live.loss_series):
        color = LOSS_COLOR if name == "loss" else TASK_COLORS[(i - 1) % len(TASK_COLORS)]
        label = "total loss" if name == "loss" else task_name(name)
        data.append(line_trace(live.steps, live.series(name), max_points, name=label, line={"color": color, "width": 1.6 if name == "loss" else 1.1}))
    layout = figure_layout(340, "Loss (shaded amber: micro-divergence; red: step-b → step-c)", shapes=event_shapes(episodes(live)), uirevision=live.name)
    layout["xaxis"] = axis(title={"text": "step"})
    layout["yaxis"] = axis(title={"text": "loss"})
    return {"data": data, "layout": layout}


def live_factor_figure(live: LiveRun, max_points: int = DEFAULT_MAX_POINTS) -> dict:
    """Per rule, the lowest factor over layers at every step (log scale; 1 = no clipping)."""
    if not len(live) or not live.rules:
        return empty_figure("No clipping factors recorded" if len(live) else "Waiting for the first flush…", 300)
    data = []
    for rule in live.rules:
        low, where = live.min_factor(rule)
        data.append(
            line_trace(
                live.steps,
                low,
                max_points,
                name=f"min σ {RULE_LABELS[rule]}",
                line={"color": RULE_COLORS[rule], "width": 1.2, "dash": "dot" if rule == "applied" else "solid"},
            )
        )
    layout = figure_layout(300, "Lowest clipping factor over layers (1 = no clipping)", shapes=event_shapes(episodes(live)), uirevision=live.name)
    layout["xaxis"] = axis(title={"text": "step"})
    layout["yaxis"] = axis(type="log", title={"text": "σ (log)"}, exponentformat="power")
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
    layout = figure_layout(620, None)
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
            xa = axis(domain=[x0, x0 + width], anchor=f"y{suffix}", showticklabels=r == nrows - 1)
            if k != 1:
                xa["matches"] = "x"
            if r == nrows - 1:
                xa["title"] = {"text": "step"}
            ya = axis(domain=[y1 - height, y1], anchor=f"x{suffix}", type=scale)
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
                tr = line_trace(steps, values, max_points, name=name, legendgroup=name, showlegend=show, line={"color": color, "width": 1.2, "dash": dash})
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
            out.append(("total loss" if name == "loss" else task_name(name), color, live.steps, live.series(name), "solid"))
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
                "full": f"step-b {full['step_b']:,} → step-c {fmt_step(full.get('step_c'))}" if full else "—",
                "last_loss": last_loss,
                "min_applied": low,
            }
        )
    return out
