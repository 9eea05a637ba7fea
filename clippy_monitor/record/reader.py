"""Read clippy run records: whole runs (:func:`load_run`) or live deltas (:class:`RunFollower`).

Reading never fails because of a damaged record file: unreadable bytes (a torn
tail left by a killed writer, a chunk failing its CRC, a truncated events line),
events with impossible steps and a record truncated below what its writer
flushed are skipped or reported in ``Run.skipped``.  Only a missing path, a
directory without a record, or unreadable meta raise :class:`RecordError`.
"""

from __future__ import annotations

import json
import mmap
import os
import stat
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clippy_monitor.record.format import (
    EVENTS_FILE,
    FACTOR_METRICS,
    HEADER_SIZE,
    HOLDER_OFFSET,
    MAGIC,
    META_FILE,
    RECORD_FILE,
    RECORD_FILES,
    SERIES_DTYPE,
    STATE_DTYPE,
    STATS_DTYPE,
    STEP_DTYPE,
    VERSION,
    WRITER_FILE,
    ChunkHeader,
    FlushMark,
    RecordShape,
    meta_problem,
    min_over_layers,
)


class RecordError(Exception):
    """A path holds no readable clippy record (the message is one line)."""


class RecordShrank(RecordError):
    """A record file is now shorter than what was read of it: replaced or truncated in place."""


class RecordLocked(RecordError, RuntimeError):
    """Another :class:`RunWriter` holds the record (the message names the logdir and the holder)."""


# --------------------------------------------------------------------------- meta


def read_meta(logdir: str | os.PathLike) -> dict:
    """The validated ``clippy_meta.json`` of ``logdir``; RecordError if missing or corrupt."""
    path = Path(logdir) / META_FILE
    try:
        meta = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise RecordError(f"{Path(logdir)}: no {META_FILE}, not a clippy record") from None
    except (OSError, ValueError, RecursionError) as exc:
        raise RecordError(f"{path}: unreadable clippy meta ({_one_line(exc)})") from None
    problem = meta_problem(meta)
    if problem:
        raise RecordError(f"{path}: corrupt clippy meta ({problem})")
    return meta


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# ------------------------------------------------------------------------- chunks


@dataclass(frozen=True)
class ChunkInfo:
    """Where a chunk lies in ``clippy_record.bin`` and how much of it a Run uses."""

    offset: int
    first_step: int
    last_step: int
    n_steps: int
    rows: int  # rows still in effect (fewer than n_steps if a later rewind superseded some)
    wall_time: float


@dataclass(frozen=True)
class _Chunk:
    """A verified chunk; the arrays are views into the file buffer."""

    offset: int
    header: ChunkHeader
    steps: np.ndarray  # [n] int64
    series: np.ndarray  # [n, n_series] float64
    stats: np.ndarray  # [n_layer_metrics, n, n_layers] float32 (metric-major on disk)
    state: np.ndarray  # [state_size] float32

    @property
    def size(self) -> int:
        return HEADER_SIZE + self.header.payload_len


@dataclass(frozen=True)
class _Bad:
    """Why no usable chunk starts at some offset; ``size`` is set when it is intact but unusable."""

    reason: str
    size: int | None = None


