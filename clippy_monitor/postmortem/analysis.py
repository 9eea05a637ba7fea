"""Post-mortem analysis of a run record: small pure functions over a :class:`~clippy_monitor.record.Run`.

Tang et al., KDD 2023, give the vocabulary:

* section 2.1 -- *micro-divergence* (the loss jumps, then recovers) and *full
  divergence* (the loss stays high);
* section 4.1 / Figure 4a -- *step-a* (last healthy step), *step-b* (the loss
  starts to rise) and *step-c* (fully diverged);
* Figure 4b / appendix B (Figure 7) -- per layer, ``||g||_2``, ``||g||_2/||w||_2``
  and ``||r/w||_inf`` leave their healthy level at step-b; GC's and AGC's factors
  barely move there while Clippy's is orders of magnitude smaller.

Nothing here imports TensorFlow unless re-detection is asked for
(:func:`redetect_events`).  Windows are counted in recorded rows; all
statistics are read from the record (the factors are the would-apply factors
the monitor computed with ``clippy_monitor.clipping`` at the thresholds in
``run.meta["thresholds"]``), never recomputed here.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from clippy_monitor import catalog
from clippy_monitor.episodes import Event, RepeatedMicro, task_of
from clippy_monitor.evaluations import AUC_COLLAPSE
from clippy_monitor.record import Run
from clippy_monitor.recovered import Recovery
from clippy_monitor.sensitivity import Sensitivity, summary_text

#: Measurements shown per layer at step-a/b/c: what GC, AGC and Clippy threshold (eqs. 2-4).
MEASUREMENTS = catalog.measurements()
#: Statistics whose departure from their own baseline makes a layer a culprit (Figure 4b):
#: the measurements, Clippy's first.
CULPRIT_METRICS = tuple(sorted(MEASUREMENTS, key=lambda m: not catalog.is_clippys(m)))
#: Clipping rules whose recorded factors are compared (``applied``: what the optimizer did).
RULES = catalog.RULE_NAMES
MOMENTS = catalog.MOMENT_NAMES
#: The keys of an event in the report (``Event.to_report``).
EVENT_KEYS = (
    "kind",
    "step_a",
    "step_b",
    "step_c",
    "recovered",
    "confirmed_at",
    "decided_at",
    "task",
    "series",
    "reason",
    "source",
)

_MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution -> its standard deviation
_TINY = 1e-30  # floor before log10: a zero statistic is "very small", not -inf


@dataclasses.dataclass(frozen=True)
class Options:
    """Knobs of the culprit search (windows in recorded rows).

    Attributes:
        baseline_steps: rows in each layer's pre-onset baseline window.
        lead_steps: rows before step-b that are searched for an early departure
            (the baseline window ends where they start).
        z_threshold: robust z-score (median/MAD) beyond which a statistic has left its baseline.
        min_log_scale: floor of the baseline spread of log10 statistics, in decades;
            with 0.05 and z 6 a noise-free statistic must change by 2x to count.
        min_rel_scale: floor of a task loss's baseline spread, relative to its median.
        max_gap: a departure must be sustained up to step-b: it starts at the first
            row of the last run of rows beyond ``z_threshold`` that reaches (within
            ``max_gap`` rows) step-b, allowing gaps of up to ``max_gap`` rows, so a
            lone noise excursion long before the onset does not count.
    """

    baseline_steps: int = 200
    lead_steps: int = 50
    z_threshold: float = 6.0
    min_log_scale: float = 0.05
    min_rel_scale: float = 0.05
    max_gap: int = 3


@dataclasses.dataclass(frozen=True)
class Departure:
    """How early and how far one layer (or task loss) left its baseline before/at step-b.

    ``step`` is the first step with ``|z| > z_threshold`` (None if it never did),
    ``metric`` the statistic with the largest ``|z|`` at that step, ``max_z`` the
    largest ``|z|`` up to step-b (``inf`` for a non-finite value), ``z`` that
    maximum per statistic.
    """

    name: str
    step: int | None
    metric: str | None
    max_z: float
    z: dict[str, float]


@dataclasses.dataclass(frozen=True)
class Windows:
    """Row ranges around an event: ``baseline`` (pre-onset), ``scan`` (lead-up to and
    including step-b), ``after`` (from step-c / recovery / step-b on)."""

    baseline: slice
    scan: slice
    after: slice


# --------------------------------------------------------------------------
# Steps and rows
# --------------------------------------------------------------------------
def row_of(run: Run, step: int | None) -> int | None:
    """Row index of ``step`` in ``run`` (None if the step is not recorded)."""
    if step is None or not len(run):
        return None
    i = int(np.searchsorted(run.steps, step))
    return i if i < len(run) and int(run.steps[i]) == step else None


def moment_rows(run: Run, event: Mapping[str, Any] | None) -> dict[str, int | None]:
    """Rows of step-a, step-b and step-c of ``event`` (None where absent or not recorded)."""
    if event is None:
        return dict.fromkeys(MOMENTS)
    return {m: row_of(run, event.get(m)) for m in MOMENTS}


# --------------------------------------------------------------------------
# Re-detection (the recorded episodes: clippy_monitor.episodes.read_episodes)
# --------------------------------------------------------------------------
def loss_matrix(run: Run) -> tuple[np.ndarray, list[str]]:
    """The detector's input: per-task losses ``[steps, tasks]`` (or the total loss ``[steps]``)
    and the detector series names (``["loss", "loss/<task>", ...]``)."""
    tasks = [n for n in run.series_names if n.startswith("loss/")]
    if tasks:
        return np.stack([run.series(t) for t in tasks], axis=1), ["loss", *tasks]
    return np.asarray(run.series("loss")), ["loss"]


def redetect_events(run: Run, thresholds: Mapping[str, Any]) -> tuple[list[Event], dict]:
    """Re-run the divergence detector offline with ``thresholds`` over the recorded losses.

    ``thresholds`` override the record's own (``run.meta["detector"]``).  Runs the
    same state machine as training (``detector_outputs`` + ``EventTracker``); this
    is the only function here that imports TensorFlow.  With per-task losses the
    total is their sum (as ``detect_divergence``).  Returns ``(events, config)``.
    """
    from clippy_monitor.monitor.detectors import DetectorConfig, EventTracker, detector_outputs
    from clippy_monitor.monitor.offline import total_loss

    recorded = run.meta.get("detector") if isinstance(run.meta.get("detector"), dict) else {}
    config = DetectorConfig.known(recorded)
    config.update(thresholds)
    loss, names = loss_matrix(run)
    grad_norm = run.series("grad_norm") if "grad_norm" in run.series_names else None
    zero = (
        run.layer("zero_grad_fraction")
        if "zero_grad_fraction" in run.layer_metrics and run.layers
        else None
    )
    outputs = detector_outputs(loss, grad_norm, zero, **config)
    tracker = EventTracker(names)
    events = tracker.update_events(run.steps, outputs, total_loss(loss))
    if (pending := tracker.pending_event()) is not None:
        events.append(pending)  # still open at the last step: kind "open"
    return [dataclasses.replace(e, source="redetected") for e in events], DetectorConfig(
        **config
    ).to_dict()


def _peak_ratio(run: Run, event: Mapping[str, Any]) -> float:
    """Peak total loss during a micro-divergence over the loss at step-a."""
    rows = moment_rows(run, event)
    start = rows["step_b"]
    if start is None or "loss" not in run.series_names:
        return 0.0
    stop = row_of(run, event.get("recovered")) or start + 1
    loss = run.series("loss")
    before = abs(loss[rows["step_a"]]) if rows["step_a"] is not None else abs(loss[start])
    peak = np.nanmax(np.abs(loss[start:stop])) if stop > start else abs(loss[start])
    return float(peak / before) if before > 0 else float("inf")


def focus_event(run: Run, events: Sequence[Mapping[str, Any]]) -> int | None:
    """Index of the event the post-mortem explains: the first full divergence, else an
    open episode, else the micro-divergence with the highest loss peak."""
    for kind in ("full", "open"):
        for i, e in enumerate(events):
            if e["kind"] == kind and e["step_b"] is not None:
                return i
    micro = [i for i, e in enumerate(events) if e["step_b"] is not None]
    if not micro:
        return None
    return max(micro, key=lambda i: _peak_ratio(run, events[i]))


# --------------------------------------------------------------------------
# Windows and robust z-scores
# --------------------------------------------------------------------------
def event_windows(
    run: Run, event: Mapping[str, Any] | None, options: Options = Options()
) -> Windows:
    """Row windows for ``event``; for no event, the first and last ``baseline_steps`` rows
    (at most a third of the run each, so that they never overlap and dilute a change)."""
    n = len(run)
    size = options.baseline_steps
    rows = moment_rows(run, event)
    b = rows["step_b"]
    if b is None:
        size = min(size, max(n // 3, 1))
        return Windows(slice(0, min(size, n)), slice(0, 0), slice(max(n - size, 0), n))
    lead = min(options.lead_steps, b // 2)
    start = b - lead
    baseline = slice(max(start - size, 0), start)
    end = rows["step_c"] if rows["step_c"] is not None else row_of(run, event.get("recovered"))
    end = b if end is None else end
    return Windows(baseline, slice(start, b + 1), slice(end, min(end + size, n)))


def _log10(values: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.log10(np.maximum(values.astype(np.float64), _TINY))


def robust_z(baseline: np.ndarray, values: np.ndarray, min_scale: np.ndarray | float) -> np.ndarray:
    """``|values - median| / max(1.4826 MAD, min_scale)`` per column against ``baseline``.

    Both are ``[rows, columns]``.  A NaN or infinite value is infinitely far
    (``inf``); a column whose baseline is all NaN scores 0.
    """
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
        finite = np.where(np.isfinite(baseline), baseline, np.nan)
        if finite.shape[0] == 0 or np.all(np.isnan(finite)):
            return np.zeros(values.shape)
        median = np.nanmedian(finite, axis=0)
        mad = np.nanmedian(np.abs(finite - median), axis=0)
        scale = np.maximum(_MAD_TO_SIGMA * mad, min_scale)
        z = np.abs(values - median) / scale
    z = np.where(np.isfinite(values), z, np.inf)
    return np.where(np.isnan(median), 0.0, z)


def sustained_start(crossed: np.ndarray, max_gap: int) -> int | None:
    """First index of the last run of True in ``crossed`` that reaches its end, gaps of up
    to ``max_gap`` False allowed (also before the end); None if there is no such run."""
    hits = np.flatnonzero(crossed)
    if not hits.size or len(crossed) - 1 - hits[-1] > max_gap:
        return None
    breaks = np.flatnonzero(np.diff(hits) > max_gap + 1)
    return int(hits[breaks[-1] + 1]) if breaks.size else int(hits[0])


def _departures(
    names: Sequence[str],
    zs: Mapping[str, np.ndarray],
    scan_steps: np.ndarray,
    options: Options,
) -> list[Departure]:
    """One :class:`Departure` per column, given ``z`` ``[scan rows, columns]`` per statistic."""
    metrics = list(zs)
    if not metrics or not len(scan_steps):
        return [Departure(n, None, None, 0.0, {}) for n in names]
    stacked = np.stack([zs[m] for m in metrics])  # [metrics, rows, columns]
    combined = stacked.max(axis=0)
    crossed = combined > options.z_threshold
    out = []
    for j, name in enumerate(names):
        first = sustained_start(crossed[:, j], options.max_gap)
        out.append(
            Departure(
                name=name,
                step=int(scan_steps[first]) if first is not None else None,
                metric=metrics[int(np.argmax(stacked[:, first, j]))] if first is not None else None,
                max_z=float(combined[:, j].max()),
                z={m: float(zs[m][:, j].max()) for m in metrics},
            )
        )
    return out


def rank(departures: Sequence[Departure]) -> list[Departure]:
    """Earliest departure first, then the farthest (``max_z``); those that stayed within last."""
    return sorted(
        departures,
        key=lambda d: (d.step is None, d.step if d.step is not None else 0, -d.max_z),
    )


def layer_departures(run: Run, windows: Windows, options: Options = Options()) -> list[Departure]:
    """Every layer ranked by how early and how far :data:`CULPRIT_METRICS` left their own
    pre-onset baseline (robust z of log10 values) before or at step-b (Figure 4b, Figure 7)."""
    if (
        windows.scan.stop - windows.scan.start < 1
        or windows.baseline.stop - windows.baseline.start < 3
    ):
        return [Departure(n, None, None, 0.0, {}) for n in run.layers]
    zs = {}
    for metric in (m for m in CULPRIT_METRICS if m in run.layer_metrics):
        values = run.layer(metric)
        baseline = _log10(values[windows.baseline])
        scan = values[windows.scan].astype(np.float64)
        z = robust_z(
            baseline, np.where(np.isfinite(scan), _log10(scan), scan), options.min_log_scale
        )
        zs[metric] = z
    return rank(_departures(run.layers, zs, run.steps[windows.scan], options))


def culprits(departures: Sequence[Departure]) -> list[str]:
    """Names of the layers that left their baseline, in ranked order."""
    return [d.name for d in departures if d.step is not None]


def task_departures(run: Run, windows: Windows, options: Options = Options()) -> list[Departure]:
    """Task losses ranked by how early and how far they rose above their pre-onset baseline."""
    tasks = [n for n in run.series_names if n.startswith("loss/")]
    names = [task_of(t) or t for t in tasks]
    if (
        not tasks
        or windows.scan.stop - windows.scan.start < 1
        or windows.baseline.stop - windows.baseline.start < 3
    ):
        return [Departure(n, None, None, 0.0, {}) for n in names]
    losses = np.stack([run.series(t) for t in tasks], axis=1)
    baseline = losses[windows.baseline]
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        floor = options.min_rel_scale * np.abs(
            np.nanmedian(np.where(np.isfinite(baseline), baseline, np.nan), axis=0)
        )
    z = robust_z(baseline, losses[windows.scan], np.maximum(np.nan_to_num(floor), 1e-12))
    return rank(_departures(names, {"loss": z}, run.steps[windows.scan], options))


# --------------------------------------------------------------------------
# Per-layer values at step-a/b/c
# --------------------------------------------------------------------------
def _value(x: Any) -> float | None:
    """A finite number as a float (None otherwise); float32 values as their shortest decimal
    that reads back as the same float32 (``0.004``, not ``0.004000000189989805``)."""
    if isinstance(x, np.float32):
        return float(str(x)) if np.isfinite(x) else None
    x = float(x)
    return x if math.isfinite(x) else None


def _at(run: Run, metric: str, row: int | None) -> np.ndarray | None:
    if row is None or metric not in run.layer_metrics:
        return None
    return run.layer(metric)[row]


def _table_columns() -> dict[str, str]:
    """Key -> metric of :func:`layer_table`: the measurements, each rule's factor (keyed by
    the rule's name) and the catalog's other shown metrics (keyed by their own name)."""
    columns = {m: m for m in catalog.measurements()} | {r.name: r.factor for r in catalog.rules()}
    others = (m.name for m in catalog.metrics() if m.shown and not m.primary)
    return columns | {name: name for name in others}


def layer_table(
    run: Run, rows: Mapping[str, int | None]
) -> dict[str, dict[str, dict[str, float | None]]]:
    """``{layer: {moment: {measurement or rule: value}}}`` at step-a/b/c (paper Figure 4b):
    ``grad_norm`` ‖g‖₂, ``grad_weight_ratio`` ‖g‖₂/‖w‖₂, ``update_weight_linf`` ‖r/w‖∞ and the
    recorded factors ``gc``, ``agc``, ``clippy``, ``applied``, then every other metric the catalog
    shows (e.g. ``zero_grad_fraction``).  None = not recorded or not finite."""
    columns = _table_columns()
    values = {
        moment: {key: _at(run, metric, row) for key, metric in columns.items()}
        for moment, row in rows.items()
    }
    table = {}
    for j, layer in enumerate(run.layers):
        table[layer] = {
            moment: {key: (None if v is None else _value(v[j])) for key, v in cols.items()}
            for moment, cols in values.items()
        }
    return table


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


def factors_at(run: Run, row: int | None) -> dict[str, dict[str, float | None]]:
    """``{layer: {gc, agc, clippy, applied, clippy_over_gc, clippy_over_agc}}`` at ``row``
    (recorded values; a ratio of 0.01 means Clippy's factor is 100x smaller, Figure 4b)."""
    if row is None:
        return {}
    per_rule = {r: _at(run, catalog.FACTOR_METRICS[r], row) for r in RULES}
    out = {}
    for j, layer in enumerate(run.layers):
        entry = {r: (None if v is None else _value(v[j])) for r, v in per_rule.items()}
        entry["clippy_over_gc"] = _ratio(entry["clippy"], entry["gc"])
        entry["clippy_over_agc"] = _ratio(entry["clippy"], entry["agc"])
        out[layer] = entry
    return out


# --------------------------------------------------------------------------
# Dead units (section 4.1: "all pre-activations ... gradients extremely small")
# --------------------------------------------------------------------------
def _window_mean(run: Run, metric: str, rows: slice) -> dict:
    values = run.layer(metric)[rows]
    steps = run.steps[rows]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns give NaN
        per_layer = np.nanmean(values, axis=0) if len(values) else np.full(len(run.layers), np.nan)
    return {
        "steps": [int(steps[0]), int(steps[-1])] if len(steps) else None,
        "mean": _value(np.nanmean(per_layer)) if np.any(np.isfinite(per_layer)) else None,
        "by_layer": {layer: _value(v) for layer, v in zip(run.layers, per_layer)},
    }


def dead_units(run: Run, windows: Windows, jump: float = 0.25) -> dict:
    """Share of exactly-zero gradient entries (``zero_grad_fraction``) before and after.

    ``before``/``after``: mean over the baseline and the post-event window, overall
    (unweighted mean over layers) and per layer; ``newly_dead``: layers whose
    share rose by at least ``jump`` (dying ReLU, paper 4.1, footnote 3).
    """
    metric = "zero_grad_fraction"
    if metric not in run.layer_metrics or not len(run):
        return {"before": None, "after": None, "newly_dead": []}
    before = _window_mean(run, metric, windows.baseline)
    after = _window_mean(run, metric, windows.after)
    newly = [
        layer
        for layer in run.layers
        if before["by_layer"][layer] is not None
        and after["by_layer"][layer] is not None
        and after["by_layer"][layer] - before["by_layer"][layer] >= jump
    ]
    return {"before": before, "after": after, "newly_dead": newly}


# --------------------------------------------------------------------------
# Verdict
# --------------------------------------------------------------------------
def _fmt(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.3g}"


def _loss_level(run: Run, rows: slice) -> float | None:
    if "loss" not in run.series_names or rows.stop <= rows.start:
        return None
    values = run.series("loss")[rows]
    values = values[np.isfinite(values)]
    if not values.size:
        return None
    with np.errstate(over="ignore"):
        median = float(np.median(values))
    # Averaging the two middle values can overflow near the largest float: take the lower one.
    return median if math.isfinite(median) else float(np.quantile(values, 0.5, method="lower"))


def clippy_contrast(
    factors: Mapping[str, Mapping[str, float | None]], prefer: Sequence[str] = ()
) -> dict | None:
    """The layer where Clippy clips hardest at step-b (the first of ``prefer`` with a factor
    below 1, else the smallest factor) and its factors under the three rules."""
    usable = {k: v for k, v in factors.items() if v.get("clippy") is not None}
    if not usable:
        return None
    chosen = next((p for p in prefer if p in usable and usable[p]["clippy"] < 1.0), None)
    if chosen is None:
        chosen = min(usable, key=lambda k: usable[k]["clippy"])
    return {"layer": chosen, **usable[chosen]}


def verdict(
    run: Run,
    events: Sequence[Mapping[str, Any]],
    focus: int | None,
    culprit_names: Sequence[str],
    reaction: Sensitivity | None,
    windows: Windows,
    newly_dead: Sequence[str] = (),
    recovery: Recovery | None = None,
    repeated: RepeatedMicro | None = None,
) -> str:
    """One plain-words sentence: ``healthy: ...``, ``micro-divergence at ...``,
    ``full divergence: ...`` (``full divergence, recovered by rollback: ...`` when the
    recovery ladder rolled back and the run stayed healthy) or ``abnormal at the end of
    the record: ...`` (paper 2.1); what the ladder did (``recovery``, from
    :func:`~clippy_monitor.recovered.read_recovery`) follows the first clause, then
    ``consistently micro-diverging, ...`` for a run :func:`~clippy_monitor.episodes.repeated_micro`
    flags (``repeated``; paper 5.1.2).
    An event's sentence ends with how each rule reacts at step-b with thresholds
    calibrated on the run's healthy steps (``reaction``, from
    :func:`clippy_monitor.sensitivity.calibrate`; Figure 4b), not at fixed thresholds.

    A run with no loss event whose units died (``newly_dead``, from ``dead_units``)
    says so: a loss that climbs gradually is absorbed by the detector's baseline
    like a level shift, and the dying ReLUs are then the only sign (docs/RESULTS.md).
    """
    n = len(run)
    if not n:
        return "no data: the record holds no readable steps"
    last = int(run.steps[-1])
    span = f"{n} steps ({int(run.steps[0])}..{last})"
    ladder = recovery_clause(recovery, last)
    if focus is None:
        return _healthy_verdict(run, span, windows, newly_dead) + ladder
    e = events[focus]
    task = f" in task {e['task']}" if e["task"] else ""
    streak = f"; {repeated.describe()}" if repeated is not None else ""
    tail = ladder + streak + _culprits_clause(culprit_names) + _reaction_clause(reaction)
    if e["kind"] == "full":
        recovered = recovery is not None and recovery.stayed_healthy is True
        return _full_verdict(e, task, recovered) + tail
    if e["kind"] == "open":
        return (
            f"abnormal at the end of the record: the loss started rising at step {e['step_b']}{task} "
            f"and had not recovered by the last recorded step {last}{tail}"
        )
    micros = sum(1 for x in events if x["kind"] == "micro")
    return (
        f"micro-divergence at step {e['step_b']}{task} recovered at step {e['recovered']}; "
        f"{micros} micro-divergence{'s' if micros != 1 else ''} and no full divergence in {span}{tail}"
    )


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def recovery_clause(recovery: Recovery | None, last_step: int) -> str:
    """``; the recovery ladder skipped ..., rolled back ...[; the run then stayed healthy
    ...]`` saying what the ladder did, or "" when it was off or did nothing."""
    if recovery is None or not recovery.acted:
        return ""
    done = []
    if recovery.skipped_steps:
        why = ", ".join(f"{r} {n}" for r, n in recovery.reason_counts().items())
        done.append(f"skipped {_plural(len(recovery.skipped_steps), 'step')} ({why})")
    if recovery.rollbacks:
        n, rb = len(recovery.rollbacks), recovery.rollbacks[-1]
        times = "once" if n == 1 else f"{n} times, last"
        done.append(
            f"rolled back {times} at step {rb.step} to the snapshot after step {rb.snapshot_step}"
        )
    if recovery.gave_up is not None:
        done.append(f"gave up at step {recovery.gave_up.step} (training stopped)")
    words = done[0] if len(done) == 1 else ", ".join(done[:-1]) + " and " + done[-1]
    return f"; the recovery ladder {words}" + after_rollback(recovery, last_step)


def after_rollback(recovery: Recovery, last_step: int) -> str:
    """``; the run then stayed healthy through ...`` / ``; the run diverged again ...`` after
    the last rollback, or "" (no rollback, or the ladder gave up: the clause says so)."""
    if not recovery.rollbacks or recovery.gave_up is not None:
        return ""
    step = recovery.rollbacks[-1].step
    if recovery.stayed_healthy:
        return (
            f"; the run then stayed healthy through the last recorded step {last_step} "
            f"({_plural(last_step - step, 'step')} after the rollback)"
        )
    return "; the run diverged again after the last rollback"


def _healthy_verdict(run: Run, span: str, windows: Windows, newly_dead: Sequence[str]) -> str:
    """The verdict of a run without a focused event: its loss level, and any units that died."""
    first, last = _loss_level(run, windows.baseline), _loss_level(run, windows.after)
    loss = f"; loss {_fmt(first)} -> {_fmt(last)} (median of the first and last {windows.baseline.stop} steps)"
    dead = (
        f"; but units died in {len(newly_dead)} layer{'s' if len(newly_dead) != 1 else ''} "
        f"(zero-gradient share up by >= 0.25, dying ReLU: see dead units)"
        if newly_dead
        else ""
    )
    return f"healthy: no loss divergence in {span}" + (loss if first is not None else "") + dead


def _culprits_clause(culprit_names: Sequence[str]) -> str:
    """``; first to leave their baseline: ...`` naming the top three culprits, or ""."""
    if not culprit_names:
        return ""
    return f"; first to leave their baseline: {', '.join(culprit_names[:3])}"


def _reaction_clause(reaction: Sensitivity | None) -> str:
    """``; with thresholds calibrated on the healthy steps ..., X reacts most at step-b: ...``, or ""."""
    return "" if reaction is None else f"; {summary_text(reaction)}"


def _full_verdict(e: Mapping[str, Any], task: str, recovered: bool = False) -> str:
    """The sentence for a full divergence ``e``, before its culprits and reaction clauses
    (``recovered``: the recovery ladder rolled back and the run stayed healthy)."""
    if e["reason"] == AUC_COLLAPSE:
        return (
            f"full divergence{', recovered by rollback' if recovered else ''}: the evaluation "
            f"{e['series']} fell to chance at step {e['step_b']} (last evaluation above chance "
            f"at step {e['step_a']}) and stayed there at step {e['step_c']} "
            f"({AUC_COLLAPSE}: judged by the AUC, not the loss)"
        )
    # A dead layer from a healthy state has no task: its onset is the first dead step.
    onset = (
        "the run turned abnormal"
        if e["reason"] == "dead_layer" and not e["task"]
        else "the loss started rising"
    )
    reason = (
        "dead_layer: every unit of a layer died, its gradient stayed exactly zero"
        if e["reason"] == "dead_layer"
        else e["reason"]
    )
    decided = e.get("decided_at")
    if decided is not None and decided != e["step_c"]:
        reason = f"{reason}; the detector decided at step {decided}"
    return (
        f"full divergence{', recovered by rollback' if recovered else ''}: {onset} at step {e['step_b']}{task} "
        f"(last healthy step {e['step_a']}) and fully diverged at step {e['step_c']} "
        f"({reason})"
    )
