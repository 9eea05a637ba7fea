"""Divergence episodes: the one reading of step-a/b/c off a run record.

Tang et al., KDD 2023: a *micro-divergence* (section 2.1) is a loss spike that
recovers, a *full divergence* one that does not; step-a is the last healthy
step, step-b the onset (the loss starts rising), step-c the step the model has
fully diverged (section 4.1, Figure 4a, footnote 2).  The detector confirms an
onset a few steps after step-b (``confirmed_at``) and declares a full divergence
at ``decided_at``, which for a ``no_recovery`` divergence comes after step-c
(:func:`divergence_step`).  An *open* episode is still abnormal at the last
recorded step (crash, or a record still being written).

An :class:`Event` is one episode.  :func:`read_episodes` turns a run's
recorded events and its ``detector/*`` series into events; the post-mortem
and the Dash app both call it.  Plain Python and NumPy: no TensorFlow.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import numpy as np

from clippy_monitor.record.status import (
    ABNORMAL,
    DIVERGED,
    HEALTHY,
    STATUS_END,
    decode_status,
)

#: Kinds of episode: recovered, fully diverged, still abnormal at the last row.
KINDS = ("micro", "full", "open")
#: Events the recovery ladder writes, not episodes (read by ``clippy_monitor.recovered``).
ACTION_KINDS = ("rollback", "gave_up")
#: One evaluation's metrics (``DivergenceMonitor.record_evaluation``; read by
#: ``clippy_monitor.evaluations``), not an episode.
EVALUATION_KIND = "evaluation"
#: The ``reason`` of a full divergence judged by the evaluation AUC, not the loss
#: (``clippy_monitor.evaluations.auc_collapse``): the detector series never show it.
AUC_COLLAPSE = "auc_collapse"
#: The detector's outputs, recorded as series (``clippy_monitor.monitor.detectors``).
DETECTOR_SERIES = ("detector/status", "detector/since_onset", "detector/task")
_TASK_PREFIX = "loss/"
_EPS = 1e-3  # status values are 0, 1 and 2.1..2.4 stored as float32


class Recorded(Protocol):
    """What episodes are read from: a ``record.Run`` or a live record."""

    @property
    def steps(self) -> np.ndarray: ...
    @property
    def series_names(self) -> list[str]: ...
    @property
    def events(self) -> list[dict]: ...
    def series(self, name: str) -> np.ndarray: ...


def task_of(series: str | None) -> str | None:
    """Task name of a loss series: ``"loss/click"`` -> ``"click"``; the total loss -> None."""
    if isinstance(series, str) and series.startswith(_TASK_PREFIX):
        return series[len(_TASK_PREFIX) :]
    return None


def _step(value: Any) -> int | None:
    """A recorded step as an int; None when absent or not a finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return int(value)


@dataclasses.dataclass(frozen=True)
class Event:
    """One divergence episode.

    ``kind`` is one of :data:`KINDS` (a record may hold others); ``step_c`` is
    set for ``full``, ``recovered`` (first healthy step after the spike) for
    ``micro``.  ``confirmed_at``: the step the detector confirmed the onset
    (step-b is back-dated from it); ``decided_at``: the step it declared the full
    divergence (None for other kinds; a ``full`` record written before it existed
    reads it as its ``step_c``, then the decision step; ``confirmed_at`` is None
    there).  ``series`` is the loss series that moved first (``"loss/click"``,
    ``"loss"`` for the total loss; what the record stores under ``"task"``).
    ``source``: ``"recorded"`` (the monitor's events file), ``"status"`` (read off
    the detector series) or ``"redetected"`` (the detector re-run offline).
    """

    kind: str
    step_b: int | None
    step_a: int | None = None
    step_c: int | None = None
    recovered: int | None = None
    series: str | None = None
    reason: str | None = None
    source: str = "recorded"
    confirmed_at: int | None = None
    decided_at: int | None = None

    @property
    def decision_step(self) -> int | None:
        """When the detector declared the full divergence: ``decided_at``, or for a
        record written before that field ``step_c`` (then the decision step)."""
        return self.decided_at if self.decided_at is not None else self.step_c

    @property
    def task(self) -> str | None:
        """Task name of :attr:`series` (``"click"``); None for the total loss or none."""
        return task_of(self.series)

    @classmethod
    def from_record(cls, record: Mapping[str, Any], source: str = "recorded") -> Event | None:
        """The event of one events-file entry (as the record reader validated it); None if
        ``record`` is not a mapping.  Also reads :meth:`to_report` dicts back."""
        if not isinstance(record, Mapping):
            return None
        series = record.get("series", record.get("task"))
        reason = record.get("reason")
        step_c, decided_at = _step(record.get("step_c")), _step(record.get("decided_at"))
        if "decided_at" not in record and record.get("kind") == "full":
            decided_at = step_c  # written before decided_at: step_c was the decision
        return cls(
            kind=str(record.get("kind")),
            step_b=_step(record.get("step_b")),
            step_a=_step(record.get("step_a")),
            step_c=step_c,
            recovered=_step(record.get("recovered")),
            series=series if isinstance(series, str) else None,
            reason=reason if isinstance(reason, str) else None,
            source=source,
            confirmed_at=_step(record.get("confirmed_at")),
            decided_at=decided_at,
        )

    def _kind_and_steps(self) -> dict:
        return {
            "kind": self.kind,
            "step_a": self.step_a,
            "step_b": self.step_b,
            "step_c": self.step_c,
            "recovered": self.recovered,
            "confirmed_at": self.confirmed_at,
            "decided_at": self.decided_at,
        }

    def to_record(self) -> dict:
        """The events-file entry (``"task"`` holds :attr:`series`, as records always have)."""
        return {**self._kind_and_steps(), "task": self.series, "reason": self.reason}

    def to_report(self) -> dict:
        """The post-mortem's JSON shape (docs/POSTMORTEM.md): ``task`` is the task name,
        ``series`` the loss series, plus ``source``."""
        return {
            **self._kind_and_steps(),
            "task": self.task,
            "series": self.series,
            "reason": self.reason,
            "source": self.source,
        }


