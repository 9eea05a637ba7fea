"""A run's state for the Dash app: health badge, episodes, alerts, lowest factors, run list."""

from __future__ import annotations

import math
import os
import time
from typing import Any

import numpy as np
from clippy_monitor.dashboards.dash_app.recovery import (
    gave_up_alerts,
    rollback_alerts,
    skipped_alerts,
)
from clippy_monitor.dashboards.dash_app.runs import Catalog, LiveRun
from clippy_monitor.dashboards.dash_app.style import RULE_LABELS

from clippy_monitor.episodes import (
    AUC_COLLAPSE,
    Event,
    RepeatedMicro,
    events_of,
    open_episode,
    read_episodes,
    repeated_micro,
)
from clippy_monitor.record.format import RECORD_FILE
from clippy_monitor.record.status import ABNORMAL, DIVERGED, HEALTHY, decode_status
from clippy_monitor.recovered import Recovery, read_recovery


def health(live: LiveRun) -> dict:
    """The detector state of the last recorded step, for the health badge.

    ``{"state": "waiting" | "healthy" | "micro" | "diverged" | "unknown", "title", "detail",
    "step", "recovery"}``; ``recovery`` is the recovery ladder's
    :meth:`~clippy_monitor.recovered.Recovery.summary` (None: recorded without it).
    """
    if not len(live):
        return _badge("waiting", "Waiting for data", "no step recorded yet", None)
    recovery = read_recovery(live)
    summary = recovery.summary() if recovery is not None else None
    return {**_detector_badge(live, recovery), "recovery": summary}


def _detector_badge(live: LiveRun, recovery: Recovery | None) -> dict:
    """The badge from the detector at the last step (or the ladder having given up)."""
    last = int(live.steps[-1])
    if recovery is not None and recovery.gave_up is not None:
        g = recovery.gave_up
        why = f" · {g.trigger}" if g.trigger else ""
        return _badge(
            "diverged", "Training stopped", f"recovery gave up at step {g.step:,}{why}", last
        )
    recorded = events_of(live)
    fulls = [e for e in recorded if e.kind == "full"]
    # The earliest: an auc_collapse may precede the loss detector's full in the file.
    full = min(fulls, key=lambda e: e.step_c if e.step_c is not None else 2**63, default=None)
    if not live.has_series("detector/status"):
        return _health_without_detector(full, last)
    status = live.series("detector/status")
    code, reason = decode_status(status[-1])
    if full is not None and full.reason == AUC_COLLAPSE and code != DIVERGED:
        return _diverged(live, status[:0], full, reason, last)  # the AUC alone: no status 2
    if code == HEALTHY:
        micro = sum(1 for e in recorded if e.kind == "micro")
        detail = _healthy_detail(micro, recovery, repeated_micro(recorded))
        return _badge("healthy", "Healthy", detail, last)
    if code == ABNORMAL:
        return _micro_in_progress(live, last)
    return _diverged(live, status, full, reason, last)


def _healthy_detail(
    micro: int, recovery: Recovery | None, repeated: RepeatedMicro | None = None
) -> str:
    if repeated is not None:
        return f"{repeated.describe()} ({micro} recovered so far)"
    if micro:
        return f"{micro} micro-divergence{'s' if micro != 1 else ''} recovered so far"
    if recovery is not None and recovery.rollbacks:
        return f"no divergence since the rollback at step {recovery.rollbacks[-1].step:,}"
    return "no divergence detected"


def _badge(state: str, title: str, detail: str, step: int | None) -> dict:
    return {"state": state, "title": title, "detail": detail, "step": step, "recovery": None}


def _health_without_detector(full: Event | None, last: int) -> dict:
    """A record without a detector series: only a recorded full divergence tells its state."""
    if full is not None:
        return _badge("diverged", "Fully diverged", f"at step {fmt_step(full.step_c)}", last)
    return _badge("unknown", "No detector", "this record has no detector/status series", last)


def _micro_in_progress(live: LiveRun, last: int) -> dict:
    """The detector is abnormal at the last step: the open episode's step-b and task."""
    episode = open_episode(live)
    task = f" · task {task_name(episode.series)}" if episode is not None and episode.series else ""
    since = fmt_step(episode.step_b if episode else None)
    return _badge(
        "micro", "Micro-divergence in progress", f"loss rising since step {since}{task}", last
    )


def _diverged(
    live: LiveRun, status: np.ndarray, full: Event | None, reason: str | None, last: int
) -> dict:
    """Fully diverged: step-c and reason from the recorded event, else from the status series."""
    diverged = np.flatnonzero(status >= DIVERGED - 1e-3)
    step_c = int(live.steps[diverged[0]]) if diverged.size else last
    if full is not None and full.step_c is not None:
        step_c = full.step_c
        reason = full.reason or reason
    detail = f"since step {step_c:,} · {(reason or 'no_recovery').replace('_', ' ')}"
    return _badge("diverged", "Fully diverged", detail, last)


def task_name(series: Any) -> str:
    text = str(series)
    return text[len("loss/") :] if text.startswith("loss/") else text


def fmt_step(step: Any) -> str:
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
    task = f" ({task_name(e['task'])})" if e.get("task") else ""
    if e["kind"] == "full":
        return (
            f"Full divergence{task}: step-a {fmt_step(e.get('step_a'))} → "
            f"step-b {fmt_step(e['step_b'])} → step-c {fmt_step(e.get('step_c'))}"
        )
    if e["kind"] == "micro":
        return (
            f"Micro-divergence{task}: step-b {fmt_step(e['step_b'])}, "
            f"recovered at {fmt_step(e.get('recovered'))}"
        )
    return f"In progress{task}: step-b {fmt_step(e['step_b'])}, not recovered yet"


