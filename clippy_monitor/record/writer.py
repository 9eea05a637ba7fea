"""Write clippy run records: crash-safe binary chunks, JSONL events and (``tfevents``)
TensorBoard scalars."""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import socket
import time
import weakref
import zlib
from pathlib import Path
from types import TracebackType

import numpy as np

from clippy_monitor.record.format import (
    EVENTS_FILE,
    HOLDER_OFFSET,
    LAYER_METRICS,
    META_FILE,
    META_VERSION,
    NO_STEP,
    RECORD_FILE,
    SERIES_DTYPE,
    SHAPE_KEYS,
    STATE_DTYPE,
    STATS_DTYPE,
    STEP_DTYPE,
    VERSION,
    WRITER_FILE,
    ChunkHeader,
    FlushMark,
    RecordShape,
    meta_problem,
)
from clippy_monitor.record.reader import RecordLocked, load_run_at, read_meta
from clippy_monitor.record.tfevents import ScalarTable

_log = logging.getLogger(__name__)


class RunWriter:
    """Appends a training run's statistics to the record in ``logdir``.

    If ``logdir`` already holds a record, the writer resumes it: the layers,
    layer metrics, series and detector state size must match, and the meta file
    written by the first writer is kept unchanged.  One writer per record:
    :class:`RecordLocked` if another process's writer holds it.  Not thread-safe.
    """

    def __init__(self, logdir: str | os.PathLike, meta: dict, *, tensorboard: bool = True):
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        meta = _normalize_meta(meta)
        _close_abandoned_writer(self.logdir)
        with contextlib.ExitStack() as opened:  # closes what was opened if a step fails
            # The lock comes before anything is written: two writers starting
            # together on a new logdir must not both write the meta.
            self._lock = opened.enter_context(contextlib.closing(_WriterLock(self.logdir)))
            self.meta, self.resumed = _init_meta(self.logdir, meta)
            self._shape = RecordShape.from_meta(self.meta)
            self.last_step, _ = resume_point(self.logdir) if self.resumed else (None, None)
            self._record = opened.enter_context(open(self.logdir / RECORD_FILE, "ab"))
            self._lock.check_truncation(os.fstat(self._record.fileno()).st_size, self.last_step)
            self._events = opened.enter_context(_open_events(self.logdir / EVENTS_FILE))
            self._tb = ScalarTable(self.meta, self.logdir) if tensorboard else None
            opened.pop_all()
        _OPEN_WRITERS[self.logdir.resolve()] = weakref.ref(self)
        self._last_flush_time = time.time()
        self._closed = False

    def append(
        self,
        steps: np.ndarray,
        layer_stats: np.ndarray,
        series: np.ndarray,
        detector_state: np.ndarray | None,
    ) -> None:
        """Append one chunk and fsync it; then write its TensorBoard scalars.

        ``steps`` int [n] strictly increasing; ``layer_stats`` [n, n_layer_metrics,
        n_layers]; ``series`` [n, n_series]; ``detector_state`` [state_size], the
        detector state after the chunk's last step.  Steps at or below the last
        recorded step mean training was rewound: readers drop the older rows.
        """
        if self._closed:
            raise ValueError("RunWriter is closed")
        steps, layer_stats, series, state = self._check(steps, layer_stats, series, detector_state)
        if not len(steps):
            return
        now = time.time()
        self._write_chunk(steps, layer_stats, series, state, now)
        if self._tb is not None:
            rewound = self.last_step is not None and steps[0] <= self.last_step
            wall_times = np.linspace(self._last_flush_time, now, len(steps) + 1)[1:]
            self._tb.write(steps, wall_times, layer_stats, series, restart=rewound)
        self.last_step = int(steps[-1])
        self._last_flush_time = now

    def add_events(self, events: list[dict]) -> None:
        """Append divergence events (JSON-able dicts) to ``clippy_events.jsonl`` and fsync."""
        if self._closed:
            raise ValueError("RunWriter is closed")
        if not all(isinstance(e, dict) for e in events):
            raise TypeError("events must be dicts")
        lines = "".join(json.dumps(e, default=_json_default) + "\n" for e in events)
        if lines:
            self._events.write(lines.encode())
            _sync(self._events)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._record.close()
        self._events.close()
        if self._tb is not None:
            self._tb.close()
        self._lock.close()

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _check(self, steps, layer_stats, series, detector_state):
        steps = np.asarray(steps)
        if steps.ndim != 1 or not np.issubdtype(steps.dtype, np.integer):
            raise ValueError(f"steps must be a 1-D integer array, got {steps.dtype} {steps.shape}")
        steps = np.ascontiguousarray(steps, dtype=STEP_DTYPE)
        if np.any(np.diff(steps) <= 0):
            raise ValueError("steps must be strictly increasing within a chunk")
        n, shape = len(steps), self._shape
        if detector_state is None:
            detector_state = np.zeros(0, STATE_DTYPE)
        return (
            steps,
            _as_array(
                layer_stats, STATS_DTYPE, (n, shape.n_layer_metrics, shape.n_layers), "layer_stats"
            ),
            _as_array(series, SERIES_DTYPE, (n, shape.n_series), "series"),
            _as_array(detector_state, STATE_DTYPE, (shape.state_size,), "detector_state"),
        )

    def _write_chunk(self, steps, layer_stats, series, state, wall_time: float) -> None:
        # Metric-major on disk so that readers can copy one metric per chunk in one block.
        by_metric = np.ascontiguousarray(layer_stats.transpose(1, 0, 2))
        parts = [memoryview(a).cast("B") for a in (steps, series, by_metric, state)]
        layout = self._shape.layout(len(steps))
        parts.append(bytes(layout.size - layout.state_offset - state.nbytes))  # zero padding
        crc = 0
        for part in parts:
            crc = zlib.crc32(part, crc)
        header = ChunkHeader(
            version=VERSION,
            flags=0,
            n_steps=len(steps),
            n_layer_metrics=self._shape.n_layer_metrics,
            n_layers=self._shape.n_layers,
            n_series=self._shape.n_series,
            state_size=self._shape.state_size,
            payload_crc=crc,
            first_step=int(steps[0]),
            last_step=int(steps[-1]),
            payload_len=layout.size,
            wall_time=wall_time,
        )
        self._record.write(header.pack())
        for part in parts:
            self._record.write(part)
        _sync(self._record)
        # Only after the fsync: a crash before this line loses no counted byte.
        self._lock.mark(os.fstat(self._record.fileno()).st_size, int(steps[-1]))


