"""The Dash app's runs: the shared :class:`~clippy_monitor.record.catalog.RunCatalog`, plus the
served directory's check and a cheap read of each run's events file for the run list.

A run is named by its path relative to the served directory;
:meth:`Catalog.resolve` refuses any name that leaves it (``..``, an absolute
path, a symlink pointing outside).  Callbacks hold a run with
:meth:`Catalog.open`; aliases of a run share one live record, and at most
``max_open`` are kept (the least recently used is closed).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from clippy_monitor.record import RecordError
from clippy_monitor.record.catalog import MAX_OPEN_RUNS, READ_ERRORS, RunCatalog  # noqa: F401
from clippy_monitor.record.format import EVENTS_FILE
from clippy_monitor.record.live import LiveRecord

#: A run followed live (every step kept; the views downsample).
LiveRun = LiveRecord

#: Results each run's :meth:`LiveRecord.cached` keeps: one replay window (the one being replayed).
CACHED_RESULTS = 1


class Catalog(RunCatalog):
    """The runs under ``logdir`` (which must exist), re-scanned at most every ``scan_ttl`` seconds."""

    def __init__(
        self, logdir: str | os.PathLike, scan_ttl: float = 2.0, max_open: int = MAX_OPEN_RUNS
    ):
        given = Path(logdir).expanduser()
        if not given.is_dir():
            raise RecordError(f"{given}: no such directory")
        super().__init__(given, scan_ttl=scan_ttl, max_open=max_open, cache_size=CACHED_RESULTS)
        self.logdir = given
        self._events_cache: dict[Path, tuple[tuple, list[dict]]] = {}

    def run_names(self, force: bool = False) -> list[str]:
        """Relative names of the runs under the directory ("." for the directory itself)."""
        return list(self.runs(force))

    def recorded_events(self, name: str) -> list[dict]:
        """The events file of ``name`` (cheap: no record is read); [] if unreadable."""
        try:
            real = self.resolve(name)
            path = real / EVENTS_FILE
            st = os.stat(path)
        except (RecordError, OSError):
            return []
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        cached = self._events_cache.get(real)
        if cached and cached[0] == key:
            return cached[1]
        try:
            events = _json_lines(path.read_bytes())
        except OSError:
            return []
        self._events_cache[real] = (key, events)
        return events


def _json_lines(data: bytes) -> list[dict]:
    """The JSON objects of ``data``, one per line; other lines are skipped."""
    events = []
    for line in data.split(b"\n"):
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events
