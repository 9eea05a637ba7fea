"""The post-mortem report: one JSON object (schema: docs/POSTMORTEM.md) and its terminal rendering."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

from clippy_monitor.episodes import (
    DetectorTrace,
    Event,
    detector_trace,
    read_episodes,
    repeated_micro,
)
from clippy_monitor.postmortem import analysis
from clippy_monitor.postmortem.analysis import Departure, Options
from clippy_monitor.record import Run, load_run
from clippy_monitor.recovered import read_recovery
from clippy_monitor.replay_reading import read_replays
from clippy_monitor.sensitivity import event_sensitivity
from clippy_monitor.sharpness_reading import read_crossing

#: The analysis options used when a caller passes none (Options is frozen, so sharing is safe).
DEFAULT_OPTIONS = Options()

#: Version of the report's JSON schema (docs/POSTMORTEM.md).
SCHEMA_VERSION = 1


def _departure(d: Departure) -> dict:
    return {
        "name": d.name,
        "departed_at": d.step,
        "metric": d.metric,
        "max_z": _finite_or_none(d.max_z, keep_inf=True),
        "z": {k: _finite_or_none(v, keep_inf=True) for k, v in d.z.items()},
    }


def _finite_or_none(x: float, keep_inf: bool = False) -> float | str | None:
    """JSON has no NaN/inf: NaN -> null; inf -> the string ``"inf"`` where ``keep_inf`` (a z-score)."""
    if math.isfinite(x):
        return round(x, 2) if keep_inf else x
    if keep_inf and not math.isnan(x):
        return "inf" if x > 0 else "-inf"
    return None


def build_report(
    run: Run,
    *,
    redetect: Mapping[str, Any] | None = None,
    options: Options = DEFAULT_OPTIONS,
) -> dict:
    """The post-mortem of ``run`` as a JSON-ready dict.

    ``redetect``: None to use the recorded events; a mapping (possibly empty) of
    ``DetectorConfig`` thresholds to re-detect events offline (imports TensorFlow).
    """
    found, detector, trace = _episodes(run, redetect)
    events = [e.to_report() for e in found]
    focus = analysis.focus_event(run, events)
    event = events[focus] if focus is not None else None
    windows = analysis.event_windows(run, event, options)
    rows = analysis.moment_rows(run, event)
    layers = analysis.layer_departures(run, windows, options) if event else []
    tasks = analysis.task_departures(run, windows, options) if event else []
    culprit_names = analysis.culprits(layers)
    factors = analysis.factors_at(run, rows["step_b"])
    contrast = analysis.clippy_contrast(factors, culprit_names)
    reaction = event_sensitivity(run, event) if event else None
    dead = analysis.dead_units(run, windows)
    recovery = read_recovery(run)
    repeated = repeated_micro(found)
    return {
        **_run_fields(run),
        "verdict": analysis.verdict(
            run,
            events,
            focus,
            culprit_names,
            reaction,
            windows,
            dead["newly_dead"],
            recovery,
            repeated,
        ),
        "events": events,
        "events_source": "redetected" if redetect is not None else "recorded",
        "recovery": recovery.to_report() if recovery is not None else None,
        "repeated_micro": repeated.to_report() if repeated is not None else None,
        "focus": focus,
        "moments": {m: (event or {}).get(m) for m in analysis.MOMENTS},
        "culprits": culprit_names,
        "layer_departures": [_departure(d) for d in layers],
        "first_task": next((d.name for d in tasks if d.step is not None), None),
        "task_departures": [_departure(d) for d in tasks],
        "table": analysis.layer_table(run, rows) if event else {},
        "factors_at_step_b": factors,
        "clippy_contrast": contrast,
        "sensitivity_at_step_b": reaction.to_report() if reaction is not None else None,
        "dead_units": dead,
        "sharpness": _sharpness(run, event),
        "replays": [outcome.to_report() for outcome in read_replays(run)],
        **_settings_fields(run, windows, options, detector, trace),
    }


def _settings_fields(run: Run, windows: Any, options: Options, detector: Any, trace: Any) -> dict:
    """The report's closing keys: the windows, options and thresholds it used, and what
    the record skipped or the re-detection ignored."""
    return {
        "windows": {
            name: _steps_of(run, getattr(windows, name)) for name in ("baseline", "scan", "after")
        },
        "options": {k: getattr(options, k) for k in options.__dataclass_fields__},
        "thresholds": run.meta.get("thresholds"),
        "detector": detector,
        "skipped": list(run.skipped),
        "ignored": list(trace.ignored) if trace is not None else [],
    }


def _episodes(
    run: Run, redetect: Mapping[str, Any] | None
) -> tuple[list[Event], Any, DetectorTrace | None]:
    """The run's episodes, its detector settings and the recorded detector series: recorded
    (``redetect`` None) or re-detected offline (then no recorded series is read)."""
    if redetect is None:
        trace = detector_trace(run)
        return read_episodes(run, trace), run.meta.get("detector"), trace
    found, detector = analysis.redetect_events(run, redetect)
    return found, detector, None


def _sharpness(run: Run, event: Mapping[str, Any] | None) -> dict:
    """When the preconditioned sharpness first crossed 2, against the focus event's step-b
    (``clippy_monitor.sharpness_reading``), and the probe's period (``every``)."""
    every = run.meta.get("sharpness_every")
    crossing = read_crossing(run, (event or {}).get("step_b"))
    return {**crossing.to_report(), "every": every if isinstance(every, int) else None}


