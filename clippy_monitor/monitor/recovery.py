"""Settings of the recovery ladder: skip a bad step, roll back, give up.

``DivergenceMonitor(..., on_divergence="recover", recovery=RecoveryConfig(...))``
turns all three rungs on; ``skip_bad_steps=True`` alone turns on the first.

1. **Skip** (``monitor.skipping``, on the device, no host sync): the update of a
   step is not applied when the global gradient norm or the loss is non-finite,
   or the norm exceeds ``skip_ratio`` times the median norm of the last
   ``skip_window`` applied steps.  The optimizer's state stays as if the step
   never happened (no accumulator, moment or iteration update).
2. **Roll back** (``monitor.rollback``): on a full divergence (or more than
   ``max_consecutive_skips`` non-finite steps in a row), restore the newest snapshot of the
   weights and optimizer state taken at least ``margin`` steps before step-a,
   continue with the batches that come next, and scale the learning rate by
   ``cooldown_lr_factor``, rising linearly back to 1 over ``cooldown_steps``.
3. **Give up**: a full divergence after ``max_rollbacks`` rollbacks within
   ``rollback_window`` steps stops training with one message.

The defaults are justified by measurements in docs/RECOVERY.md.
"""

from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class RecoveryConfig:
    """Thresholds and sizes of the recovery ladder (docs/RECOVERY.md).

    Attributes:
        skip_ratio: skip a step whose global gradient norm exceeds this many times
            the median of the recent applied steps' norms.
        skip_window: applied steps whose norms form that median.
        skip_min_history: applied steps needed before the ratio test is on
            (non-finite steps are skipped from the first step).
        max_consecutive_skips: after this many skips in a row, a finite step above
            the bound is applied and the bound learnt again (the norm's level
            moved with the data); more non-finite steps in a row than this act as
            a full divergence (rung 2): the model is beyond a skip's help.
        snapshot_every: steps between snapshots of the weights and optimizer state.
        keep_snapshots: snapshots kept that the detector has confirmed healthy
            (snapshots of steps not yet checked are kept too).
        snapshot_dir: keep snapshots as ``.npz`` files there instead of in host
            memory (for a model whose state does not fit twice in memory).
        margin: roll back to a snapshot at least this many steps before step-a.
        cooldown_steps, cooldown_lr_factor: after a rollback the learning rate is
            multiplied by ``cooldown_lr_factor``, rising linearly to 1 over
            ``cooldown_steps`` steps.
        max_rollbacks, rollback_window: give up on the next full divergence once
            this many rollbacks happened within this many steps.
        check_every: with rollbacks on, the monitor flushes (and so runs the
            detector) at least this often; a full divergence is acted on at most
            ``check_every`` steps after the detector can call it.
    """

    skip_ratio: float = 200.0
    skip_window: int = 128
    skip_min_history: int = 32
    max_consecutive_skips: int = 16
    snapshot_every: int = 100
    keep_snapshots: int = 2
    snapshot_dir: str | None = None
    margin: int = 0
    cooldown_steps: int = 200
    cooldown_lr_factor: float = 0.1
    max_rollbacks: int = 3
    rollback_window: int = 2000
    check_every: int = 50

    def __post_init__(self) -> None:
        positive = ("skip_window", "max_consecutive_skips", "snapshot_every", "keep_snapshots")
        positive += ("max_rollbacks", "rollback_window", "check_every")
        for name in positive:
            _check_int(name, getattr(self, name), 1)
        for name in ("skip_min_history", "margin", "cooldown_steps"):
            _check_int(name, getattr(self, name), 0)
        if not self.skip_ratio > 1.0 or self.skip_ratio == float("inf"):
            raise ValueError(
                f"RecoveryConfig.skip_ratio must be a finite number > 1, got {self.skip_ratio!r}"
            )
        if not 0.0 < self.cooldown_lr_factor <= 1.0:
            raise ValueError(
                f"RecoveryConfig.cooldown_lr_factor must be in (0, 1], got {self.cooldown_lr_factor!r}"
            )
        if self.skip_min_history > self.skip_window:
            raise ValueError(
                f"RecoveryConfig.skip_min_history ({self.skip_min_history}) must not exceed "
                f"skip_window ({self.skip_window})"
            )
        if self.snapshot_dir is not None:
            object.__setattr__(self, "snapshot_dir", os.fspath(self.snapshot_dir))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"RecoveryConfig.{name} must be an integer >= {low}, got {value!r}")