def by_loss(event: Event) -> bool:
    """A full divergence the loss detector found (not an :data:`AUC_COLLAPSE`)."""
    return event.kind == "full" and event.reason != AUC_COLLAPSE


def first_full(records: Iterable[Any]) -> Mapping[str, Any] | None:
    """The first ``full`` entry of an events list (the record's dicts), the loss detector's
    before an :data:`AUC_COLLAPSE` (written earlier in the file when the AUC fell first)."""
    fulls = [r for r in records if isinstance(r, Mapping) and r.get("kind") == "full"]
    by_the_loss = [r for r in fulls if r.get("reason") != AUC_COLLAPSE]
    return (by_the_loss or fulls or [None])[0]


#: step-c of a ``no_recovery`` divergence (:func:`divergence_step`): the divergent level
#: is the median loss over this share of the episode's rows, the last ones before the
#: decision (the loss has settled there: the detector waited ``recovery_window`` steps) ...
DIVERGENT_TAIL = 0.25
#: ... the band around it this many robust standard deviations (1.4826 MAD) of those rows ...
DIVERGENT_BAND_SIGMAS = 3.0
#: ... and never narrower than this share of the rise from step-a's loss to the level.
DIVERGENT_BAND_FLOOR = 0.1


def divergence_step(steps: np.ndarray, loss: np.ndarray, step_b: int) -> int | None:
    """step-c of a ``no_recovery`` full divergence: the first step the model's loss is at
    its divergent level (Tang et al., Figure 4a and footnote 2).

    ``steps``, ``loss``: the total loss from step-a (or step-b) through the decision
    step, the last row.  The level ``L`` is the median of the loss over the last
    :data:`DIVERGENT_TAIL` of the rows from step-b on, ``S`` the loss at the last row
    before step-b (else at step-b).  step-c is the first step from step-b on whose loss
    lies within ``L +- h``, ``h`` = the larger of :data:`DIVERGENT_BAND_SIGMAS` robust
    standard deviations of those tail rows and :data:`DIVERGENT_BAND_FLOOR` ``* (L - S)``:
    a loss that climbs is there when it arrives; one that overshoots (a spike that
    settles at a lower, still divergent, level) when it has come back down.  The decision
    step when there is no rise to measure (``L <= S``, no finite loss); None for no rows.
    """
    steps = np.asarray(steps, np.int64).reshape(-1)
    loss = np.asarray(loss, np.float64).reshape(-1)
    if not len(steps):
        return None
    first = int(np.searchsorted(steps, step_b))
    episode = loss[first:]
    tail = episode[len(episode) - max(1, math.ceil(DIVERGENT_TAIL * len(episode))) :]
    tail = tail[np.isfinite(tail)]
    start = loss[first - 1] if first > 0 else (episode[0] if len(episode) else np.nan)
    if not tail.size or not np.isfinite(start) or not np.median(tail) > start:
        return int(steps[-1])
    level = float(np.median(tail))
    spread = 1.4826 * float(np.median(np.abs(tail - level)))
    half = max(DIVERGENT_BAND_SIGMAS * spread, DIVERGENT_BAND_FLOOR * (level - start))
    with np.errstate(invalid="ignore"):
        reached = np.flatnonzero(np.abs(episode - level) <= half)
    return int(steps[first + reached[0]]) if reached.size else int(steps[-1])