def _parse_at(buf, pos: int, shape: RecordShape, base: int) -> _Chunk | _Bad:
    """Verify and decode the chunk at ``buf[pos:]`` (``base + pos`` is its file offset)."""
    available = len(buf) - pos
    if available < HEADER_SIZE:
        return _Bad("incomplete chunk header")
    header = ChunkHeader.unpack_from(buf, pos)
    if header is None:
        return _Bad("no valid chunk header")
    steps_txt = f"steps {header.first_step}..{header.last_step}"
    size = HEADER_SIZE + header.payload_len
    if size > available:
        have = available - HEADER_SIZE
        return _Bad(f"incomplete chunk ({steps_txt}, {have} of {header.payload_len} payload bytes)")
    start = pos + HEADER_SIZE
    if zlib.crc32(memoryview(buf)[start : pos + size]) != header.payload_crc:
        return _Bad(f"chunk ({steps_txt}) is torn or corrupt (payload CRC mismatch)")
    if header.version != VERSION:
        return _Bad(f"chunk ({steps_txt}) has unsupported version {header.version}", size)
    layout = shape.layout(header.n_steps)
    if not shape.matches(header) or header.n_steps < 1 or layout.size != header.payload_len:
        return _Bad(f"chunk ({steps_txt}) does not match the shapes in {META_FILE}", size)
    n = header.n_steps
    chunk = _Chunk(
        offset=base + pos,
        header=header,
        steps=np.frombuffer(buf, STEP_DTYPE, n, start),
        series=np.frombuffer(
            buf, SERIES_DTYPE, n * shape.n_series, start + layout.series_offset
        ).reshape(n, shape.n_series),
        stats=np.frombuffer(
            buf,
            STATS_DTYPE,
            n * shape.n_layer_metrics * shape.n_layers,
            start + layout.stats_offset,
        ).reshape(shape.n_layer_metrics, n, shape.n_layers),
        state=np.frombuffer(buf, STATE_DTYPE, shape.state_size, start + layout.state_offset),
    )
    if chunk.steps[0] != header.first_step or chunk.steps[-1] != header.last_step:
        return _Bad(f"chunk ({steps_txt}) has steps inconsistent with its header", size)
    if np.any(chunk.steps[1:] <= chunk.steps[:-1]):
        return _Bad(f"chunk ({steps_txt}) has steps that are not strictly increasing", size)
    return chunk


def _next_intact(buf, start: int, shape: RecordShape) -> int | None:
    """Offset of the next chunk with a valid header and payload CRC at or after ``start``."""
    pos = buf.find(MAGIC, start)
    while pos >= 0:
        parsed = _parse_at(buf, pos, shape, 0)
        if isinstance(parsed, _Chunk) or parsed.size is not None:
            return pos
        pos = buf.find(MAGIC, pos + 1)
    return None


def _scan(
    buf,
    shape: RecordShape,
    *,
    base: int = 0,
    start: int = 0,
    final: bool = True,
    truncation: str | None = None,
):
    """Decode the chunks in ``buf[start:]``; ``buf[0]`` is at file offset ``base``.

    Returns ``(chunks, notes, end)`` where ``end`` is the file offset up to
    which parsing is settled.  Damaged bytes followed by an intact chunk are
    skipped (a resumed writer appends after a torn tail).  Damaged bytes at the
    end are a torn tail when ``final``; otherwise they may be a chunk still
    being written, so ``end`` stops before them.  ``truncation`` (the file is
    shorter than its writer flushed) ends the torn tail's note, or is a note of
    its own.
    """
    chunks: list[_Chunk] = []
    notes: list[str] = []
    pos = start
    while pos < len(buf):
        parsed = _parse_at(buf, pos, shape, base)
        if isinstance(parsed, _Chunk):
            chunks.append(parsed)
            pos += parsed.size
            continue
        where = f"{RECORD_FILE} offset {base + pos}"
        if parsed.size is not None:
            notes.append(f"{where}: {parsed.reason}; chunk skipped")
            pos += parsed.size
            continue
        resume_at = _next_intact(buf, pos + 1, shape)
        if resume_at is None:
            if final:
                tail = f"{where}: {parsed.reason}; torn tail of {len(buf) - pos} bytes ignored"
                notes.append(f"{tail}; {truncation}" if truncation else tail)
                truncation, pos = None, len(buf)
            break
        notes.append(f"{where}: {parsed.reason}; {resume_at - pos} bytes skipped")
        pos = resume_at
    return chunks, notes + ([truncation] if truncation else []), base + pos


# ------------------------------------------------------------ rewind / timeline


@dataclass
class _Slice:
    """The leading ``rows`` rows of a chunk that are still in effect."""

    chunk: _Chunk
    rows: int

    @property
    def steps(self) -> np.ndarray:
        return self.chunk.steps[: self.rows]

    @property
    def last_step(self) -> int:
        return int(self.chunk.steps[self.rows - 1])

    @property
    def whole(self) -> bool:
        return self.rows == self.chunk.header.n_steps