def resume_point(logdir: str | os.PathLike) -> tuple[int | None, np.ndarray | None]:
    """(last recorded step, detector state saved with it), or (None, None) if no record."""
    run = _load_if_present(Path(logdir))
    if run is None or not len(run):
        return None, None
    return int(run.steps[-1]), run.detector_state


def detector_state_at(logdir: str | os.PathLike, step: int) -> np.ndarray | None:
    """The detector state saved with the last chunk ending at or before ``step``.

    Use it when training restarts from a checkpoint taken at ``step``; the
    state is exact when checkpoints coincide with flushes.
    """
    run = _load_if_present(Path(logdir))
    return None if run is None else run.detector_state_at(step)


def saved_states(logdir: str | os.PathLike) -> list[tuple[int, np.ndarray]]:
    """``(last step, saved state)`` of each chunk of the record (empty if none)."""
    run = _load_if_present(Path(logdir))
    return [] if run is None else run.saved_states()


def recorded_events(logdir: str | os.PathLike) -> list[dict]:
    """The record's events, in file order (empty if there is no record)."""
    run = _load_if_present(Path(logdir))
    return [] if run is None else list(run.events)


def _load_if_present(logdir: Path):
    return load_run_at(logdir) if (logdir / META_FILE).exists() else None


# --------------------------------------------------------------------------- meta


def _normalize_meta(meta: dict) -> dict:
    """A JSON round-tripped copy of ``meta`` with defaults; ValueError if it is unusable."""
    meta = json.loads(json.dumps(dict(meta), default=_json_default))
    meta.setdefault("layer_metrics", list(LAYER_METRICS))
    meta.setdefault("detector_state_size", 0)
    meta["record_version"] = META_VERSION
    problem = meta_problem(meta)
    if problem:
        raise ValueError(f"invalid clippy record meta: {problem}")
    return meta


def _init_meta(logdir: Path, meta: dict) -> tuple[dict, bool]:
    """The meta in effect and whether an existing record is resumed."""
    if (logdir / META_FILE).exists():
        existing = read_meta(logdir)
        for key in SHAPE_KEYS:
            if existing[key] != meta[key]:
                raise ValueError(
                    f"cannot resume the clippy record in {logdir}: "
                    + _difference(key, existing[key], meta[key])
                )
        return existing, True
    record = logdir / RECORD_FILE
    if record.exists() and record.stat().st_size:
        raise ValueError(
            f"{logdir} holds {RECORD_FILE} but no {META_FILE}; refusing to append to it"
        )
    _write_json_atomic(logdir / META_FILE, meta)
    return meta, False