def _run_fields(run: Run) -> dict:
    """The report's opening keys: schema version, run path, step span, layers and tasks."""
    return {
        "schema_version": SCHEMA_VERSION,
        "run": str(run.path),
        "steps": len(run),
        "first_step": int(run.steps[0]) if len(run) else None,
        "last_step": int(run.steps[-1]) if len(run) else None,
        "layers": list(run.layers),
        "tasks": [n[len("loss/") :] for n in run.series_names if n.startswith("loss/")],
    }


def _steps_of(run: Run, rows: slice) -> list[int] | None:
    """``[first, last]`` step of a row window, None if empty."""
    if rows.stop <= rows.start:
        return None
    return [int(run.steps[rows.start]), int(run.steps[rows.stop - 1])]


def postmortem(
    path: str | os.PathLike | Run,
    *,
    redetect: Mapping[str, Any] | None = None,
    options: Options = DEFAULT_OPTIONS,
) -> dict:
    """Load the run at ``path`` (or take a loaded Run) and return :func:`build_report`'s dict."""
    run = path if isinstance(path, Run) else load_run(path)
    return build_report(run, redetect=redetect, options=options)


def to_json(report: Mapping[str, Any], indent: int | None = 2) -> str:
    """Strict JSON (no NaN/inf tokens: those are already null or strings in the report)."""
    return json.dumps(report, indent=indent, allow_nan=False)


# --------------------------------------------------------------------------
# Terminal rendering
# --------------------------------------------------------------------------
def _num(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return f"{x:.3g}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            str(c).ljust(w) if i == 0 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths))
        )

    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def _header_lines(report: Mapping[str, Any]) -> list[str]:
    """Run, steps, verdict and any unreadable or ignored parts of the record."""
    steps = report["steps"]
    span = f" (steps {report['first_step']}..{report['last_step']})" if steps else ""
    tasks = ", ".join(report["tasks"]) or "-"
    out = [
        f"run      {report['run']}",
        f"steps    {steps}{span}, {len(report['layers'])} layers, tasks: {tasks}",
        f"verdict  {report['verdict']}",
    ]
    if report["skipped"]:
        out.append(f"skipped  {len(report['skipped'])} unreadable part(s) of the record:")
        out.extend(f"         {note}" for note in report["skipped"])
    if report.get("ignored"):
        out.append("ignored  impossible recorded values (read as healthy / unknown):")
        out.extend(f"         {note}" for note in report["ignored"])
    return out


def _events_lines(report: Mapping[str, Any]) -> list[str]:
    """The table of detected events."""
    rows = [
        [
            str(i),
            e["kind"],
            _num(e["step_a"]),
            _num(e["step_b"]),
            _num(e["step_c"]),
            _num(e.get("decided_at")),
            _num(e["recovered"]),
            e["task"] or e["series"] or "-",
            str(e["reason"] or "-"),
        ]
        for i, e in enumerate(report["events"])
    ]
    header = ["#", "kind", "step_a", "step_b", "step_c", "decided", "recovered", "task", "reason"]
    return [f"events ({report['events_source']})", *_table(header, rows)]