def events_of(run: Recorded) -> list[Event]:
    """The monitor's divergence events as written in the record, in file order (the
    recovery ladder's ``ACTION_KINDS`` and the evaluations left out)."""
    events = (Event.from_record(e) for e in run.events)
    skip = (*ACTION_KINDS, EVALUATION_KIND)
    return [e for e in events if e is not None and e.kind not in skip]


# --------------------------------------------------------------------------
# The detector series
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DetectorTrace:
    """The recorded detector outputs with the values the detector cannot output masked.

    ``status`` (0 healthy, 1 abnormal, 2.x diverged; a non-status value reads as
    healthy, as :func:`~clippy_monitor.record.status.decode_status` reads it),
    ``since_onset`` (rows since step-b, -1 when healthy; NaN = unknown) and
    ``task`` (index of the series that moved first, -1 = none or unknown), one
    value per row; ``ignored``: one note per series that held impossible values.
    """

    status: np.ndarray
    since_onset: np.ndarray
    task: np.ndarray
    ignored: tuple[str, ...]


def _mask(
    run: Recorded, name: str, valid: np.ndarray, values: np.ndarray, fill: float, notes: list[str]
) -> np.ndarray:
    """``values`` with ``fill`` where not ``valid``; a note on ``notes`` if any was replaced."""
    bad = np.flatnonzero(~valid)
    if bad.size:
        first = int(bad[0])
        value, step = values[first], int(run.steps[first])
        notes.append(f"{name}: {bad.size} impossible value(s), first {value:g} at step {step}")
    return np.where(valid, values, fill)


def detector_trace(run: Recorded) -> DetectorTrace | None:
    """The ``detector/*`` series of ``run`` with impossible values masked (None if not recorded).

    Impossible: a status outside ``[0, STATUS_END)`` or non-finite; a
    ``since_onset`` below -1, non-finite, or larger than the row's step (an
    onset before step 0); a ``task`` below -1, non-finite, or not the index of
    a recorded series.
    """
    if not len(run.steps) or not all(n in run.series_names for n in DETECTOR_SERIES):
        return None
    status, since, task = (np.asarray(run.series(n), np.float64) for n in DETECTOR_SERIES)
    notes: list[str] = []
    with np.errstate(invalid="ignore"):
        status = _mask(
            run,
            DETECTOR_SERIES[0],
            (status >= HEALTHY) & (status < STATUS_END),
            status,
            HEALTHY,
            notes,
        )
        limit = np.maximum(run.steps, 0).astype(np.float64)
        since = _mask(
            run, DETECTOR_SERIES[1], (since >= -1) & (since <= limit), since, np.nan, notes
        )
        task = _mask(
            run,
            DETECTOR_SERIES[2],
            (task >= -1) & (np.round(task) < len(run.series_names)),
            task,
            -1.0,
            notes,
        )
    return DetectorTrace(status, since, task, tuple(notes))


def _onset_row(trace: DetectorTrace, row: int) -> int:
    """Row of step-b of the episode at ``row``: ``since_onset`` rows earlier, or where
    unknown the first row of the abnormal run ending at ``row``."""
    since = trace.since_onset[row]
    if not np.isnan(since):
        return max(row - max(int(round(since)), 0), 0)
    healthy = np.flatnonzero(trace.status[: row + 1] < ABNORMAL - _EPS)
    return int(healthy[-1]) + 1 if healthy.size else 0


def _episode(run: Recorded, trace: DetectorTrace, kind: str, row: int, reason: str | None) -> Event:
    """The episode read off the detector outputs of ``row`` (step-c: see :func:`_step_c`)."""
    onset = min(_onset_row(trace, row), row)
    task_index = int(round(trace.task[row]))
    step = int(run.steps[row])
    healthy = np.flatnonzero(trace.status[: row + 1] < ABNORMAL - _EPS)
    confirmed = int(healthy[-1]) + 1 if healthy.size else 0
    full = kind == "full"
    return Event(
        kind=kind,
        step_a=int(run.steps[onset - 1]) if onset > 0 else None,
        step_b=int(run.steps[onset]),
        step_c=_step_c(run, onset, row, reason) if full else None,
        series=run.series_names[task_index] if task_index >= 0 else None,
        reason=reason,
        source="status",
        confirmed_at=int(run.steps[max(confirmed, onset)]),
        decided_at=step if full else None,
    )


