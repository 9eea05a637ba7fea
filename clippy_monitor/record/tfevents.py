"""The TensorBoard scalars of a run record, written as TensorBoard event files.

``ScalarTable`` picks the scalars of each chunk (tags in ``format.py``); ``EventFile``
writes them.  TensorBoard's own ``EventFileWriter`` is not used: it opens its file
through ``tf.io.gfile`` (importing all of TensorFlow wherever it is installed),
computes each record's CRC32C in pure Python, writes a different first event, and
numbers its files without the zero padding a rewound run's file order relies on.
"""

from __future__ import annotations

import functools
import itertools
import os
import socket
import struct
import time
from pathlib import Path

import numpy as np
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

from clippy_monitor.record.format import (
    FACTOR_METRICS,
    NONFINITE_TAG,
    TB_FILE_PREFIX,
    min_factor_tag,
    min_over_layers,
    series_tag,
)


class ScalarTable:
    """Turns chunks into the TensorBoard scalars of a record (tags in format.py)."""

    def __init__(self, meta: dict, logdir: Path):
        metrics = meta["layer_metrics"]
        self.tags = [series_tag(name) for name in meta["series"]]
        self._factor_rows = []
        for rule, metric in FACTOR_METRICS.items():
            if metric in metrics:
                self.tags.append(min_factor_tag(rule))
                self._factor_rows.append(metrics.index(metric))
        self._nonfinite_row = (
            metrics.index("nonfinite_count") if "nonfinite_count" in metrics else None
        )
        if self._nonfinite_row is not None:
            self.tags.append(NONFINITE_TAG)
        self._file = EventFile(logdir)

    def write(
        self,
        steps: np.ndarray,
        wall_times: np.ndarray,
        layer_stats: np.ndarray,
        series: np.ndarray,
        *,
        restart: bool,
    ) -> None:
        """One chunk's scalars: its series, each rule's lowest factor, the non-finite count."""
        columns = [series.astype(np.float32)]
        columns += [min_over_layers(layer_stats[:, row, :])[:, None] for row in self._factor_rows]
        if self._nonfinite_row is not None:
            columns.append(layer_stats[:, self._nonfinite_row, :].sum(axis=1, keepdims=True))
        if restart:
            # Makes TensorBoard discard the superseded points with step >= steps[0].
            self._file.write_restart(int(steps[0]), float(wall_times[0]))
        self._file.write_scalars(steps, wall_times, self.tags, np.concatenate(columns, axis=1))

    def close(self) -> None:
        self._file.close()


_FILE_IDS = itertools.count()


class EventFile:
    """A minimal TensorBoard event-file writer for ``simple_value`` scalars: TFRecord
    framing, with the CRC32C of all records of a chunk computed at once."""

    def __init__(self, logdir: Path):
        # TensorBoard reads event files in name order, and a rewound run relies on
        # the newer file coming last: the counter is zero-padded so that the 10th
        # file of a second sorts after the 9th.
        name = (
            f"{TB_FILE_PREFIX}{int(time.time()):010d}.{socket.gethostname()}"
            f".{os.getpid()}.{next(_FILE_IDS):06d}.clippy"
        )
        self.path = logdir / name
        self._file = open(self.path, "ab")
        version = event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")
        self._write([version.SerializeToString()])

    def write_scalars(
        self, steps: np.ndarray, wall_times: np.ndarray, tags: list[str], values: np.ndarray
    ) -> None:
        """One Event per step holding one simple_value per tag (``values`` [n, n_tags])."""
        event = event_pb2.Event()
        slots = [event.summary.value.add(tag=tag) for tag in tags]
        records = []
        for step, wall_time, row in zip(steps.tolist(), wall_times.tolist(), values.tolist()):
            event.step = step
            event.wall_time = wall_time
            for slot, value in zip(slots, row):
                slot.simple_value = value
            records.append(event.SerializeToString())
        self._write(records)

    def write_restart(self, step: int, wall_time: float) -> None:
        """A SessionLog START at ``step``: TensorBoard drops the points from ``step`` on."""
        start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
        self._write(
            [event_pb2.Event(step=step, wall_time=wall_time, session_log=start).SerializeToString()]
        )

    def close(self) -> None:
        self._file.close()

    def _write(self, records: list[bytes]) -> None:
        """TFRecord frames: length, masked CRC32C of the length, record, its masked CRC32C."""
        frames = []
        for record, crc in zip(records, masked_crc32c_batch(records).tolist()):
            frames += [_U64.pack(len(record)), _length_crc(len(record)), record, _U32.pack(crc)]
        self._file.write(b"".join(frames))
        self._file.flush()


_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


@functools.lru_cache(maxsize=64)
def _length_crc(length: int) -> bytes:
    return _U32.pack(masked_crc32c(_U64.pack(length)))


def _crc32c_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(0x82F63B78), table >> 1)
    return table.astype(np.uint32)


_CRC32C_TABLE = _crc32c_table()


def masked_crc32c_batch(records: list[bytes]) -> np.ndarray:
    """TFRecord's masked CRC32C of each record, vectorised over records of equal length."""
    lengths = np.fromiter(map(len, records), np.int64, len(records))
    crcs = np.empty(len(records), np.uint32)
    for length in np.unique(lengths):
        idx = np.flatnonzero(lengths == length)
        rows = np.frombuffer(b"".join([records[i] for i in idx]), np.uint8)
        columns = rows.reshape(len(idx), int(length)).T.copy()
        crc = np.full(len(idx), 0xFFFFFFFF, np.uint32)
        for column in columns:
            crc = _CRC32C_TABLE[(crc ^ column) & 0xFF] ^ (crc >> 8)
        crcs[idx] = crc ^ np.uint32(0xFFFFFFFF)
    return ((crcs >> 15) | (crcs << 17)) + np.uint32(0xA282EAD8)