def _append_chunk(timeline: list[_Slice], chunk: _Chunk) -> None:
    """Append ``chunk``, first dropping held rows with step >= its first step (a rewind)."""
    first = chunk.header.first_step
    while timeline and timeline[-1].last_step >= first:
        last = timeline[-1]
        last.rows = int(np.searchsorted(last.steps, first))
        if last.rows:
            break
        timeline.pop()
    timeline.append(_Slice(chunk, chunk.header.n_steps))


# -------------------------------------------------------------------------- events


def _parse_events(data: bytes, *, base: int = 0, final: bool = True):
    """Decode JSONL events; returns ``(events, notes, consumed)``.

    Only newline-terminated lines are read; an unterminated last line is a torn
    write (noted when ``final``, otherwise left for the next poll).
    """
    consumed = data.rfind(b"\n") + 1
    events: list[dict] = []
    notes: list[str] = []
    pos = 0
    for line in data[:consumed].split(b"\n")[:-1]:
        if line.strip():
            event = _decode_event(line)
            problem = "unreadable line skipped" if event is None else _event_problem(event)
            if problem is None:
                events.append(_with_int_steps(event))
            else:
                notes.append(f"{EVENTS_FILE} offset {base + pos}: {problem}")
        pos += len(line) + 1
    if final and consumed < len(data):
        notes.append(f"{EVENTS_FILE}: torn last line ({len(data) - consumed} bytes) ignored")
    return events, notes, consumed


def _decode_event(line: bytes) -> dict | None:
    try:
        event = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return event if isinstance(event, dict) else None


#: Event fields that hold a step (absent or null when they do not apply).
EVENT_STEP_KEYS = (
    "step_a",
    "step_b",
    "step_c",
    "recovered",
    "confirmed_at",
    "decided_at",
    "step",
    "snapshot_step",
)
_MAX_STEP = 2**63 - 1  # steps are int64 in the record
_MAX_FLOAT_STEP = 2**53  # larger floats are not exact integers


def _event_problem(event: dict) -> str | None:
    """Why ``event`` cannot be a divergence event of a run (one line), or None if it can."""
    steps: dict[str, int] = {}
    for key in EVENT_STEP_KEYS:
        value = event.get(key)
        if value is None:
            continue
        is_int = type(value) is int or (
            type(value) is float and value.is_integer() and abs(value) <= _MAX_FLOAT_STEP
        )
        if not is_int:
            return _dropped(event, f"{key} {_short(value)} is not an integer step")
        if value < 0:
            return _dropped(event, f"{key} {_short(value)} is negative")
        if value > _MAX_STEP:
            return _dropped(event, f"{key} {_short(value)} is out of range")
        steps[key] = int(value)
    a, b, c, r = (steps.get(k) for k in ("step_a", "step_b", "step_c", "recovered"))
    if b is not None:
        if a is not None and a >= b:
            return _dropped(event, f"step_a {a} is not before step_b {b}")
        if c is not None and c < b:
            return _dropped(event, f"step_c {c} is before step_b {b}")
        if r is not None and r <= b:
            return _dropped(event, f"recovered {r} is not after step_b {b}")
        for key in ("confirmed_at", "decided_at"):
            if steps.get(key) is not None and steps[key] < b:
                return _dropped(event, f"{key} {steps[key]} is before step_b {b}")
    if a is not None and c is not None and a >= c:  # without step_b
        return _dropped(event, f"step_a {a} is not before step_c {c}")
    return None


def _dropped(event: dict, why: str) -> str:
    return f"impossible {_short(event.get('kind'))} event dropped: {why}"


