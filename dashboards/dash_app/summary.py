"""The post-mortem of one episode beside the Replay view: the post-mortem's own pipeline
(:mod:`clippy_monitor.postmortem.analysis`) on the whole record."""

from __future__ import annotations

from typing import NamedTuple

from clippy_monitor.dashboards.dash_app.runs import LiveRun

from clippy_monitor.episodes import Event, read_episodes
from clippy_monitor.postmortem import analysis
from clippy_monitor.record import Run, load_run
from clippy_monitor.sensitivity import Sensitivity, event_sensitivity


def postmortem_summary(live: LiveRun, episode: dict) -> dict:
    """The post-mortem of ``episode``; not cached (it takes milliseconds even on long runs).

    Returns ``{"source": "postmortem", "verdict", "culprits", "first_task",
    "factors_at_step_b": {layer: {gc, agc, clippy, clippy_over_gc, clippy_over_agc}},
    "contrast": {layer, gc, agc, clippy, ...} | None (at the recorded, fixed thresholds),
    "sensitivity": Sensitivity (thresholds calibrated on the healthy steps, the verdict's),
    "dead_units": {...} | None, "note"}``.
    Reads the whole record (the post-mortem is not a live view): RecordError or
    OSError if it cannot.
    """
    return _summary(load_run(live.path), episode)


def _summary(run: Run, episode: dict) -> dict:
    events, focus = _events_with(run, episode)
    event = events[focus]
    windows = analysis.event_windows(run, event)
    culprit_names = analysis.culprits(analysis.layer_departures(run, windows))
    tasks = analysis.task_departures(run, windows)
    factors = analysis.factors_at(run, analysis.moment_rows(run, event)["step_b"])
    contrast = analysis.clippy_contrast(factors, culprit_names)
    reaction = event_sensitivity(run, event)
    return {
        "source": "postmortem",
        "verdict": analysis.verdict(run, events, focus, culprit_names, reaction, windows),
        "culprits": culprit_names,
        "first_task": next((d.name for d in tasks if d.step is not None), None),
        "factors_at_step_b": factors,
        "contrast": contrast,
        "sensitivity": reaction,
        "dead_units": analysis.dead_units(run, windows),
        "note": None,
    }


def _events_with(run: Run, episode: dict) -> tuple[list[dict], int]:
    """The run's episodes as the post-mortem reads them, and the index of ``episode``
    (appended if the record does not hold it, e.g. one still open)."""
    events = [e.to_report() for e in read_episodes(run)]
    for i, e in enumerate(events):
        if e["step_b"] == episode["step_b"] and e["kind"] == episode["kind"]:
            return events, i
    return [*events, Event.from_record(episode, "dashboard").to_report()], len(events)


class ReactionRow(NamedTuple):
    """One rule in the Replay view's calibrated comparison: its hardest-hit layer at step-b."""

    rule: str  # the rule's label
    measurement: str  # its measurement's label
    layer: str | None
    jump: float | None  # the measurement at step-b over its healthy median (may be inf)
    factor: float | None  # the factor at step-b with the calibrated threshold
    reacts_most: bool


def reaction_rows(sensitivity: Sensitivity | None) -> list[ReactionRow]:
    """The calibrated comparison's rows, one per rule ([] when there is none)."""
    if sensitivity is None:
        return []
    return [
        ReactionRow(
            r.label,
            r.measurement_label,
            r.hardest.layer if r.hardest else None,
            r.hardest.jump if r.hardest else None,
            r.factor,
            r.rule == sensitivity.reacts_most,
        )
        for r in sensitivity.rules
    ]