def _task_lines(report: Mapping[str, Any]) -> list[str]:
    """Task losses in the order they left their baseline."""
    rows = [
        [d["name"], _num(d["departed_at"]), _num(d["max_z"])] for d in report["task_departures"]
    ]
    return [
        "task losses, earliest to leave their baseline first",
        *_table(["task", "departed_at", "max |z|"], rows),
    ]


def _culprit_lines(report: Mapping[str, Any], max_layers: int) -> list[str]:
    """The top ``max_layers`` layers by departure, with their step-b statistics."""
    shown = report["layer_departures"][:max_layers]
    rows = []
    for d in shown:
        b = report["table"].get(d["name"], {}).get("step_b", {})
        rows.append(
            [
                d["name"],
                _num(d["departed_at"]),
                d["metric"] or "-",
                _num(d["max_z"]),
                _num(b.get("grad_norm")),
                _num(b.get("grad_weight_ratio")),
                _num(b.get("update_weight_linf")),
            ]
        )
    header = ["layer", "departed_at", "first by", "max |z|", "|g| @b", "|g|/|w| @b", "|r/w|inf @b"]
    return [
        "culprits: layers ranked by how early and how far they left their baseline "
        f"(top {len(shown)})",
        *_table(header, rows),
    ]


def fixed_thresholds_text(thresholds: Mapping[str, Any] | None) -> str:
    """``GC 0.1, AGC 0.001, Clippy 0.5 / 0.01``: the thresholds the recorded factors were computed at."""
    t = thresholds or {}
    parts = [
        f"GC {_num(t.get('gc_clipnorm'))}",
        f"AGC {_num(t.get('agc_clipping'))}",
        f"Clippy {_num(t.get('lambda_rel'))} / {_num(t.get('lambda_abs'))}",
    ]
    return ", ".join(parts)


def _factor_lines(report: Mapping[str, Any], max_layers: int) -> list[str]:
    """GC, AGC and Clippy clipping factors at step-b at the recorded (fixed) thresholds, culprits first."""
    factors = report["factors_at_step_b"]
    order = [d["name"] for d in report["layer_departures"]] or list(factors)
    keys = ("gc", "agc", "clippy", "clippy_over_gc", "clippy_over_agc")
    rows = [[name, *(_num(factors[name][k]) for k in keys)] for name in order[:max_layers]]
    return [
        f"clipping factors at step-b ({report['moments']['step_b']}) at the paper's thresholds, "
        f"as you would train with them ({fixed_thresholds_text(report.get('thresholds'))}); "
        "ratio < 1: Clippy clips harder",
        *_table(["layer", "GC", "AGC", "Clippy", "Clippy/GC", "Clippy/AGC"], rows),
    ]


#: Columns of the calibrated comparison's per-rule table (text and HTML).
REACTION_HEADER = [
    "rule", "measurement", "hardest-hit layer", "healthy median", "threshold",
    "at step-b", "jump", "σ at step-b", "largest jump (layer)",
]  # fmt: skip


def reaction_rows(sensitivity: Mapping[str, Any]) -> list[list[str]]:
    """One row of :data:`REACTION_HEADER` per rule of ``report["sensitivity_at_step_b"]``."""
    rows = []
    for r in sensitivity["rules"]:
        x = sensitivity["layers"].get(r["layer"], {}).get(r["rule"], {}) if r["layer"] else {}
        top = f"{_num(r['largest_jump'])}x ({r['largest_jump_layer'] or '-'})"
        rows.append(
            [
                r["label"] + (" (reacts most)" if r["rule"] == sensitivity["reacts_most"] else ""),
                r["measurement_label"],
                r["layer"] or "-",
                _num(x.get("healthy_median")),
                _num(r["threshold"]),
                _num(x.get("value")),
                f"{_num(r['jump'])}x",
                _num(r["factor"]),
                top,
            ]
        )
    return rows