def _short(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _with_int_steps(event: dict) -> dict:
    """``event`` with its integral float steps (e.g. ``2.0``) as ints."""
    floats = {k: int(event[k]) for k in EVENT_STEP_KEYS if type(event.get(k)) is float}
    return {**event, **floats} if floats else event


def _event_steps(event: dict) -> list[int]:
    values = (event.get(key) for key in ("step_a", "step_b", "step_c", "step"))
    return [v for v in values if type(v) is int]


# ----------------------------------------------------------------------------- Run


@dataclass(eq=False, repr=False)
class Run:
    """A loaded run record.  Rows are unique, strictly increasing steps.

    ``layer()`` and ``series()`` return read-only arrays that are cached; copy
    them before modifying.  Layer arrays are assembled on first use, so loading
    a long run costs little until its layer statistics are needed.
    """

    path: Path
    meta: dict
    steps: np.ndarray  # int64 [n]
    layers: list[str]
    layer_metrics: list[str]
    series_names: list[str]
    events: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    chunks: list[ChunkInfo] = field(default_factory=list)
    _series: np.ndarray | None = None  # float64 [n_series, n]
    _blocks: list[np.ndarray] = field(default_factory=list)  # per chunk: [metrics, rows, layers]
    _states: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (last step, state)
    _cache: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.steps)

    def __repr__(self) -> str:
        span = f"steps {self.steps[0]}..{self.steps[-1]}" if len(self) else "no steps"
        return (
            f"{type(self).__name__}({str(self.path)!r}, {len(self)} rows, {span}, "
            f"{len(self.layers)} layers, {len(self.events)} events, {len(self.skipped)} skipped)"
        )

    def layer(self, metric: str) -> np.ndarray:
        """Per-layer statistic ``metric`` as float32 ``[n_steps, n_layers]``."""
        if metric not in self._cache:
            m = _index(self.layer_metrics, metric, "layer metric")
            parts = [block[m] for block in self._blocks]
            values = (
                np.concatenate(parts) if parts else np.empty((0, len(self.layers)), STATS_DTYPE)
            )
            values.flags.writeable = False
            self._cache[metric] = values
        return self._cache[metric]

    def layer_rows(self, metric: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` (``0 <= start <= stop``) of :meth:`layer`, copied from the
        chunks that hold them only; nothing is cached."""
        if metric in self._cache:
            return self._cache[metric][start:stop]
        m = _index(self.layer_metrics, metric, "layer metric")
        sizes = [block.shape[1] for block in self._blocks]
        parts = [self._blocks[i][m, a:b] for i, a, b in overlaps(sizes, start, stop)]
        return np.concatenate(parts) if parts else np.empty((0, len(self.layers)), STATS_DTYPE)

    def forget_layers(self) -> None:
        """Drop the arrays :meth:`layer` assembled (copies: the chunks stay in the memory map)."""
        self._cache.clear()

    def series(self, name: str) -> np.ndarray:
        """Per-step series ``name`` as float64 ``[n_steps]``."""
        return self._series[_index(self.series_names, name, "series")]

    def factor(self, rule: str) -> np.ndarray:
        """Factors of ``rule`` ("gc", "agc", "clippy", "applied"), ``[n_steps, n_layers]``."""
        if rule not in FACTOR_METRICS:
            raise KeyError(f"unknown factor rule {rule!r}; known: {', '.join(FACTOR_METRICS)}")
        return self.layer(FACTOR_METRICS[rule])

    def min_factor(self, rule: str) -> np.ndarray:
        """Minimum of ``rule``'s factor over layers (NaN ignored), ``[n_steps]``."""
        return min_over_layers(self.factor(rule))

    @property
    def detector_state(self) -> np.ndarray | None:
        """Detector state saved after the last step, or None for an empty run."""
        return self._states[-1][1].copy() if self._states else None

    def saved_states(self) -> list[tuple[int, np.ndarray]]:
        """``(last step, saved state)`` of each chunk, in order (rewound chunks left out)."""
        return [(last, state.copy()) for last, state in self._states]

    def detector_state_at(self, step: int) -> np.ndarray | None:
        """State saved with the last chunk ending at or before ``step`` (None if none).

        Chunks partly superseded by a rewind have no usable state.
        """
        for last_step, state in reversed(self._states):
            if last_step <= step:
                return state.copy()
        return None

    def tail(self, since_step: int) -> Run:
        """The rows with step > ``since_step`` (and the events touching them)."""
        start = int(np.searchsorted(self.steps, since_step, side="right"))
        events = [e for e in self.events if any(s > since_step for s in _event_steps(e))]
        return _replace_rows(self, start, events)


@dataclass(eq=False, repr=False)
class RunDelta(Run):
    """What :meth:`RunFollower.poll` found since the previous poll.

    If ``rewind_from`` is not None, training was rewound: first drop every row
    you hold with step >= ``rewind_from``, then append this delta's rows.
    """

    rewind_from: int | None = None

    @property
    def empty(self) -> bool:
        return not len(self) and not self.events and not self.skipped and self.rewind_from is None


def overlaps(sizes: Iterable[int], start: int, stop: int) -> Iterator[tuple[int, int, int]]:
    """``(i, a, b)``: rows ``a:b`` of piece ``i`` for rows ``start:stop`` of pieces of ``sizes`` rows, end to end."""
    offset = 0
    for i, rows in enumerate(sizes):
        if offset >= stop:
            return
        a, b = max(start, offset), min(stop, offset + rows)
        if a < b:
            yield i, a - offset, b - offset
        offset += rows


def _index(names: list[str], name: str, what: str) -> int:
    try:
        return names.index(name)
    except ValueError:
        raise KeyError(f"no {what} {name!r}; this record has: {', '.join(names)}") from None


def _run_from_timeline(
    cls: type[Run], path: Path, meta: dict, timeline: list[_Slice], **extra
) -> Run:
    shape = RecordShape.from_meta(meta)
    steps = [s.steps for s in timeline]
    series = [s.chunk.series[: s.rows] for s in timeline]
    series_table = (
        np.concatenate(series).T.copy() if series else np.empty((shape.n_series, 0), SERIES_DTYPE)
    )
    series_table.flags.writeable = False
    return cls(
        path=path,
        meta=meta,
        steps=np.concatenate(steps) if steps else np.empty(0, STEP_DTYPE),
        layers=list(meta["layers"]),
        layer_metrics=list(meta["layer_metrics"]),
        series_names=list(meta["series"]),
        chunks=[_chunk_info(s) for s in timeline],
        _series=series_table,
        _blocks=[s.chunk.stats[:, : s.rows] for s in timeline],
        _states=[(s.last_step, s.chunk.state) for s in timeline if s.whole],
        **extra,
    )


def _chunk_info(piece: _Slice) -> ChunkInfo:
    h = piece.chunk.header
    return ChunkInfo(
        piece.chunk.offset, h.first_step, h.last_step, h.n_steps, piece.rows, h.wall_time
    )


def _replace_rows(run: Run, start: int, events: list[dict]) -> Run:
    """A copy of ``run`` holding only rows ``start:``."""
    blocks, chunks, offset = [], [], 0
    for block, info in zip(run._blocks, run.chunks):  # parallel lists, one entry per chunk
        rows = block.shape[1]
        if offset + rows > start:
            blocks.append(block[:, max(start - offset, 0) :])
            chunks.append(info)
        offset += rows
    return Run(
        path=run.path,
        meta=run.meta,
        steps=run.steps[start:],
        layers=run.layers,
        layer_metrics=run.layer_metrics,
        series_names=run.series_names,
        events=events,
        skipped=list(run.skipped),
        chunks=chunks,
        _series=run._series[:, start:],
        _blocks=blocks,
        _states=run._states,
    )


# ------------------------------------------------------------------------ loading


def load_run(path: str | os.PathLike) -> Run:
    """Load the record in ``path`` (a run's logdir, or a directory holding exactly one)."""
    return load_run_at(_resolve_logdir(Path(path)))


def load_run_at(logdir: Path) -> Run:
    """Load the record written in exactly ``logdir`` (no search for a run below it)."""
    meta = read_meta(logdir)
    mark = read_flush_mark(logdir)  # before the record: a live writer marks after each chunk
    buf, base = _map_record(logdir / RECORD_FILE)
    truncation = mark.truncation(base + len(buf)) if mark is not None else None
    chunks, notes, _ = _scan(buf, RecordShape.from_meta(meta), base=base, truncation=truncation)
    timeline: list[_Slice] = []
    for chunk in chunks:
        _append_chunk(timeline, chunk)
    events, event_notes, _ = _parse_events(_read_from(logdir / EVENTS_FILE, 0))
    return _run_from_timeline(
        Run, logdir, meta, timeline, events=events, skipped=notes + event_notes
    )


def read_flush_mark(logdir: Path) -> FlushMark | None:
    """The newest valid :class:`FlushMark` of ``logdir``'s writer file, or None (a record
    written before the mark existed, or a damaged or unreadable writer file)."""
    try:
        # O_NONBLOCK: a FIFO planted in place of the file must not hang the reader.
        fd = os.open(logdir / WRITER_FILE, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return FlushMark.latest(os.pread(fd, HOLDER_OFFSET, 0))
    except OSError:
        return None
    finally:
        os.close(fd)


def _map_record(path: Path, offset: int = 0):
    """A read-only memory map of ``path`` from (at most a page before) ``offset``.

    Returns ``(buffer, base)``, ``base`` being the file offset of ``buffer[0]``.
    Chunk arrays are views into the map, which is unmapped once they are all gone.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < offset:
                raise RecordShrank(f"{path}: file shrank below offset {offset}; reload the run")
            if size == offset:
                return b"", offset
            base = offset - offset % mmap.ALLOCATIONGRANULARITY
            return mmap.mmap(f.fileno(), size - base, access=mmap.ACCESS_READ, offset=base), base
    except FileNotFoundError:
        return b"", offset


def _read_from(path: Path, offset: int) -> bytes:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < offset:
                raise RecordShrank(f"{path}: file shrank below offset {offset}; reload the run")
            f.seek(offset)
            return f.read(size - offset)
    except FileNotFoundError:
        return b""


def _resolve_logdir(path: Path) -> Path:
    if not path.exists():
        raise RecordError(f"{path}: no such file or directory")
    if path.is_file():
        if path.name in RECORD_FILES:
            return path.parent
        raise RecordError(f"{path}: not a clippy record directory")
    if (path / META_FILE).exists():
        return path
    runs = find_runs(path)
    if len(runs) == 1:
        return runs[0]
    if runs:
        raise RecordError(
            f"{path}: holds {len(runs)} clippy records; pass one of them, e.g. {runs[0]}"
        )
    if (path / RECORD_FILE).exists():
        raise RecordError(f"{path}: has {RECORD_FILE} but no {META_FILE}")
    raise RecordError(f"{path}: holds no clippy record (no {META_FILE})")


def find_runs(root: str | os.PathLike) -> list[Path]:
    """Every directory at or under ``root`` holding a record, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise RecordError(f"{root}: no such directory")
    return sorted(Path(d) for d, _, files in os.walk(root) if META_FILE in files)


# ----------------------------------------------------------------------- follower


class RunFollower:
    """Incremental reader for a live run.

    Each :meth:`poll` reads only bytes appended since the previous poll and
    returns them as a :class:`RunDelta` (the first poll returns everything so
    far).  A chunk that is still being written is left for a later poll.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = _resolve_logdir(Path(path))
        self.meta = read_meta(self.path)
        self._shape = RecordShape.from_meta(self.meta)
        self._record_offset = 0
        self._events_offset = 0
        self._last_step: int | None = None
        self._truncation: str | None = None  # the last truncation reported

    @property
    def last_step(self) -> int | None:
        """The last step returned so far."""
        return self._last_step

    def poll(self) -> RunDelta:
        mark = read_flush_mark(self.path)  # before the record, as the writer marks after it
        buf, base = _map_record(self.path / RECORD_FILE, self._record_offset)
        truncation = mark.truncation(base + len(buf)) if mark is not None else None
        chunks, notes, self._record_offset = _scan(
            buf,
            self._shape,
            base=base,
            start=self._record_offset - base,
            final=False,
            truncation=truncation if truncation != self._truncation else None,
        )
        self._truncation = truncation
        timeline: list[_Slice] = []
        rewind_from = None
        for chunk in chunks:
            first = chunk.header.first_step
            if self._last_step is not None and first <= self._last_step:
                rewind_from = first if rewind_from is None else min(rewind_from, first)
            _append_chunk(timeline, chunk)
        if timeline:
            self._last_step = timeline[-1].last_step

        data = _read_from(self.path / EVENTS_FILE, self._events_offset)
        events, event_notes, consumed = _parse_events(data, base=self._events_offset, final=False)
        self._events_offset += consumed
        return _run_from_timeline(
            RunDelta,
            self.path,
            self.meta,
            timeline,
            events=events,
            skipped=notes + event_notes,
            rewind_from=rewind_from,
        )