def _difference(key: str, old, new) -> str:
    if key == "detector_state_size":
        return (
            f"its saved detector state has {old} entries but this run's has {new}: the "
            "record was written by a clippy_monitor with another detector state layout "
            "(before the onset look-back slots, docs/RECORD_FORMAT.md) or with recovery "
            "or skip_bad_steps set otherwise; resume it with the version and settings "
            "that wrote it, or start a new logdir"
        )
    if not isinstance(old, list):
        return f"{key!r} is {old!r} in the record but {new!r} in this run"
    text = f"{key!r} has {len(old)} entries in the record and {len(new)} in this run"
    for i, (a, b) in enumerate(zip(old, new)):
        if a != b:
            return f"{text}; first difference at index {i}: {a!r} (record) vs {b!r} (run)"
    return text


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, default=_json_default)
        f.write("\n")
        _sync(f)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


# ---------------------------------------------------------------------------- files


def _sync(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_OPEN_WRITERS: dict[Path, weakref.ref] = {}


def _close_abandoned_writer(logdir: Path) -> None:
    """Close a writer of this process still open on ``logdir``.

    ``fit`` never calls ``on_train_end`` when it raises, so a monitor retried in
    the same process (a notebook) would otherwise find the record locked by its
    crashed predecessor.  Every chunk is fsynced at ``append``, so nothing is lost.
    """
    ref = _OPEN_WRITERS.pop(logdir.resolve(), None)
    previous = ref() if ref is not None else None
    if previous is not None:
        previous.close()


class _WriterLock:
    """The writer file (``clippy_writer.bin``): an exclusive lock held until :meth:`close`,
    the holder's pid and host, and the :class:`FlushMark` updated after each chunk.

    Two writers interleaving chunks (e.g. every worker of a multi-worker job)
    would still give a readable file, but a meaningless one.  The kernel drops
    the lock when the process dies, so a killed writer never blocks a resume.
    """

    def __init__(self, logdir: Path):
        self._logdir = logdir
        # A file object, not a bare descriptor: a writer dropped without close()
        # releases the lock when it is garbage-collected, as the old record lock did.
        self._file = os.fdopen(
            os.open(logdir / WRITER_FILE, os.O_RDWR | os.O_CREAT, 0o644), "r+b", 0
        )
        fd = self._file.fileno()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            self._file.close()
            raise RecordLocked(
                f"{logdir}: another RunWriter is appending to this record ({holder}); "
                "let it finish or write this run to another logdir"
            ) from None
        except BaseException:
            self._file.close()
            raise
        since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        line = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since})
        os.pwrite(fd, line.encode() + b"\n", HOLDER_OFFSET)
        os.ftruncate(fd, HOLDER_OFFSET + len(line) + 1)
        self._mark = FlushMark.latest(os.pread(fd, HOLDER_OFFSET, 0))

    def check_truncation(self, size: int, last_step: int | None) -> None:
        """At open: if the record holds less than was flushed, warn and count the loss."""
        mark = self._mark
        if mark is None or size >= mark.flushed:
            return
        _log.warning("%s: %s; appending after what remains", self._logdir, mark.truncation(size))
        self._write(
            size, NO_STEP if last_step is None else last_step, mark.lost + mark.flushed - size
        )

    def mark(self, flushed: int, last_step: int) -> None:
        """Record that ``flushed`` bytes of the record, through ``last_step``, are durable."""
        self._write(flushed, last_step, self._mark.lost if self._mark is not None else 0)

    def close(self) -> None:
        self._file.close()  # releases the lock

    def _write(self, flushed: int, last_step: int, lost: int) -> None:
        seq = self._mark.seq + 1 if self._mark is not None else 0
        self._mark = FlushMark(seq, flushed, last_step, lost, time.time())
        os.pwrite(self._file.fileno(), self._mark.pack(), self._mark.offset)
        os.fsync(self._file.fileno())


def _holder(fd: int) -> str:
    """Who holds the writer file ``fd``, from the line the holder wrote after locking it."""
    for _ in range(50):  # the holder writes its line right after taking the lock
        line = os.pread(fd, 4096, HOLDER_OFFSET).split(b"\n", 1)[0]
        try:
            holder = json.loads(line)
            return f"pid {int(holder['pid'])} on {holder['host']}, since {holder['since']}"
        except (ValueError, TypeError, KeyError, RecursionError):
            time.sleep(0.01)
    return "holder unknown"


def _open_events(path: Path):
    f = open(path, "ab+")
    f.seek(0, os.SEEK_END)
    if f.tell():
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
            # A writer was killed mid-line: end the fragment so that it cannot
            # merge with the next event (readers skip it as unreadable).
            f.write(b"\n")
            _sync(f)
    return f


def _as_array(value, dtype: np.dtype, shape: tuple[int, ...], name: str) -> np.ndarray:
    array = np.ascontiguousarray(value, dtype=dtype)
    if array.shape != shape:
        raise ValueError(f"{name} has shape {array.shape}, expected {shape}")
    return array