def reaction_layer_rows(
    sensitivity: Mapping[str, Any], order: list[str], max_layers: int
) -> tuple[list[str], list[list[str]]]:
    """Per layer (in ``order``): each measurement's jump, then each rule's calibrated factor."""
    rules = [r["rule"] for r in sensitivity["rules"]]
    labels = {r["rule"]: r for r in sensitivity["rules"]}
    header = [
        "layer",
        *(f"{labels[r]['measurement_label']} jump" for r in rules),
        *(f"σ {labels[r]['label']}" for r in rules),
    ]
    layers = sensitivity["layers"]
    rows = [
        [
            name,
            *(_num(layers[name][r]["jump"]) for r in rules),
            *(_num(layers[name][r]["factor"]) for r in rules),
        ]
        for name in [n for n in order if n in layers][:max_layers]
    ]
    return header, rows


def _reaction_lines(report: Mapping[str, Any], max_layers: int) -> list[str]:
    """How each rule reacts at step-b with thresholds calibrated on the run's healthy steps (Figure 4b)."""
    s = report["sensitivity_at_step_b"]
    head = [
        f"how each rule reacts at step-b ({s['step_b']}), thresholds calibrated on this run's "
        f"healthy steps ({s['quantile']:.0%} of them unclipped)",
        f"  {s['text']}",
    ]
    if not s["rules"]:
        return head
    order = [d["name"] for d in report["layer_departures"]] or list(s["layers"])
    header, rows = reaction_layer_rows(s, order, max_layers)
    return [*head, *_table(REACTION_HEADER, reaction_rows(s)), "", *_table(header, rows)]


def _dead_lines(dead: Mapping[str, Any]) -> list[str]:
    """Zero-gradient share before and after the event, and the layers newly dead."""
    before, after = dead["before"], dead["after"]
    out = [
        f"dead units (zero-gradient share, mean over layers): {_num(before['mean'])} before "
        f"(steps {before['steps']}) -> {_num(after['mean'])} after (steps {after['steps']})"
    ]
    newly = dead["newly_dead"]
    if newly:
        more = f" (+{len(newly) - 8} more)" if len(newly) > 8 else ""
        out.append(f"         newly dead (share up by >= 0.25): {', '.join(newly[:8])}{more}")
    return out


#: Columns of the rollback table (text and HTML).
ROLLBACK_HEADER = ["#", "from step", "to snapshot", "batches skipped", "cool-down", "trigger"]


def skipped_line(recovery: Mapping[str, Any], first: int = 10) -> str | None:
    """``2 steps (non_finite_gradient: 2); first: 30, 40`` or None when none was skipped."""
    steps = recovery["skipped_steps"]
    if not steps:
        return None
    why = ", ".join(f"{reason}: {n}" for reason, n in recovery["skip_reasons"].items())
    more = f" (+{len(steps) - first} more)" if len(steps) > first else ""
    shown = ", ".join(str(s) for s in steps[:first])
    return f"{len(steps)} step{'s' if len(steps) != 1 else ''} ({why}); first: {shown}{more}"


def cooldown_text(rollback: Mapping[str, Any]) -> str:
    """``lr x0.1 over 10 steps``: the learning-rate cool-down after a rollback (``-`` if unknown)."""
    factor, steps = rollback["lr_factor"], rollback["cooldown_steps"]
    if factor is None or steps is None:
        return "-"
    return f"lr x{factor:g} over {steps} step{'s' if steps != 1 else ''}"


def rollback_rows(recovery: Mapping[str, Any]) -> list[list[str]]:
    """One row of :data:`ROLLBACK_HEADER` per rollback."""
    return [
        [
            str(i + 1),
            str(r["step"]),
            str(r["snapshot_step"]),
            str(r["batches_skipped"]),
            cooldown_text(r),
            r["trigger"] or "-",
        ]
        for i, r in enumerate(recovery["rollbacks"])
    ]


def after_line(recovery: Mapping[str, Any], last_step: int | None) -> str | None:
    """Whether the run stayed healthy after the last rollback (None without a rollback, or
    without a readable step)."""
    healthy = recovery["stayed_healthy"]
    if healthy is None or not recovery["rollbacks"] or last_step is None:
        return None
    if healthy:
        later = last_step - recovery["rollbacks"][-1]["step"]
        return (
            f"stayed healthy through the last recorded step {last_step} "
            f"({later} step{'s' if later != 1 else ''} later)"
        )
    if recovery["gave_up"] is not None:
        return "diverged again, and the ladder gave up"
    return "diverged again (see events)"