def alerts(live: LiveRun, max_events: int = 3) -> list[dict]:
    """Alerts for the page, most severe first: ``{"level": "danger" | "warning" | "info", "text"}``.

    The recovery ladder's (:mod:`.recovery`): the ladder giving up first, each rollback
    after the full divergence, the skipped steps after the micro-divergences.
    """
    eps = episodes(live)
    recovery = read_recovery(live)
    return [
        *gave_up_alerts(recovery),
        *_full_alerts(eps),
        *rollback_alerts(recovery, max_events),
        *_repeated_alerts(eps),
        *_micro_alerts(eps, max_events),
        *skipped_alerts(recovery),
        *_reader_alerts(live),
    ]


def _full_alerts(eps: list[dict]) -> list[dict]:
    out = []
    for e in [e for e in eps if e["kind"] == "full"][:1]:
        task = f" in task {task_name(e['task'])}" if e.get("task") else ""
        reason = f" ({str(e['reason']).replace('_', ' ')})" if e.get("reason") else ""
        if e.get("reason") == AUC_COLLAPSE:
            out.append({"level": "danger", "text": _auc_collapse_text(e)})
            continue
        out.append(
            {
                "level": "danger",
                "text": f"Full divergence detected{task}: healthy until step-a "
                f"{fmt_step(e.get('step_a'))}, loss rising from step-b {fmt_step(e['step_b'])}, "
                f"fully diverged at step-c {fmt_step(e.get('step_c'))}{reason}. "
                "Open Replay to see why.",
            }
        )
    return out


def _auc_collapse_text(e: dict) -> str:
    """The alert of a full divergence judged by the evaluation AUC (``evaluations.AucRule``)."""
    return (
        f"Full divergence by evaluation: {e.get('task')} fell to chance at step "
        f"{fmt_step(e['step_b'])} (last evaluation above chance at step {fmt_step(e.get('step_a'))}) "
        f"and stayed there at step {fmt_step(e.get('step_c'))} (auc collapse; the loss "
        "detector did not call it full)."
    )


def _repeated_alerts(eps: list[dict]) -> list[dict]:
    """One warning when the run consistently micro-diverges (``episodes.repeated_micro``)."""
    found = repeated_micro([Event.from_record(e) for e in eps])
    if found is None:
        return []
    return [{"level": "warning", "text": f"{found.describe()[0].upper()}{found.describe()[1:]}."}]


def _micro_alerts(eps: list[dict], max_events: int) -> list[dict]:
    """The episode in progress, then the latest micro-divergences."""
    out = []
    for e in [e for e in eps if e["kind"] == "open"]:
        task = f" in task {task_name(e['task'])}" if e.get("task") else ""
        out.append(
            {
                "level": "warning",
                "text": f"Micro-divergence in progress{task}: the loss has been above its "
                f"baseline since step {fmt_step(e['step_b'])}.",
            }
        )
    micro = sorted((e for e in eps if e["kind"] == "micro"), key=lambda e: -e["step_b"])
    for e in micro[:max_events]:
        task = f" in task {task_name(e['task'])}" if e.get("task") else ""
        out.append(
            {
                "level": "warning",
                "text": f"Micro-divergence detected{task} at step {fmt_step(e['step_b'])}; "
                f"recovered at step {fmt_step(e.get('recovered'))}.",
            }
        )
    if len(micro) > max_events:
        out.append(
            {
                "level": "warning",
                "text": f"… and {len(micro) - max_events} earlier micro-divergences.",
            }
        )
    return out


def _reader_alerts(live: LiveRun) -> list[dict]:
    """What the reader ran into: a record replaced while shown, damaged bytes skipped."""
    out = []
    if live.reloads:
        out.append(
            {
                "level": "warning",
                "text": "The record shrank or was replaced while displayed; it was read again from the start.",
            }
        )
    if live.skipped:
        more = f" (+{len(live.skipped) - 1} more)" if len(live.skipped) > 1 else ""
        out.append(
            {
                "level": "warning",
                "text": f"Damaged bytes skipped while reading: {live.skipped[-1]}{more}",
            }
        )
    return out


def lowest_factors(live: LiveRun) -> list[dict]:
    """Per rule: the lowest factor over layers at the last step, and over the whole run.

    ``{"rule", "label", "now", "now_layer", "low", "low_step", "low_layer"}`` (None where unknown).
    """
    rows = []
    for rule in live.rules:
        low, where = live.min_factor(rule)
        entry = {
            "rule": rule,
            "label": RULE_LABELS[rule],
            "now": None,
            "now_layer": None,
            "low": None,
            "low_step": None,
            "low_layer": None,
        }
        if len(low):
            if math.isfinite(low[-1]):
                entry["now"] = float(low[-1])
                entry["now_layer"] = (
                    live.layers[int(where[-1])] if low[-1] < 1 else None
                )  # 1: no layer clipped
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
            recovery = read_recovery(live)
            ladder = f" · {recovery.summary()}" if recovery is not None and recovery.acted else ""
            return {
                "name": name,
                "state": h["state"],
                "detail": f"{h['title']}{ladder} · {len(live):,} steps",
            }
    events = catalog.recorded_events(name)
    if any(e.get("kind") == "full" for e in events):
        return {"name": name, "state": "diverged", "detail": "full divergence recorded"}
    micro = sum(1 for e in events if e.get("kind") == "micro")
    if micro:
        return {
            "name": name,
            "state": "micro-done",
            "detail": f"{micro} micro-divergence{'s' if micro > 1 else ''}",
        }
    return {"name": name, "state": "unknown", "detail": "no divergence recorded"}
