"""What the recovery ladder did, as the Dash app shows it: badge line, alerts, plot marks.

The reading is :func:`clippy_monitor.recovered.read_recovery` (the one every
reader calls); colours and labels are the catalog's event kinds ``"skipped"``,
``"rollback"`` and ``"gave_up"``.  Plain dicts for plotly, no Dash.
"""

from __future__ import annotations

import numpy as np
from clippy_monitor.dashboards.dash_app.style import KIND_COLORS, KIND_LABELS, MAX_SHAPES

from clippy_monitor.display import vline
from clippy_monitor.recovered import Recovery, Rollback

MAX_SKIP_MARKERS = 5000  # skipped steps marked on a plot (the most recent ones)
SKIP_MARK_Y = 0.04  # where the skipped-step markers sit, as a fraction of the plot height


def reason_label(reason: str) -> str:
    """``"non_finite_gradient"`` -> ``"non-finite gradient"``."""
    return reason.replace("non_finite", "non-finite").replace("_", " ")


def rollback_label(rollback: Rollback) -> str:
    """The label on a rollback's line: ``"rollback → 25"`` (the snapshot's step)."""
    return f"{KIND_LABELS['rollback']} → {rollback.snapshot_step:,}"


def rollback_text(rollback: Rollback) -> str:
    """One sentence: where it acted, what it restored, why, and the cool-down."""
    why = f"; trigger: {rollback.trigger}" if rollback.trigger else ""
    text = (
        f"Rolled back at step {rollback.step:,} to the snapshot after step "
        f"{rollback.snapshot_step:,} ({rollback.batches_skipped:,} batches skipped{why})."
    )
    if rollback.lr_factor is not None and rollback.cooldown_steps:
        text += (
            f" Cool-down: learning rate ×{rollback.lr_factor:g} rising back to ×1 "
            f"over {rollback.cooldown_steps:,} steps."
        )
    return text


def skipped_text(recovery: Recovery) -> str:
    """How many updates were not applied, why, and the latest one."""
    n = len(recovery.skipped_steps)
    reasons = ", ".join(f"{reason_label(r)}: {k:,}" for r, k in recovery.reason_counts().items())
    return (
        f"{n:,} step{'s' * (n != 1)} skipped (update not applied; {reasons}), "
        f"the latest at step {recovery.skipped_steps[-1]:,}."
    )


def gave_up_alerts(recovery: Recovery | None) -> list[dict]:
    """The ladder stopped training: one ``danger`` alert, else none."""
    if recovery is None or recovery.gave_up is None:
        return []
    g, n = recovery.gave_up, len(recovery.rollbacks)
    why = f" ({g.trigger})" if g.trigger else ""
    return [
        {
            "level": "danger",
            "text": f"Recovery gave up at step {g.step:,}{why} after {n} rollback"
            f"{'s' * (n != 1)}: training stopped.",
        }
    ]


def rollback_alerts(recovery: Recovery | None, max_events: int = 3) -> list[dict]:
    """One ``warning`` per rollback, latest first (at most ``max_events``, then a count)."""
    if recovery is None:
        return []
    latest = sorted(recovery.rollbacks, key=lambda r: -r.step)
    out = [{"level": "warning", "text": rollback_text(r)} for r in latest[:max_events]]
    if len(latest) > max_events:
        more = len(latest) - max_events
        out.append({"level": "warning", "text": f"… and {more} earlier rollbacks."})
    return out


def skipped_alerts(recovery: Recovery | None) -> list[dict]:
    """One ``info`` alert counting the skipped steps, else none."""
    if recovery is None or not recovery.skipped_steps:
        return []
    return [{"level": "info", "text": skipped_text(recovery)}]


def _in(step: int, start: int | None, end: int | None) -> bool:
    return (start is None or step >= start) and (end is None or step <= end)


