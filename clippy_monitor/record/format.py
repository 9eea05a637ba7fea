"""On-disk layout of a clippy run record, shared by the writer and every reader.

See docs/RECORD_FORMAT.md for the full specification.  In short, a run's
logdir holds:

* ``clippy_meta.json``   -- run metadata, written once (atomically).
* ``clippy_record.bin``  -- append-only chunks, one per flush: a fixed
  72-byte header (:data:`HEADER_BODY` + :data:`HEADER_TAIL`) then a payload.
* ``clippy_events.jsonl`` -- divergence events, one JSON object per line.
* ``clippy_writer.bin``  -- the writer's lock, who holds it, and how many bytes of
  the record it has durably flushed (:class:`FlushMark`).
* ``events.out.tfevents.*`` -- TensorBoard scalars (derived, for the Scalars tab).

All binary fields are little-endian.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

# The per-layer metrics, their labels and each rule's factor: re-exported from the one catalog.
from clippy_monitor.catalog import FACTOR_METRICS, LAYER_METRICS, METRIC_LABELS  # noqa: F401

META_FILE = "clippy_meta.json"
RECORD_FILE = "clippy_record.bin"
EVENTS_FILE = "clippy_events.jsonl"
WRITER_FILE = "clippy_writer.bin"
#: Every file of a run record that the writer writes and readers open (TensorBoard event files aside).
RECORD_FILES = (META_FILE, RECORD_FILE, EVENTS_FILE, WRITER_FILE)
TB_FILE_PREFIX = "events.out.tfevents."

MAGIC = b"CLPY"
VERSION = 1
META_VERSION = 1

# Meta keys that fix the shape of every chunk; a resumed writer must match them.
SHAPE_KEYS = ("layers", "layer_metrics", "series", "detector_state_size")

# Chunk header: a 64-byte body, then the CRC32 of that body and 4 padding bytes
# so that the payload starts 8-byte aligned.
HEADER_BODY = struct.Struct(
    "<4s"  # magic b"CLPY"
    "H"  # format version
    "H"  # flags (reserved, 0)
    "I"  # n_steps
    "I"  # n_layer_metrics
    "I"  # n_layers
    "I"  # n_series
    "I"  # detector state size
    "I"  # CRC32 of the payload
    "q"  # first step
    "q"  # last step
    "Q"  # payload length in bytes (including padding)
    "d"  # wall time of the write (seconds since the epoch)
)
HEADER_TAIL = struct.Struct("<I4x")  # CRC32 of the header body, padding
HEADER_SIZE = HEADER_BODY.size + HEADER_TAIL.size  # 72

# clippy_writer.bin: two alternating 64-byte FlushMark slots (the newest valid one
# counts), then the holder's line (JSON, ``\n``-terminated).
MARK_MAGIC = b"CLPM"
MARK_BODY = struct.Struct(
    "<4s"  # magic b"CLPM"
    "H"  # version
    "H"  # flags (reserved, 0)
    "Q"  # sequence number (the slot is seq % 2)
    "Q"  # bytes of the record durably flushed
    "q"  # last step of the last chunk flushed (NO_STEP: none)
    "Q"  # bytes found missing when a writer resumed (cumulative)
    "d"  # wall time of the mark
)
MARK_TAIL = struct.Struct("<I12x")  # CRC32 of the body, padding
MARK_SIZE = MARK_BODY.size + MARK_TAIL.size  # 64
HOLDER_OFFSET = 2 * MARK_SIZE
NO_STEP = -(2**63)

STEP_DTYPE = np.dtype("<i8")
SERIES_DTYPE = np.dtype("<f8")
STATS_DTYPE = np.dtype("<f4")
STATE_DTYPE = np.dtype("<f4")

# TensorBoard scalar tags.
TB_PREFIX = "clippy_monitor/"


def series_tag(name: str) -> str:
    """TensorBoard tag of a per-step series, e.g. ``clippy_monitor/loss/click``."""
    return f"{TB_PREFIX}{name}"


def min_factor_tag(rule: str) -> str:
    """TensorBoard tag of a rule's minimum factor over layers."""
    return f"{TB_PREFIX}min_factor/{rule}"


NONFINITE_TAG = f"{TB_PREFIX}nonfinite_count"


def min_over_layers(values: np.ndarray) -> np.ndarray:
    """Minimum over the last (layer) axis, ignoring NaN unless all are NaN."""
    if values.shape[-1] == 0:
        return np.full(values.shape[:-1], np.nan, values.dtype)
    return np.fmin.reduce(values, axis=-1)


@dataclass(frozen=True)
class ChunkHeader:
    """Decoded fixed-size header of one chunk."""

    version: int
    flags: int
    n_steps: int
    n_layer_metrics: int
    n_layers: int
    n_series: int
    state_size: int
    payload_crc: int
    first_step: int
    last_step: int
    payload_len: int
    wall_time: float

    def pack(self) -> bytes:
        body = HEADER_BODY.pack(
            MAGIC,
            self.version,
            self.flags,
            self.n_steps,
            self.n_layer_metrics,
            self.n_layers,
            self.n_series,
            self.state_size,
            self.payload_crc,
            self.first_step,
            self.last_step,
            self.payload_len,
            self.wall_time,
        )
        return body + HEADER_TAIL.pack(zlib.crc32(body))

    @classmethod
    def unpack_from(cls, buf, offset: int) -> ChunkHeader | None:
        """Decode the header at ``offset``; None if the magic or header CRC is wrong."""
        body = bytes(buf[offset : offset + HEADER_BODY.size])
        magic, *fields = HEADER_BODY.unpack(body)
        (crc,) = HEADER_TAIL.unpack_from(buf, offset + HEADER_BODY.size)
        if magic != MAGIC or zlib.crc32(body) != crc:
            return None
        return cls(*fields)


