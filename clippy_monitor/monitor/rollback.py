"""Rungs 2 and 3 of the recovery ladder: roll back to a healthy snapshot, or give up.

The host keeps snapshots of the model's variables and the optimizer's variables
(weights, accumulators, moments, ``iterations``) every ``snapshot_every`` steps.
A snapshot is *confirmed* once the detector has seen the steps after it and
called them healthy; the newest ``keep_snapshots`` confirmed ones are kept, with
every snapshot not yet confirmed.  On a full divergence the newest snapshot at
least ``margin`` steps before step-a is restored; training goes on with the next
batches (the batches since the snapshot are not trained again, as PaLM did), and
the record keeps counting steps: its step numbers never go back.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clippy_monitor.episodes import ACTION_KINDS
from clippy_monitor.monitor.recovery import RecoveryConfig

_log = logging.getLogger(__name__)

ROLLBACK, GAVE_UP = ACTION_KINDS  # kinds of the events the ladder records


@dataclasses.dataclass
class Snapshot:
    """The state after ``step`` (the last step whose update it holds)."""

    step: int
    values: list[np.ndarray] | None  # None while on disk
    path: Path | None = None
    detector_state: np.ndarray | None = None  # saved with the last flush at or before step
    confirmed: bool = False

    def load(self) -> list[np.ndarray]:
        if self.values is not None:
            return self.values
        with np.load(self.path) as data:
            return [data[f"v{i}"] for i in range(len(data.files))]

    def discard(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


class SnapshotStore:
    """The snapshots of one run, in host memory or as ``.npz`` files in ``directory``."""

    def __init__(self, config: RecoveryConfig) -> None:
        self.config = config
        self.snapshots: list[Snapshot] = []
        self.directory = Path(config.snapshot_dir) if config.snapshot_dir else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)

    def take(self, step: int, variables: Sequence[Any], detector_state: np.ndarray | None) -> None:
        """Copy ``variables`` (host read) as the snapshot after ``step``."""
        values = [np.asarray(v.numpy()) for v in variables]  # a copy: the variable may change
        snapshot = Snapshot(step, values, detector_state=detector_state)
        if self.directory is not None:
            snapshot.path = self.directory / f"snapshot-{step:012d}.npz"
            tmp = snapshot.path.with_suffix(".tmp.npz")
            np.savez(tmp, **{f"v{i}": v for i, v in enumerate(values)})
            os.replace(tmp, snapshot.path)
            snapshot.values = None
        self.snapshots.append(snapshot)

    def confirm(self, healthy_through: int) -> None:
        """Mark snapshots up to ``healthy_through`` healthy; drop all but the newest kept."""
        for s in self.snapshots:
            s.confirmed = s.confirmed or s.step <= healthy_through
        confirmed = [s for s in self.snapshots if s.confirmed]
        for old in confirmed[: -self.config.keep_snapshots]:
            old.discard()
            self.snapshots.remove(old)

    def before(self, step: int) -> Snapshot | None:
        """The newest snapshot taken at or before ``step``."""
        eligible = [s for s in self.snapshots if s.step <= step]
        return eligible[-1] if eligible else None

    def drop_after(self, step: int) -> None:
        """Forget snapshots of steps after ``step`` (they hold the diverged state)."""
        for s in [s for s in self.snapshots if s.step > step]:
            s.discard()
            self.snapshots.remove(s)

    def clear(self) -> None:
        for s in self.snapshots:
            s.discard()
        self.snapshots = []


@dataclasses.dataclass(frozen=True)
class Trigger:
    """Why the ladder acts: a full divergence event, or a streak of skipped steps."""

    step: int  # the last step read when it acts
    step_a: int | None
    reason: str


class RollbackLadder:
    """Decides between rolling back and giving up, and keeps the tally."""

    def __init__(self, config: RecoveryConfig) -> None:
        self.config = config
        self.store = SnapshotStore(config)
        self.rollbacks: list[int] = []  # steps at which each rollback happened
        self.gave_up = False

    def snapshot_due(self, step: int) -> bool:
        """Whether the state after ``step`` should be snapshot."""
        last = self.store.snapshots[-1].step if self.store.snapshots else None
        return last is None or step - last >= self.config.snapshot_every

    def target(self, trigger: Trigger) -> Snapshot | None:
        """The snapshot to restore for ``trigger``, or None: give up."""
        recent = [s for s in self.rollbacks if trigger.step - s < self.config.rollback_window]
        if len(recent) >= self.config.max_rollbacks:
            return None
        last_healthy = trigger.step_a if trigger.step_a is not None else -1
        return self.store.before(last_healthy - self.config.margin)

    def rollback_event(self, trigger: Trigger, snapshot: Snapshot) -> dict:
        """The record's ``rollback`` event (docs/RECORD_FORMAT.md)."""
        self.rollbacks.append(trigger.step)
        self.store.drop_after(snapshot.step)
        return {
            "kind": ROLLBACK,
            "step": trigger.step,
            "snapshot_step": snapshot.step,
            "batches_skipped": trigger.step - snapshot.step,
            "trigger": trigger.reason,
            "step_a": trigger.step_a,
            "cooldown": {
                "lr_factor": self.config.cooldown_lr_factor,
                "steps": self.config.cooldown_steps,
            },
        }

    def give_up_event(self, trigger: Trigger, logdir: str) -> tuple[dict, str]:
        """The record's ``gave_up`` event and the one-line message."""
        self.gave_up = True
        recent = [s for s in self.rollbacks if trigger.step - s < self.config.rollback_window]
        if len(recent) >= self.config.max_rollbacks:
            why = (
                f"{len(recent)} rollback(s) within {self.config.rollback_window} steps "
                f"(max_rollbacks={self.config.max_rollbacks})"
            )
        else:
            why = "no snapshot is old enough to be healthy"
        message = (
            f"DivergenceMonitor({logdir}): gave up recovering at step {trigger.step}: "
            f"{trigger.reason} (last healthy step {trigger.step_a}) and {why}; "
            "training stopped, the record holds every step"
        )
        event = {
            "kind": GAVE_UP,
            "step": trigger.step,
            "step_a": trigger.step_a,
            "trigger": trigger.reason,
            "rollbacks": len(self.rollbacks),
            "message": message,
        }
        return event, message
