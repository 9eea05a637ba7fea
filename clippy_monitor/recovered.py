"""What the recovery ladder did in a run: the one reading of it off a run record.

``DivergenceMonitor(..., on_divergence="recover")`` (``clippy_monitor.monitor.recovery``)
records a per-step ``skipped`` series (1.0 where the update was not applied) with
the ``skip_bound`` the step was checked against, and ``rollback`` / ``gave_up``
events (docs/RECORD_FORMAT.md).  :func:`read_recovery` turns them into a
:class:`Recovery`; the post-mortem, the Dash app and the TensorBoard tab all call
it.  Plain Python and NumPy: no TensorFlow.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from clippy_monitor.episodes import ACTION_KINDS, Recorded, events_of

ROLLBACK, GAVE_UP = ACTION_KINDS
SKIPPED, SKIP_BOUND = "skipped", "skip_bound"
#: Why a step was skipped, in the order they are tested.
SKIP_REASONS = ("non_finite_loss", "non_finite_gradient", "above_bound")


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return int(value)


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


@dataclasses.dataclass(frozen=True)
class Rollback:
    """One rollback: at ``step`` the state after ``snapshot_step`` was restored."""

    step: int
    snapshot_step: int
    batches_skipped: int
    trigger: str | None
    step_a: int | None
    lr_factor: float | None
    cooldown_steps: int | None

    @classmethod
    def from_record(cls, event: Mapping[str, Any]) -> Rollback | None:
        step, snapshot = _int(event.get("step")), _int(event.get("snapshot_step"))
        if step is None or snapshot is None:
            return None
        cooldown = event.get("cooldown")
        cooldown = cooldown if isinstance(cooldown, Mapping) else {}
        skipped = _int(event.get("batches_skipped"))
        trigger = event.get("trigger")
        return cls(
            step=step,
            snapshot_step=snapshot,
            batches_skipped=skipped if skipped is not None else step - snapshot,
            trigger=trigger if isinstance(trigger, str) else None,
            step_a=_int(event.get("step_a")),
            lr_factor=_float(cooldown.get("lr_factor")),
            cooldown_steps=_int(cooldown.get("steps")),
        )

    def to_report(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class GaveUp:
    """The ladder stopped training at ``step``."""

    step: int
    trigger: str | None
    rollbacks: int | None
    message: str | None

    @classmethod
    def from_record(cls, event: Mapping[str, Any]) -> GaveUp | None:
        step = _int(event.get("step"))
        if step is None:
            return None
        trigger, message = event.get("trigger"), event.get("message")
        return cls(
            step=step,
            trigger=trigger if isinstance(trigger, str) else None,
            rollbacks=_int(event.get("rollbacks")),
            message=message if isinstance(message, str) else None,
        )

    def to_report(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Recovery:
    """What the ladder did: skipped steps (and why), rollbacks, whether it gave up.

    ``stayed_healthy``: after the last rollback no full divergence was recorded and
    the ladder did not give up (None when there was no rollback, or no step was
    recorded after the last one: nothing is known yet).
    """

    skipped_steps: tuple[int, ...]
    skip_reasons: tuple[str, ...]  # one of SKIP_REASONS per skipped step
    rollbacks: tuple[Rollback, ...]
    gave_up: GaveUp | None
    stayed_healthy: bool | None

    @property
    def acted(self) -> bool:
        return bool(self.skipped_steps or self.rollbacks or self.gave_up)

    def reason_counts(self) -> dict[str, int]:
        """Skipped steps per reason, in :data:`SKIP_REASONS` order (zeros left out)."""
        counts = {r: self.skip_reasons.count(r) for r in SKIP_REASONS}
        return {r: n for r, n in counts.items() if n}

    def summary(self) -> str:
        """One line: ``"recovered: 1 rollback, 12 steps skipped"``."""
        n, k = len(self.rollbacks), len(self.skipped_steps)
        parts = [f"{n} rollback{'s' * (n != 1)}"] if n else []
        parts += [f"{k} step{'s' * (k != 1)} skipped"] if k else []
        if self.gave_up is not None:
            return "gave up: " + (", ".join(parts) or "no snapshot to roll back to")
        if not parts:
            return "recovery on: nothing to do"
        done = "recovered: " if self.stayed_healthy or not self.rollbacks else "recovering: "
        return done + ", ".join(parts)

    def to_report(self) -> dict:
        """The post-mortem's ``recovery`` object (docs/POSTMORTEM.md)."""
        return {
            "summary": self.summary(),
            "skipped_steps": list(self.skipped_steps),
            "skip_reasons": self.reason_counts(),
            "rollbacks": [r.to_report() for r in self.rollbacks],
            "gave_up": self.gave_up.to_report() if self.gave_up else None,
            "stayed_healthy": self.stayed_healthy,
        }


def skip_reasons(run: Recorded, rows: np.ndarray) -> tuple[str, ...]:
    """The :data:`SKIP_REASONS` entry of each row in ``rows`` (skipped steps)."""
    names = run.series_names
    loss = np.asarray(run.series("loss"), np.float64)[rows] if "loss" in names else None
    norm = np.asarray(run.series("grad_norm"), np.float64)[rows] if "grad_norm" in names else None
    reasons = []
    for i in range(len(rows)):
        if loss is not None and not np.isfinite(loss[i]):
            reasons.append(SKIP_REASONS[0])
        elif norm is not None and not np.isfinite(norm[i]):
            reasons.append(SKIP_REASONS[1])
        else:
            reasons.append(SKIP_REASONS[2])
    return tuple(reasons)


def read_recovery(run: Recorded) -> Recovery | None:
    """What the ladder did in ``run``; None if the run was not recorded with it."""
    actions = [e for e in run.events if isinstance(e, Mapping) and e.get("kind") in ACTION_KINDS]
    if SKIPPED not in run.series_names and not actions:
        return None
    rows = np.zeros(0, np.int64)
    if SKIPPED in run.series_names and len(run.steps):
        rows = np.flatnonzero(np.asarray(run.series(SKIPPED)) > 0.5)
    rollbacks = [Rollback.from_record(e) for e in actions if e.get("kind") == ROLLBACK]
    rollbacks = [r for r in rollbacks if r is not None]
    gave_up = next(
        (g for g in (GaveUp.from_record(e) for e in actions if e.get("kind") == GAVE_UP) if g),
        None,
    )
    stayed = None
    if rollbacks and len(run.steps) and int(run.steps[-1]) > rollbacks[-1].step:
        last = rollbacks[-1].step
        later_full = any(
            e.kind == "full" and (e.decision_step or e.step_b or 0) > last for e in events_of(run)
        )
        stayed = gave_up is None and not later_full
    return Recovery(
        skipped_steps=tuple(int(s) for s in np.asarray(run.steps)[rows]),
        skip_reasons=skip_reasons(run, rows),
        rollbacks=tuple(rollbacks),
        gave_up=gave_up,
        stayed_healthy=stayed,
    )