@dataclass(frozen=True)
class FlushMark:
    """How much of the record a writer had durably flushed, written after each chunk's fsync.

    A record shorter than ``flushed`` was truncated by something other than a
    crash (a crash can only lose bytes the mark does not count yet).
    """

    seq: int
    flushed: int  # bytes of clippy_record.bin
    last_step: int  # last step of the last chunk flushed, NO_STEP if none
    lost: int  # bytes found missing by writers that resumed the record, in total
    wall_time: float

    @property
    def offset(self) -> int:
        """Where the mark is written in the writer file (two slots, alternating)."""
        return (self.seq % 2) * MARK_SIZE

    def pack(self) -> bytes:
        body = MARK_BODY.pack(
            MARK_MAGIC,
            VERSION,
            0,
            self.seq,
            self.flushed,
            self.last_step,
            self.lost,
            self.wall_time,
        )
        return body + MARK_TAIL.pack(zlib.crc32(body))

    @classmethod
    def latest(cls, data: bytes) -> FlushMark | None:
        """The newest valid mark in the leading bytes of a writer file, or None."""
        marks = []
        for offset in (0, MARK_SIZE):
            body = data[offset : offset + MARK_BODY.size]
            if len(body) < MARK_BODY.size or len(data) < offset + MARK_SIZE:
                continue
            (crc,) = MARK_TAIL.unpack_from(data, offset + MARK_BODY.size)
            magic, version, _, *fields = MARK_BODY.unpack(body)
            if magic == MARK_MAGIC and version == VERSION and zlib.crc32(body) == crc:
                marks.append(cls(*fields))
        return max(marks, key=lambda m: m.seq, default=None)

    def truncation(self, size: int) -> str | None:
        """Why a record of ``size`` bytes is not all its writers flushed, or None if it is."""
        if size < self.flushed:
            through = (
                f", written through step {self.last_step}" if self.last_step != NO_STEP else ""
            )
            return (
                f"{RECORD_FILE} was truncated after its writer flushed it: it holds "
                f"{size} of {self.flushed} bytes{through}"
            )
        if self.lost:
            return (
                f"{RECORD_FILE} was truncated before a writer resumed it: {self.lost} bytes "
                "were lost, rows written before the resume may be missing"
            )
        return None


@dataclass(frozen=True)
class PayloadLayout:
    """Byte offsets of the arrays inside a chunk payload (relative to its start)."""

    n_steps: int
    n_layer_metrics: int
    n_layers: int
    n_series: int
    state_size: int

    @property
    def series_offset(self) -> int:
        return self.n_steps * STEP_DTYPE.itemsize

    @property
    def stats_offset(self) -> int:
        return self.series_offset + self.n_steps * self.n_series * SERIES_DTYPE.itemsize

    @property
    def state_offset(self) -> int:
        n_stats = self.n_steps * self.n_layer_metrics * self.n_layers
        return self.stats_offset + n_stats * STATS_DTYPE.itemsize

    @property
    def size(self) -> int:
        """Payload length, padded to a multiple of 8 so the next header is aligned."""
        end = self.state_offset + self.state_size * STATE_DTYPE.itemsize
        return -(-end // 8) * 8


def meta_problem(meta: object) -> str | None:
    """Why ``meta`` cannot describe a record, or None if it can."""
    if not isinstance(meta, dict):
        return "not a JSON object"
    for key in ("layers", "layer_metrics", "series"):
        names = meta.get(key)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            return f"{key!r} must be a list of strings"
        if len(set(names)) != len(names):
            return f"{key!r} has duplicate names"
    size = meta.get("detector_state_size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        return "'detector_state_size' must be a non-negative integer"
    version = meta.get("record_version", META_VERSION)
    if not isinstance(version, int) or version > META_VERSION:
        return f"record_version {version!r} is newer than this reader ({META_VERSION})"
    return None


def optimizer_name(optimizer: object) -> str | None:
    """A short display name of the meta's ``optimizer`` entry, or None if there is none.

    The callback stores ``keras.saving.serialize_keras_object(optimizer)``: its
    ``class_name`` is shown, followed by ``config.name`` in parentheses only when
    that is not Keras' default (the class name, or it in lower/snake case:
    ``Adagrad``/``adagrad``).  A dict without ``class_name`` may give ``name``;
    any other non-empty value is shown as text.
    """
    if not isinstance(optimizer, dict):
        return str(optimizer) if optimizer else None
    config = optimizer.get("config")
    given = str(config.get("name") or "") if isinstance(config, dict) else ""
    name = str(optimizer.get("class_name") or optimizer.get("name") or "")
    if name and given and given.replace("_", "").lower() != name.replace("_", "").lower():
        return f"{name} ({given})"
    return name or given or None


@dataclass(frozen=True)
class RecordShape:
    """The per-step array shapes fixed by a record's meta."""

    n_layer_metrics: int
    n_layers: int
    n_series: int
    state_size: int

    @classmethod
    def from_meta(cls, meta: dict) -> RecordShape:
        return cls(
            len(meta["layer_metrics"]),
            len(meta["layers"]),
            len(meta["series"]),
            int(meta["detector_state_size"]),
        )

    def layout(self, n_steps: int) -> PayloadLayout:
        return PayloadLayout(
            n_steps, self.n_layer_metrics, self.n_layers, self.n_series, self.state_size
        )

    def matches(self, header: ChunkHeader) -> bool:
        return (
            header.n_layer_metrics,
            header.n_layers,
            header.n_series,
            header.state_size,
        ) == (self.n_layer_metrics, self.n_layers, self.n_series, self.state_size)