def gave_up_line(recovery: Mapping[str, Any]) -> str | None:
    """``at step 49: <the monitor's message>`` or None when the ladder did not give up."""
    gave_up = recovery["gave_up"]
    if gave_up is None:
        return None
    return f"at step {gave_up['step']}: {gave_up['message'] or gave_up['trigger'] or '-'}"


def _recovery_lines(report: Mapping[str, Any]) -> list[str]:
    """The recovery ladder: summary, skipped steps, rollbacks, what followed, giving up."""
    rec = report["recovery"]
    out = [f"recovery  {rec['summary']}"]
    skipped = skipped_line(rec)
    if skipped:
        out.append(f"skipped   {skipped}")
    if rec["rollbacks"]:
        out.append("rollbacks (the diverged steps stay in the record)")
        out.extend(_table(ROLLBACK_HEADER, rollback_rows(rec)))
        after = after_line(rec, report["last_step"])
        if after:
            out.append(f"after the last rollback: {after}")
    gave_up = gave_up_line(rec)
    if gave_up:
        out.append(f"gave up   {gave_up}")
    return out


def sharpness_line(report: Mapping[str, Any]) -> str | None:
    """``preconditioned sharpness (every N steps): <reading>``, or None for a run recorded
    without the probe (and without sharpness values)."""
    sharpness = report.get("sharpness")
    if not sharpness or (sharpness["every"] is None and not sharpness["probes"]):
        return None
    every = f" (probed every {sharpness['every']} steps)" if sharpness["every"] else ""
    return f"preconditioned sharpness{every}: {sharpness['text']}"


#: Columns of the "Replays" table (text and HTML), one row per :func:`replay_rows` row.
REPLAY_HEADER = ["replay", "optimizer", "steps", "diverged", "loss at step-c", "peak sharpness"]


def replay_rows(report: Mapping[str, Any]) -> list[list[str]]:
    """The "Replays" table's rows: per replay, the original's values in parentheses."""
    rows = []
    for r in report.get("replays") or []:
        diverged = f"yes: {r['reason']} at {r['full_step']}" if r["diverged"] else "no"
        orig_loss, loss = r["loss_at_c"]
        orig_sharp, sharp = r["peak_sharpness"]
        rows.append(
            [
                r["name"],
                r["optimizer"] + ("" if r["restored_all"] else " (state partly restored)"),
                f"{r['snapshot_step'] + 1}-{r['last_step']}",
                diverged,
                f"{_num(loss)} (original {_num(orig_loss)})",
                "-"
                if sharp is None and orig_sharp is None
                else f"{_num(sharp)} (original {_num(orig_sharp)})",
            ]
        )
    return rows


def _replay_lines(report: Mapping[str, Any]) -> list[str]:
    """The "Replays" section: one verdict line and one table row per replay."""
    lines = ["replays   (the first full divergence trained again from the snapshot before step-a)"]
    lines += [f"  {r['verdict']}" for r in report["replays"]]
    return lines + _table(REPLAY_HEADER, replay_rows(report))


def render_text(report: Mapping[str, Any], max_layers: int = 12) -> str:
    """A compact terminal summary of ``report`` (the JSON has everything)."""
    sections = [_header_lines(report)]
    if sharpness_line(report) is not None:
        sections[0].append(f"sharpness {sharpness_line(report)}")
    if report.get("recovery") is not None:
        sections.append(_recovery_lines(report))
    if report["events"]:
        sections.append(_events_lines(report))
    if report.get("replays"):
        sections.append(_replay_lines(report))
    if report["task_departures"]:
        sections.append(_task_lines(report))
    if report["layer_departures"]:
        sections.append(_culprit_lines(report, max_layers))
    if report.get("sensitivity_at_step_b"):
        sections.append(_reaction_lines(report, max_layers))
    if report["factors_at_step_b"]:
        sections.append(_factor_lines(report, max_layers))
    if report["dead_units"]["before"] is not None:
        sections.append(_dead_lines(report["dead_units"]))
    return "\n\n".join("\n".join(lines) for lines in sections).rstrip() + "\n"
