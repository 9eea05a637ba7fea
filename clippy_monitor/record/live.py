"""A live, in-memory copy of a run record that is still being written.

:class:`LiveRecord` is what the live readers (the TensorBoard tab, the Dash
app) hold per run.  It follows the record with :class:`RunFollower`: the first
:meth:`LiveRecord.refresh` reads the whole record, later ones ``stat`` its
three files and, only if they changed, read just the appended bytes.  A
training rewind drops the superseded rows (as :func:`load_run` does); a record
replaced or truncated in place is read again from the start.

Imports only NumPy and this package: the readers must not import TensorFlow.
"""

from __future__ import annotations

import collections
import itertools
import os
import threading
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import numpy as np

from clippy_monitor.catalog import RULE_NAMES
from clippy_monitor.record.format import EVENTS_FILE, FACTOR_METRICS, META_FILE, RECORD_FILE
from clippy_monitor.record.reader import (
    RecordError,
    RecordShrank,
    Run,
    RunDelta,
    RunFollower,
    _run_from_timeline,
    overlaps,
)

#: Computes row-aligned arrays (first axis: the run's rows) from a run, see :meth:`LiveRecord.per_row`.
RowCompute = Callable[[Run], tuple[np.ndarray, ...]]


class LiveRecord:
    """The record in ``path`` as read so far; every step is kept, never sampled.

    Call :meth:`refresh` before reading (three ``stat`` calls when nothing
    changed).  It fills ``meta``, ``layers``, ``layer_metrics``,
    ``series_names``, ``steps``, ``events`` and ``skipped``.  ``version``
    increases whenever the content changes (:meth:`cached` memoises against
    it); ``reloads`` counts the reads afresh of a replaced or shrunk record;
    ``last_delta_rows`` is how many rows the last refresh read.  Arrays are
    read-only.  Thread-safe: hold ``lock`` while reading several attributes
    that must agree.  ``name``, if given, names the run in error messages;
    ``cache_size`` is how many results :meth:`cached` keeps.
    """

    _OPENINGS = itertools.count(1)  # numbers each LiveRecord made, for revision
    # Each refresh that finds new rows keeps one more memory map (its rows are
    # views into it); past this many the record is read afresh into a single
    # map, so a run followed for days cannot exhaust the process's map count.
    _MAX_SEGMENTS = 256

    def __init__(
        self, path: str | os.PathLike, name: str | None = None, cache_size: int = 64
    ) -> None:
        self.path = Path(path)
        self.name = name
        self._cache_size = cache_size
        self._opening = next(self._OPENINGS)
        self.lock = threading.RLock()
        self.version = 0
        self.reloads = 0
        self.closed = False
        self._reset()

    def _reset(self) -> None:
        self.meta: dict = {}
        self.layers: list[str] = []
        self.layer_metrics: list[str] = []
        self.series_names: list[str] = []
        self.steps = np.zeros(0, np.int64)
        self.events: list[dict] = []
        self.skipped: list[str] = []
        self.last_delta_rows = 0
        self._follower: RunFollower | None = None
        self._empty: Run | None = None  # no rows: seeds per_row() results
        self._series = np.zeros((0, 0))  # [n_series, n_steps] float64
        self._segments: list[list] = []  # [delta Run, rows still in effect], in step order
        self._per_row: dict[Hashable, tuple[RowCompute, tuple[np.ndarray, ...]]] = {}
        self._signature: tuple | None = None
        self._derived: collections.OrderedDict = collections.OrderedDict()
        self.version += 1

    # -- updating --------------------------------------------------------------------

    def refresh(self) -> bool:
        """Read what was appended since the last refresh; True if anything changed.

        RecordError if the meta is gone (run deleted or moved) or unreadable.
        """
        with self.lock:
            if self.closed:
                raise RecordError(f"{self._subject}: closed")
            signature = _signature(self.path)
            if signature[0] is None:
                raise RecordError(f"{self._subject}: {META_FILE} is gone (run deleted or moved)")
            if signature == self._signature:
                self.last_delta_rows = 0
                return False
            if self._replaced(signature):
                self._reload()
            elif len(self._segments) >= self._MAX_SEGMENTS:
                self._reset()
            try:
                delta = self._poll()
            except RecordShrank:
                self._reload()  # truncated or rewritten in place since the last stat
                delta = self._poll()
            self._apply(delta)
            self._signature = signature
            return True

    def close(self) -> None:
        """Drop every row read and the memory maps holding them; :meth:`refresh` then raises.

        A map is unmapped once no array taken from it is left: arrays this class
        hands out are copies, so closing releases them all.
        """
        with self.lock:
            self._reset()
            self.closed = True

    def _reload(self) -> None:
        self._reset()
        self.reloads += 1

    def _replaced(self, signature: tuple) -> bool:
        """True if the meta changed at all (it is written once) or another file was
        replaced, removed or shrank: a new record in the same directory."""
        if self._signature is None:
            return False
        if signature[0] != self._signature[0]:
            return True
        for old, new in zip(self._signature[1:], signature[1:]):
            if old is not None and (new is None or new[0] != old[0] or new[1] < old[1]):
                return True
        return False

    def _poll(self) -> RunDelta:
        if self._follower is None:
            self._open()
        return self._follower.poll()

    def _open(self) -> None:
        self._follower = RunFollower(self.path)
        self.meta = self._follower.meta
        self.layers = list(self.meta["layers"])
        self.layer_metrics = list(self.meta["layer_metrics"])
        self.series_names = list(self.meta["series"])
        self._series = np.zeros((len(self.series_names), 0))
        self._empty = _run_from_timeline(Run, self._follower.path, self.meta, [])

    def _apply(self, delta: RunDelta) -> None:
        self.last_delta_rows = len(delta)
        if delta.empty:
            return
        if delta.rewind_from is not None:
            self._truncate(int(np.searchsorted(self.steps, delta.rewind_from)))
        if len(delta):
            self._append(delta)
        self.events = self.events + list(delta.events)
        self.skipped = self.skipped + list(delta.skipped)
        self._derived.clear()
        self.version += 1

    def _append(self, delta: RunDelta) -> None:
        self._segments.append([delta, len(delta)])
        self.steps = _frozen(np.concatenate([self.steps, delta.steps]))
        new = np.array([delta.series(n) for n in self.series_names]).reshape(-1, len(delta))
        self._series = _frozen(np.concatenate([self._series, new], axis=1))
        self._per_row = {
            key: (
                compute,
                tuple(
                    _frozen(np.concatenate(pair)) for pair in zip(held, _uncached(compute, delta))
                ),
            )
            for key, (compute, held) in self._per_row.items()
        }

    def _truncate(self, keep: int) -> None:
        """Keep only the first ``keep`` rows (a rewind superseded the rest)."""
        self.steps = self.steps[:keep]
        self._series = self._series[:, :keep]
        self._per_row = {
            key: (compute, tuple(a[:keep] for a in held))
            for key, (compute, held) in self._per_row.items()
        }
        held, segments = 0, []
        for run, rows in self._segments:
            if held >= keep:
                break
            rows = min(rows, keep - held)
            segments.append([run, rows])
            held += rows
        self._segments = segments

    # -- reading ---------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.steps)

    def has_series(self, name: str) -> bool:
        return name in self.series_names

    def series(self, name: str) -> np.ndarray:
        """float64 ``[n_steps]``."""
        try:
            return self._series[self.series_names.index(name)]
        except ValueError:
            raise self._missing("series", name) from None

    @property
    def revision(self) -> str:
        """Changes whenever the content may have changed, also when a run was closed and reopened."""
        return f"{self._opening}.{self.version}"

    @property
    def tasks(self) -> list[str]:
        """The run's task names: the meta's ``tasks``, else the ``loss/<task>`` series."""
        tasks = self.meta.get("tasks")
        if isinstance(tasks, list) and tasks:
            return [str(t) for t in tasks]
        return [n[len("loss/") :] for n in self.series_names if n.startswith("loss/")]

    @property
    def rules(self) -> list[str]:
        """The clipping rules whose factor is recorded, in the catalog's order."""
        return [r for r in RULE_NAMES if FACTOR_METRICS[r] in self.layer_metrics]

    def min_factor(self, rule: str) -> tuple[np.ndarray, np.ndarray]:
        """``(lowest factor over layers, index of that layer)`` per step; the layer is -1 if all NaN."""
        if rule not in self.rules:
            raise self._missing("factor rule", rule)
        return self.per_row(("min_factor", rule), lambda run: min_and_argmin(run.factor(rule)))

    @property
    def loss_series(self) -> list[str]:
        """``loss`` and the ``loss/<task>`` series; the first series if there are none."""
        names = [n for n in self.series_names if n == "loss" or n.startswith("loss/")]
        return names or self.series_names[:1]

    def layer(self, metric: str) -> np.ndarray:
        """float32 ``[n_steps, n_layers]``, assembled once per metric and extended as the run grows."""
        self._check_metric(metric)
        return self.per_row(("layer", metric), lambda run: (run.layer(metric),))[0]

    def layer_rows(self, metric: str, start: int, stop: int) -> np.ndarray:
        """float32 ``[stop - start, n_layers]`` of ``metric`` for rows ``start:stop`` (not cached)."""
        self._check_metric(metric)
        with self.lock:
            sizes = [rows for _, rows in self._segments]
            parts = [
                self._segments[i][0].layer_rows(metric, a, b)
                for i, a, b in overlaps(sizes, start, stop)
            ]
        if not parts:
            return np.zeros((0, len(self.layers)), np.float32)
        return np.concatenate(parts)

    def per_row(self, key: Hashable, compute: RowCompute) -> tuple[np.ndarray, ...]:
        """``compute(run)`` over every step held: read-only arrays with one row per step.

        Computed chunk by chunk on first use, then only on the rows each refresh
        appends (and cut on rewinds).  Only the results are held: the layer arrays
        ``compute`` reads are dropped (the record's memory maps keep the data).
        ``key`` names the result: one key, one computation.  RuntimeError before
        the first successful refresh.
        """
        with self.lock:
            if key not in self._per_row:
                if self._empty is None:
                    raise RuntimeError(f"{self._subject}: not read yet (call refresh first)")
                parts = [
                    tuple(a[:rows] for a in _uncached(compute, run)) for run, rows in self._segments
                ]
                columns = zip(compute(self._empty), *parts)
                self._per_row[key] = (compute, tuple(_frozen(np.concatenate(c)) for c in columns))
            return self._per_row[key][1]

    def row_at(self, step: int) -> int:
        """Row of the last recorded step at or before ``step`` (0 if it precedes the run)."""
        return max(int(np.searchsorted(self.steps, step, side="right")) - 1, 0)

    def row_range(self, start: int | None, end: int | None) -> tuple[int, int]:
        """Rows ``[i0, i1)`` whose steps lie in ``[start, end]`` (None: unbounded)."""
        i0 = 0 if start is None else int(np.searchsorted(self.steps, start, side="left"))
        i1 = len(self.steps) if end is None else int(np.searchsorted(self.steps, end, side="right"))
        return i0, max(i0, i1)

    def cached(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """``compute()`` memoised against ``key`` and the current version (the last
        ``cache_size`` results are kept)."""
        with self.lock:
            full_key = (self.version, *key)
            if full_key in self._derived:
                self._derived.move_to_end(full_key)
                return self._derived[full_key]
            value = compute()
            self._derived[full_key] = value
            while len(self._derived) > self._cache_size:
                self._derived.popitem(last=False)
            return value

    # -- messages --------------------------------------------------------------------

    @property
    def _subject(self) -> str:
        return f"run {self.name!r}" if self.name is not None else str(self.path)

    def _missing(self, what: str, key: str) -> KeyError:
        if self.name is not None:
            return KeyError(f"run {self.name!r} has no {what} {key!r}")
        return KeyError(f"no {what} {key!r}")

    def _check_metric(self, metric: str) -> None:
        if metric not in self.layer_metrics:
            raise self._missing("layer metric", metric)


def min_and_argmin(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the minimum ignoring NaN (NaN if all NaN) and its column (-1 if all NaN)."""
    if values.shape[1] == 0:
        return np.full(len(values), np.nan, np.float32), np.full(len(values), -1, np.int32)
    nan = np.isnan(values)
    where = np.argmin(np.where(nan, np.inf, values), axis=1).astype(np.int32)
    where[nan.all(axis=1)] = -1
    low = np.fmin.reduce(values, axis=1).astype(np.float32)
    return low, where


def _signature(path: Path) -> tuple:
    """``(inode, size, mtime)`` of the meta, record and events files (None if absent)."""
    out = []
    for name in (META_FILE, RECORD_FILE, EVENTS_FILE):
        try:
            st = os.stat(path / name)
        except FileNotFoundError:
            out.append(None)
        else:
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def _uncached(compute: RowCompute, run: Run) -> tuple[np.ndarray, ...]:
    """``compute(run)``, then ``run`` forgets the layer arrays it assembled for it: a
    segment keeps its layer data in the memory map, only the results are held."""
    try:
        return compute(run)
    finally:
        run.forget_layers()


def _frozen(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array
