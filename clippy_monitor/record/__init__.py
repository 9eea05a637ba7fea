"""Run records: what the DivergenceMonitor writes and every reader loads.

Writer side: :class:`RunWriter`, :func:`resume_point`, :func:`detector_state_at`.
Reader side: :func:`load_run` -> :class:`Run`, :class:`RunFollower`, :func:`find_runs`;
servers open a run by name only through :func:`confined_run` (refusals: :class:`RunRefused`),
both through one :class:`RunCatalog`;
:class:`LiveRecord` keeps a run that is still being written in memory (live readers).
The on-disk format is described in docs/RECORD_FORMAT.md and ``format.py``.
"""

from clippy_monitor.record.catalog import RunCatalog
from clippy_monitor.record.format import FACTOR_METRICS, LAYER_METRICS
from clippy_monitor.record.live import LiveRecord
from clippy_monitor.record.paths import RunRefused, confined_run
from clippy_monitor.record.reader import (
    ChunkInfo,
    RecordError,
    RecordLocked,
    Run,
    RunDelta,
    RunFollower,
    find_runs,
    load_run,
    read_meta,
)
from clippy_monitor.record.writer import RunWriter, detector_state_at, resume_point

__all__ = [
    "FACTOR_METRICS",
    "LAYER_METRICS",
    "ChunkInfo",
    "LiveRecord",
    "RecordError",
    "RecordLocked",
    "Run",
    "RunDelta",
    "RunFollower",
    "RunRefused",
    "RunWriter",
    "RunCatalog",
    "confined_run",
    "detector_state_at",
    "find_runs",
    "load_run",
    "read_meta",
    "resume_point",
]
