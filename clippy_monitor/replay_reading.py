"""Counterfactual replays of a divergence: the one reading of them off a run record.

``DivergenceMonitor(..., keep_replay=True)`` keeps, in ``<run>/replay/``, the
snapshot taken before step-a of the first full divergence (``replay.json``:
:class:`KeptSnapshot`) and records the per-step series ``batch_fingerprint``.
``clippy_monitor.replay`` trains from that snapshot again, with another optimizer,
into a sibling record ``<run>/replay-<name>`` holding ``clippy_replay.json``
(:class:`ReplayInfo`).  :func:`read_replays` compares each replay with the original
(:class:`ReplayOutcome`); the post-mortem calls it.  Plain Python and NumPy: no
TensorFlow.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from clippy_monitor.episodes import read_episodes
from clippy_monitor.record.format import META_FILE, optimizer_name
from clippy_monitor.record.reader import RecordError, Run, load_run
from clippy_monitor.sharpness_reading import PRECONDITIONED

FINGERPRINT = "batch_fingerprint"  #: the per-step series of batch fingerprints
REPLAY_DIR = "replay"  #: the folder of the kept snapshot, inside the run's logdir
MANIFEST = "replay.json"  #: in ``REPLAY_DIR``: which snapshot is kept (:class:`KeptSnapshot`)
REPLAY_PREFIX = "replay-"  #: a replay's record is ``<run>/replay-<name>``
REPLAY_INFO = "clippy_replay.json"  #: in a replay's record: :class:`ReplayInfo`


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _read_json(cls: type, path: Path) -> Any:
    fields = {f.name for f in dataclasses.fields(cls)}
    data = json.loads(path.read_text())
    return cls(**{k: v for k, v in data.items() if k in fields})


@dataclasses.dataclass(frozen=True)
class KeptSnapshot:
    """``replay/replay.json``: the snapshot kept for a replay and the divergence it precedes.

    ``snapshot_step`` -1 (and ``file`` "") when no snapshot was old enough.
    """

    snapshot_step: int  # the state after this step: a replay starts at the next
    file: str  # the .npz file (values ``v0``, ``v1``, ...), in the replay folder
    step_a: int | None
    step_b: int
    step_c: int | None
    model_variables: list[str]  # paths of model.variables: the file's first values
    optimizer_variables: list[str]  # paths of optimizer.variables: the rest
    shapes: list[list[int]]  # of every value, in file order
    decided_at: int | None = None  # when the detector declared it (absent in older manifests)

    @property
    def decision_step(self) -> int | None:
        """When the detector declared the divergence: ``decided_at``, else ``step_c``
        (which was the decision step in manifests written before ``decided_at``)."""
        return self.decided_at if self.decided_at is not None else self.step_c

    @classmethod
    def read(cls, directory: str | os.PathLike) -> KeptSnapshot | None:
        """The manifest in ``directory`` (a run's replay folder), or None if there is none."""
        path = Path(directory) / MANIFEST
        return _read_json(cls, path) if path.exists() else None

    def write(self, directory: Path) -> None:
        _write_json(Path(directory) / MANIFEST, dataclasses.asdict(self))


@dataclasses.dataclass(frozen=True)
class ReplayInfo:
    """``clippy_replay.json`` in a replay's record: what was replayed, and how."""

    name: str
    snapshot_step: int  # the replay started from the state after this step
    first_step: int
    last_step: int  # the last step replayed
    step_c: int | None  # of the original's divergence
    optimizer: dict  # the replay's, serialized
    restored: list[str]  # optimizer variables restored from the snapshot
    not_restored: list[str]  # the replay optimizer's variables left as built (learning rate aside)

    @classmethod
    def read(cls, directory: str | os.PathLike) -> ReplayInfo | None:
        path = Path(directory) / REPLAY_INFO
        return _read_json(cls, path) if path.exists() else None

    def write(self, directory: Path) -> None:
        _write_json(Path(directory) / REPLAY_INFO, dataclasses.asdict(self))


@dataclasses.dataclass(frozen=True)
class ReplayOutcome:
    """One replay against the original run.

    ``diverged``: the replay's record has a full divergence event (``full_step``: its
    step-c, ``reason``).  ``loss_at_c``: (original, replay) loss at the original's step-c.
    ``peak_sharpness``: (original, replay) largest preconditioned sharpness over the
    replayed steps, None where not recorded.
    """

    name: str
    path: str
    optimizer: str
    snapshot_step: int
    last_step: int
    step_c: int | None
    diverged: bool
    full_step: int | None
    reason: str | None
    loss_at_c: tuple[float | None, float | None]
    peak_sharpness: tuple[float | None, float | None]
    restored_all: bool

    @property
    def verdict(self) -> str:
        """One line: did the replay diverge, and the loss at the original's step-c."""
        span = f"steps {self.snapshot_step + 1}-{self.last_step}"
        if self.diverged:
            head = f"diverged too (full, {self.reason}, step-c {self.full_step})"
        else:
            head = f"did not diverge through step {self.last_step}"
        orig, new = (_num(x) for x in self.loss_at_c)
        loss = f"; loss at the original's step-c {self.step_c}: {new} (original {orig})"
        return f"replay {self.name} ({self.optimizer}, {span}): {head}" + (
            loss if self.step_c is not None else ""
        )

    def to_report(self) -> dict:
        data = dataclasses.asdict(self)
        data["loss_at_c"] = [_finite(x) for x in self.loss_at_c]
        data["peak_sharpness"] = [_finite(x) for x in self.peak_sharpness]
        data["verdict"] = self.verdict
        return data


def _finite(x: float | None) -> float | str | None:
    if x is None or math.isnan(x):
        return None
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def _num(x: float | None) -> str:
    return "-" if x is None else "NaN" if math.isnan(x) else f"{x:.4g}"


def replay_paths(run_path: str | os.PathLike) -> list[Path]:
    """The replay records of the run at ``run_path`` (``<run>/replay-*``), sorted."""
    root = Path(run_path)
    return sorted(
        p
        for p in root.glob(REPLAY_PREFIX + "*")
        if p.is_dir() and (p / META_FILE).exists() and (p / REPLAY_INFO).exists()
    )


def _value_at(run: Run, name: str, step: int | None) -> float | None:
    if step is None or name not in run.series_names:
        return None
    rows = np.flatnonzero(run.steps == step)
    return float(run.series(name)[rows[0]]) if len(rows) else None


def _peak(run: Run, first: int, last: int) -> float | None:
    if PRECONDITIONED not in run.series_names:
        return None
    inside = (run.steps >= first) & (run.steps <= last)
    values = run.series(PRECONDITIONED)[inside]
    values = values[np.isfinite(values)]
    return float(values.max()) if len(values) else None


def compare(original: Run, replay: Run, info: ReplayInfo) -> ReplayOutcome:
    """The :class:`ReplayOutcome` of ``replay`` against ``original``."""
    full = [e for e in read_episodes(replay) if e.kind == "full"]
    return ReplayOutcome(
        name=info.name,
        path=str(replay.path),
        optimizer=optimizer_name(info.optimizer) or "?",
        snapshot_step=info.snapshot_step,
        last_step=int(replay.steps[-1]) if len(replay) else info.snapshot_step,
        step_c=info.step_c,
        diverged=bool(full),
        full_step=full[0].step_c if full else None,
        reason=full[0].reason if full else None,
        loss_at_c=(
            _value_at(original, "loss", info.step_c),
            _value_at(replay, "loss", info.step_c),
        ),
        peak_sharpness=(
            _peak(original, info.first_step, info.last_step),
            _peak(replay, info.first_step, info.last_step),
        ),
        restored_all=not info.not_restored,
    )


def read_replays(original: Run) -> list[ReplayOutcome]:
    """Every readable replay of ``original`` (``<run>/replay-*``), compared with it."""
    outcomes = []
    for path in replay_paths(original.path):
        info = ReplayInfo.read(path)
        try:
            replay = load_run(path)
        except RecordError:
            continue
        if info is not None:
            outcomes.append(compare(original, replay, info))
    return outcomes