def rollback_shapes(
    recovery: Recovery | None,
    xref: str = "x",
    yref: str = "paper",
    start: int | None = None,
    end: int | None = None,
) -> list[dict]:
    """Per rollback in ``[start, end]``: a line where it acted and a light band over the
    steps it undid (snapshot_step → step)."""
    if recovery is None:
        return []
    color = KIND_COLORS["rollback"]
    shapes = []
    for r in [r for r in recovery.rollbacks if _in(r.step, start, end)][-MAX_SHAPES:]:
        shapes.append(
            {
                "type": "rect",
                "xref": xref,
                "yref": yref,
                "x0": r.snapshot_step,
                "x1": r.step,
                "y0": 0,
                "y1": 1,
                "fillcolor": color,
                "opacity": 0.07,
                "line": {"width": 0},
                "layer": "below",
            }
        )
        shapes.append(
            vline(r.step, color, width=2, dash="dashdot", xref=xref, yref=yref, name="rollback")
        )
    return shapes


def rollback_annotations(
    recovery: Recovery | None, xref: str = "x", start: int | None = None, end: int | None = None
) -> list[dict]:
    """Per rollback in ``[start, end]``: ``"rollback → <snapshot_step>"`` just inside the top
    of the plot, right of its line (the step-a/b/c labels sit above the plot)."""
    if recovery is None:
        return []
    color = KIND_COLORS["rollback"]
    return [
        {
            "xref": xref,
            "yref": "paper",
            "x": r.step,
            "y": 1.0,
            "yanchor": "top",
            "xanchor": "left",
            "xshift": 3,
            "text": rollback_label(r),
            "showarrow": False,
            "bgcolor": "rgba(255,255,255,0.85)",
            "font": {"size": 11, "color": color},
        }
        for r in [r for r in recovery.rollbacks if _in(r.step, start, end)][-MAX_SHAPES:]
    ]


def skipped_trace(
    recovery: Recovery | None, start: int | None = None, end: int | None = None
) -> dict | None:
    """Markers at the skipped steps in ``[start, end]``, along the bottom of the plot
    (on the overlay axis ``y2``, see :func:`skip_axis`); None if there are none."""
    if recovery is None or not recovery.skipped_steps:
        return None
    steps = np.asarray(recovery.skipped_steps, np.int64)
    inside = np.ones(len(steps), bool)
    if start is not None:
        inside &= steps >= start
    if end is not None:
        inside &= steps <= end
    keep = np.flatnonzero(inside)[-MAX_SKIP_MARKERS:]
    if not keep.size:
        return None
    reasons = [reason_label(recovery.skip_reasons[i]) for i in keep]
    return {
        "type": "scattergl" if keep.size > 1000 else "scatter",
        "mode": "markers",
        "name": KIND_LABELS["skipped"],
        "x": steps[keep].tolist(),
        "y": [SKIP_MARK_Y] * int(keep.size),
        "yaxis": "y2",
        "customdata": reasons,
        "marker": {"symbol": "triangle-up", "size": 9, "color": KIND_COLORS["skipped"]},
        "hovertemplate": "step %{x:,}: skipped (%{customdata})<extra></extra>",
    }


def skip_axis() -> dict:
    """The overlay y axis the skipped-step markers are drawn on (0..1, hidden)."""
    return {"overlaying": "y", "range": [0, 1], "visible": False, "fixedrange": True}


def step_note(recovery: Recovery | None, step: int) -> str:
    """What the ladder did at ``step``: ``"skipped (non-finite gradient)"``,
    ``"rollback → 25"``, both joined by " · ", or ""."""
    if recovery is None:
        return ""
    notes = []
    if step in recovery.skipped_steps:
        reason = recovery.skip_reasons[recovery.skipped_steps.index(step)]
        notes.append(f"skipped ({reason_label(reason)})")
    notes += [rollback_label(r) for r in recovery.rollbacks if r.step == step]
    if recovery.gave_up is not None and recovery.gave_up.step == step:
        notes.append(KIND_LABELS["gave_up"])
    return " · ".join(notes)
