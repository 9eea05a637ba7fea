"""The runs a server shows, and their live records: the one run catalog of the Dash app and the TensorBoard tab.

:class:`RunCatalog` lists the runs under a served directory (with
:func:`~clippy_monitor.record.paths.served_runs`, re-scanned at most every
``scan_ttl`` seconds), opens a run named by a request only through
:func:`~clippy_monitor.record.paths.confined_run`, and keeps one
:class:`~clippy_monitor.record.live.LiveRecord` per opened run, keyed by its
real directory (so every alias of a run shares one).  At most ``max_open`` are
kept: the least recently used one is closed (its memory maps released) as soon
as no caller holds it.  No TensorFlow, no TensorBoard, no Dash.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clippy_monitor.record.format import META_FILE
from clippy_monitor.record.live import LiveRecord
from clippy_monitor.record.paths import confined_run, run_name, served_runs
from clippy_monitor.record.reader import RecordError

MAX_OPEN_RUNS = 16  # live records a catalog keeps open; beyond it the least recently used is closed

#: What opening or reading a run can raise; servers show it as a message.
READ_ERRORS = (RecordError, OSError, KeyError, ValueError)


@dataclass(eq=False)
class Opened:
    """A live record held by a :class:`RunCatalog`, and how many callers use it now."""

    live: LiveRecord
    users: int = 0
    dropped: bool = False  # out of the catalog: closed once its last user is done


class RunCatalog:
    """The runs under ``root`` and a refreshed :class:`LiveRecord` per opened run.

    Run names are paths relative to ``root`` ("." for ``root`` itself).
    ``cache_size`` is each live record's :meth:`LiveRecord.cached` size.
    Thread-safe (both servers answer requests from several threads).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        scan_ttl: float = 2.0,
        max_open: int = MAX_OPEN_RUNS,
        cache_size: int = 64,
    ) -> None:
        if isinstance(max_open, bool) or not isinstance(max_open, int) or max_open < 1:
            raise ValueError(f"max_open must be a positive integer, got {max_open!r}")
        self.root = Path(os.path.realpath(Path(root).expanduser()))
        self.scan_ttl = scan_ttl
        self.max_open = max_open
        self.cache_size = cache_size
        self._lock = threading.Lock()
        self._runs: dict[str, Path] = {}
        self._scanned_at = -math.inf
        self._live: collections.OrderedDict[Path, Opened] = (
            collections.OrderedDict()
        )  # least recently used first

    # -- names ----------------------------------------------------------------------

    def runs(self, force: bool = False) -> dict[str, Path]:
        """``{name: real directory}`` of the runs listed, sorted by name (re-scanned past ``scan_ttl``)."""
        with self._lock:
            if force or time.monotonic() - self._scanned_at >= self.scan_ttl:
                self._runs = served_runs(self.root)
                self._scanned_at = time.monotonic()
            return dict(self._runs)

    def resolve(self, name: Any) -> Path:
        """The real directory of run ``name``; :class:`RunRefused` if it leaves the served directory.

        :class:`RecordError` if it holds no record (never existed, deleted, moved).
        """
        real = confined_run(self.root, name)
        if not (real / META_FILE).is_file():
            raise RecordError(f"run {name!r}: no record in {real} (deleted or moved?)")
        return real

    # -- runs -----------------------------------------------------------------------

    @contextlib.contextmanager
    def open(self, name: Any) -> Iterator[LiveRecord]:
        """The refreshed live record of ``name``, locked and kept open for the ``with`` block.

        Reads only what was appended since the last refresh.  :class:`RunRefused`
        or :class:`RecordError` if ``name`` is not a readable run.
        """
        with self._held(self.resolve(name)) as live:
            yield live

    def live(self, name: Any) -> LiveRecord:
        """The refreshed live record of ``name``, not held: it may be closed once more
        than ``max_open`` other runs were opened (prefer :meth:`open`)."""
        with self.open(name) as live:
            return live

    @contextlib.contextmanager
    def open_many(
        self, names: Sequence[Any]
    ) -> Iterator[tuple[list[LiveRecord], list[tuple[Any, Exception]]]]:
        """``(records, failures)``: the refreshed records of ``names`` (each run once, in the
        order given), all held for the ``with`` block, and ``(name, error)`` for the others.

        Locks are taken in the order of the runs' paths, so two callers that
        show the same runs cannot wait for each other.
        """
        paths: dict[Path, Any] = {}
        failures: list[tuple[Any, Exception]] = []
        for name in names:
            try:
                paths.setdefault(self.resolve(name), name)
            except READ_ERRORS as exc:
                failures.append((name, exc))
        with contextlib.ExitStack() as stack:
            held: dict[Path, LiveRecord] = {}
            for path in sorted(paths):
                try:
                    held[path] = stack.enter_context(self._held(path))
                except READ_ERRORS as exc:
                    failures.append((paths[path], exc))
            yield [held[p] for p in paths if p in held], failures

    @contextlib.contextmanager
    def peek(self, name: Any) -> Iterator[LiveRecord | None]:
        """The live record of ``name`` if it is open (not refreshed), held as by :meth:`open`; else None."""
        try:
            path = self.resolve(name)
        except READ_ERRORS:
            path = None
        with self._lock:
            entry = self._live.get(path) if path is not None else None
            if entry is not None:
                entry.users += 1
        if entry is None:
            yield None
            return
        try:
            with entry.live.lock:
                yield entry.live
        finally:
            self._release(entry)

    def opened(self, name: Any) -> LiveRecord | None:
        """The live record of ``name`` if it is open (not refreshed, not held)."""
        with self.peek(name) as live:
            return live

    @property
    def open_runs(self) -> list[str]:
        """Names of the runs held open, least recently used first."""
        with self._lock:
            return [entry.live.name for entry in self._live.values()]

    # -- holding ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _held(self, path: Path) -> Iterator[LiveRecord]:
        entry = self._acquire(path)
        try:
            with entry.live.lock:
                try:
                    entry.live.refresh()
                except Exception:
                    self._drop(path, entry)  # start afresh if the run comes back
                    raise
                yield entry.live
        finally:
            self._release(entry)

    def _acquire(self, path: Path) -> Opened:
        """The entry of ``path`` (created if needed), most recently used, with one more user;
        closes the least recently used entries beyond ``max_open`` that no one uses."""
        idle = []
        with self._lock:
            entry = self._live.get(path)
            if entry is None:
                live = LiveRecord(path, name=run_name(self.root, path), cache_size=self.cache_size)
                entry = self._live[path] = Opened(live)
            self._live.move_to_end(path)
            entry.users += 1
            while len(self._live) > self.max_open:
                _, old = self._live.popitem(last=False)
                old.dropped = True
                if not old.users:
                    idle.append(old.live)
        for live in idle:
            live.close()
        return entry

    def _drop(self, path: Path, entry: Opened) -> None:
        with self._lock:
            if self._live.get(path) is entry:
                del self._live[path]
            entry.dropped = True

    def _release(self, entry: Opened) -> None:
        with self._lock:
            entry.users -= 1
            done = entry.dropped and not entry.users
        if done:
            entry.live.close()