def _step_c(run: Recorded, onset: int, row: int, reason: str | None) -> int:
    """step-c of the full divergence decided at ``row``: :func:`divergence_step` over the
    recorded total loss for ``no_recovery``, else the decision step."""
    if reason != "no_recovery" or "loss" not in run.series_names:
        return int(run.steps[row])
    rows = slice(max(onset - 1, 0), row + 1)
    found = divergence_step(run.steps[rows], run.series("loss")[rows], int(run.steps[onset]))
    return int(run.steps[row]) if found is None else found


def open_episode(run: Recorded, trace: DetectorTrace | None = None) -> Event | None:
    """The episode still abnormal (status 1) at the last row, None if there is none."""
    trace = trace if trace is not None else detector_trace(run)
    if trace is None or not ABNORMAL - _EPS <= trace.status[-1] < DIVERGED - _EPS:
        return None
    return _episode(run, trace, "open", len(run.steps) - 1, "spike")


def status_events(run: Recorded, trace: DetectorTrace | None = None) -> list[Event]:
    """Events the recorded ``detector/*`` series alone show (``trace``: :func:`detector_trace`).

    The first fully diverged row gives a ``full`` event (so a torn events file
    loses nothing); else an episode still abnormal at the last row gives an
    ``open`` event (the record ended before the detector could call it micro or
    full; paper 2.1).
    """
    trace = trace if trace is not None else detector_trace(run)
    if trace is None:
        return []
    full = np.flatnonzero(trace.status >= DIVERGED - _EPS)
    if full.size:
        row = int(full[0])
        return [_episode(run, trace, "full", row, decode_status(trace.status[row])[1])]
    episode = open_episode(run, trace)
    return [episode] if episode is not None else []


def read_episodes(run: Recorded, trace: DetectorTrace | None = None) -> list[Event]:
    """The monitor's events plus what only the detector series show (:func:`status_events`:
    an open episode, or a loss full divergence the events file lacks), by step-b."""
    events = events_of(run)
    for extra in status_events(run, trace):
        if extra.kind == "open" or not any(by_loss(e) for e in events):
            events.append(extra)
    return sorted(events, key=lambda e: (e.step_b is None, e.step_b or 0))


# --------------------------------------------------------------------------
# Consistent micro-divergence
# --------------------------------------------------------------------------
#: :func:`repeated_micro`'s defaults: this many micro-divergences ...
REPEATED_MICRO_COUNT = 3
#: ... whose step-b lie within this many steps (5x the detector's default recovery window).
REPEATED_MICRO_WINDOW = 1000


@dataclasses.dataclass(frozen=True)
class RepeatedMicro:
    """A run that consistently micro-diverges (paper 5.1.2): ``count`` micro-divergences
    whose step-b lie in ``first_step .. last_step`` (at most ``window`` steps apart)."""

    count: int
    first_step: int
    last_step: int
    window: int
    steps: tuple[int, ...]  # step-b of each

    def describe(self) -> str:
        """``consistently micro-diverging, 4 micro-divergences in steps 1200-2100``."""
        return (
            f"consistently micro-diverging, {self.count} micro-divergences "
            f"in steps {self.first_step}-{self.last_step}"
        )

    def to_report(self) -> dict:
        """The post-mortem's JSON shape (docs/POSTMORTEM.md)."""
        return dataclasses.asdict(self) | {"steps": list(self.steps)}


def repeated_micro(
    episodes: list[Event],
    window: int = REPEATED_MICRO_WINDOW,
    count: int = REPEATED_MICRO_COUNT,
) -> RepeatedMicro | None:
    """The densest run of micro-divergences when at least ``count`` of them start within
    ``window`` steps (step-b to step-b); None otherwise.

    The paper (5.1.2) names runs that "consistently micro-diverge" beside full
    divergences without a number; two spikes can be chance (a shift in the data and
    one bad batch), three within five recovery windows mean the run keeps leaving its
    healthy band.  The result spans every micro-divergence reachable in chains of
    qualifying windows, so one long streak is one verdict.
    """
    if window < 0 or count < 2:
        raise ValueError(f"repeated_micro: need window >= 0 and count >= 2, got {window}, {count}")
    steps = sorted(e.step_b for e in episodes if e.kind == "micro" and e.step_b is not None)
    best: tuple[int, int] | None = None  # (start, end) indices of the widest streak
    i = 0
    while i + count <= len(steps):
        if steps[i + count - 1] - steps[i] > window:
            i += 1
            continue
        end = i + count - 1
        while end + 1 < len(steps) and steps[end + 1] - steps[end + 2 - count] <= window:
            end += 1
        if best is None or end - i > best[1] - best[0]:
            best = (i, end)
        i = end + 1
    if best is None:
        return None
    chosen = tuple(steps[best[0] : best[1] + 1])
    return RepeatedMicro(len(chosen), chosen[0], chosen[-1], window, chosen)
