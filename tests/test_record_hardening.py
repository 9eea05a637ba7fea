"""Hardening of the run record (issue 13): the writer's lock, the flushed-size mark that
tells an external truncation from a crash, impossible events, and a fuzz test of the reader."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import clippy_monitor
from clippy_monitor.record import RecordError, RunFollower, RunWriter, load_run
from clippy_monitor.record.format import (
    EVENTS_FILE,
    HEADER_BODY,
    HEADER_SIZE,
    MAGIC,
    META_FILE,
    RECORD_FILE,
    VERSION,
    WRITER_FILE,
    ChunkHeader,
    FlushMark,
    PayloadLayout,
)

# Small shapes: chunks of a few hundred bytes keep the fuzz test fast.
META = {
    "layers": ["emb", "head"],
    "layer_metrics": ["grad_norm", "weight_norm", "clippy_factor"],
    "series": ["loss", "detector/status"],
    "detector_state_size": 3,
}
N_METRICS, N_LAYERS, N_SERIES, STATE_SIZE = 3, 2, 2, 3


def make_chunk(first: int, n: int, seed: int):
    rng = np.random.default_rng(seed)
    return (
        np.arange(first, first + n, dtype=np.int64),
        rng.standard_normal((n, N_METRICS, N_LAYERS)).astype(np.float32),
        rng.standard_normal((n, N_SERIES)),
        rng.standard_normal(STATE_SIZE).astype(np.float32),
    )


CHUNKS = [
    make_chunk(1, 3, 1),
    make_chunk(4, 1, 2),
    make_chunk(5, 4, 3),
    make_chunk(9, 2, 4),
    make_chunk(11, 3, 5),
]


def write(logdir: Path, chunks, meta: dict = META) -> None:
    with RunWriter(logdir, meta, tensorboard=False) as writer:
        for chunk in chunks:
            writer.append(*chunk)


def assert_rows(run, chunks) -> None:
    """``run`` holds exactly the rows of ``chunks``, in order."""
    if not chunks:
        assert len(run) == 0
        return
    steps, stats, series, _ = (np.concatenate(parts) for parts in zip(*chunks))
    np.testing.assert_array_equal(run.steps, steps)
    for m, metric in enumerate(META["layer_metrics"]):
        np.testing.assert_array_equal(run.layer(metric), stats[:, m, :])
    for s, name in enumerate(META["series"]):
        np.testing.assert_array_equal(run.series(name), series[:, s])
    np.testing.assert_array_equal(run.detector_state, chunks[-1][3])


def head(chunk, k: int):
    """The first ``k`` rows of a chunk (its detector state unchanged)."""
    return tuple(x[:k] for x in chunk[:3]) + (chunk[3],)


def chunk_bytes(scratch: Path, chunk) -> bytes:
    """The bytes RunWriter writes for ``chunk`` (written into a scratch record)."""
    write(scratch, [chunk])
    return (scratch / RECORD_FILE).read_bytes()


def chunk_starts(logdir: Path) -> list[int]:
    return [c.offset for c in load_run(logdir).chunks]


def chunk_ends(logdir: Path) -> list[int]:
    layout = functools.partial(
        PayloadLayout,
        n_layer_metrics=N_METRICS,
        n_layers=N_LAYERS,
        n_series=N_SERIES,
        state_size=STATE_SIZE,
    )
    return [c.offset + HEADER_SIZE + layout(c.n_steps).size for c in load_run(logdir).chunks]


# ------------------------------------------------------------- two writers at once

# A writer process for the race: it reads commands on stdin, one per line:
#   "open LOGDIR N_LAYERS"  construct a RunWriter; answer "won PID" or "lost TYPE MESSAGE-JSON"
#   "finish"                the winner appends its chunks and closes; answer "done"
# The top-level package is stubbed so that the record modules load without TensorFlow.
RACER = textwrap.dedent("""
    import json, os, sys, types
    import numpy as np
    package = types.ModuleType("clippy_monitor")
    package.__path__ = [sys.argv[1]]
    sys.modules["clippy_monitor"] = package
    from clippy_monitor.record import RunWriter

    writer = None
    for line in sys.stdin:
        command, *args = line.split()
        if command == "open":
            n = int(args[1])
            meta = {"layers": [f"l{j}" for j in range(n)], "layer_metrics": ["grad_norm"],
                    "series": ["loss"], "detector_state_size": 0}
            try:
                writer = RunWriter(args[0], meta, tensorboard=False)
                print("won", os.getpid(), flush=True)
            except Exception as exc:
                writer = None
                print("lost", type(exc).__name__, json.dumps(str(exc)), flush=True)
        elif command == "finish":
            if writer is not None:
                for i in range(3):
                    steps = np.arange(1 + 4 * i, 5 + 4 * i)
                    writer.append(steps, np.full((4, 1, n), n, np.float32), np.zeros((4, 1)), None)
                writer.close()
            print("done", flush=True)
    """)


def test_two_writers_starting_together_on_a_new_logdir(tmp_path):
    """Both construct at the same moment with different layer counts: exactly one wins
    and keeps its meta and all its steps; the other fails at once, naming the logdir and
    the winner."""
    package_dir = str(Path(clippy_monitor.__file__).parent)
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, package_dir],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for trial in range(8):
            logdir = tmp_path / f"trial{trial}"
            order = racers if trial % 2 else racers[::-1]
            for racer, layers in zip(
                order, (2, 3)
            ):  # both are blocked on readline: they start together
                racer.stdin.write(f"open {logdir} {layers}\n")
                racer.stdin.flush()
            answers = [racer.stdout.readline().split(" ", 2) for racer in order]
            for racer in order:
                racer.stdin.write("finish\n")
                racer.stdin.flush()
                assert racer.stdout.readline() == "done\n"
            winners = [i for i, a in enumerate(answers) if a[0] == "won"]
            assert len(winners) == 1, answers
            winner_layers = (2, 3)[winners[0]]
            run = load_run(logdir)
            assert len(run.layers) == winner_layers, f"trial {trial}: the loser's meta survived"
            assert run.steps.tolist() == list(range(1, 13)), (
                f"trial {trial}: the winner's steps are lost"
            )
            np.testing.assert_array_equal(
                run.layer("grad_norm"), np.full((12, winner_layers), winner_layers)
            )
            assert run.skipped == []
            _, kind, message = answers[1 - winners[0]]
            message = json.loads(message)
            assert kind == "RecordLocked", message
            assert str(logdir) in message and f"pid {answers[winners[0]][1].strip()}" in message
    finally:
        for racer in racers:
            racer.stdin.close()
            racer.wait(timeout=60)


def test_a_failed_constructor_releases_the_lock(tmp_path):
    """The lock is taken before the meta is checked: a refused resume must release it."""
    write(tmp_path, CHUNKS[:1])
    with pytest.raises(
        ValueError, match="cannot resume"
    ):  # shape mismatch: after the lock is taken
        RunWriter(tmp_path, {**META, "layers": ["x"]}, tensorboard=False)
    write(tmp_path, CHUNKS[1:2])  # the lock was released by the failed constructor
    assert_rows(load_run(tmp_path), CHUNKS[:2])


def test_a_writer_dropped_without_close_frees_the_record(tmp_path):
    import gc

    writer = RunWriter(tmp_path, META, tensorboard=False)
    writer.append(*CHUNKS[0])
    del writer
    gc.collect()
    write(tmp_path, CHUNKS[1:2])
    assert_rows(load_run(tmp_path), CHUNKS[:2])


# ----------------------------------------------------------------- truncation


def test_truncation_at_a_chunk_boundary_is_reported(tmp_path):
    write(tmp_path, CHUNKS)
    ends = chunk_ends(tmp_path)
    os.truncate(
        tmp_path / RECORD_FILE, ends[2]
    )  # the last two chunks cut off, exactly at a boundary
    run = load_run(tmp_path)
    assert_rows(run, CHUNKS[:3])
    assert len(run.skipped) == 1, run.skipped
    note = run.skipped[0]
    assert (
        "truncated" in note
        and "through step 13" in note
        and f"holds {ends[2]} of {ends[-1]} bytes" in note
    )


def test_truncation_inside_a_flushed_chunk_is_one_note(tmp_path):
    write(tmp_path, CHUNKS)
    ends = chunk_ends(tmp_path)
    os.truncate(tmp_path / RECORD_FILE, ends[-1] - 10)
    run = load_run(tmp_path)
    assert_rows(run, CHUNKS[:-1])
    assert len(run.skipped) == 1
    assert (
        "torn tail" in run.skipped[0]
        and f"truncated after its writer flushed it: it holds {ends[-1] - 10} of" in run.skipped[0]
    )


def test_truncation_to_nothing_is_reported(tmp_path):
    write(tmp_path, CHUNKS[:2])
    os.truncate(tmp_path / RECORD_FILE, 0)
    run = load_run(tmp_path)
    assert len(run) == 0 and len(run.skipped) == 1 and "truncated" in run.skipped[0]


def test_a_crash_between_chunk_and_mark_is_not_a_truncation(tmp_path):
    """kill -9 after a chunk is fsynced but before the flushed size is updated: the record
    is longer than the mark says, which is not a truncation."""
    write(tmp_path, CHUNKS[:2])
    blob = chunk_bytes(tmp_path / "scratch", CHUNKS[2])
    with open(tmp_path / RECORD_FILE, "ab") as f:
        f.write(blob)  # a chunk whose writer died before updating the mark
    run = load_run(tmp_path)
    assert_rows(run, CHUNKS[:3])
    assert run.skipped == []
    with open(tmp_path / RECORD_FILE, "ab") as f:
        f.write(blob[:50])  # and a torn tail after it
    run = load_run(tmp_path)
    assert_rows(run, CHUNKS[:3])
    assert len(run.skipped) == 1 and "torn tail" in run.skipped[0]


def test_resume_and_rewind_keep_the_mark_consistent(tmp_path):
    write(tmp_path, CHUNKS[:3])
    write(tmp_path, CHUNKS[3:4])  # resumed by a new writer
    assert load_run(tmp_path).skipped == []
    before_rewind = (tmp_path / RECORD_FILE).stat().st_size
    rewound = make_chunk(6, 5, 9)  # training restarted from a checkpoint at step 5
    write(tmp_path, [rewound])
    run = load_run(tmp_path)
    assert_rows(run, [CHUNKS[0], CHUNKS[1], head(CHUNKS[2], 1), rewound])
    assert run.skipped == []
    os.truncate(tmp_path / RECORD_FILE, before_rewind)  # cut the rewound chunk off
    run = load_run(tmp_path)
    assert_rows(run, CHUNKS[:4])
    assert (
        len(run.skipped) == 1
        and "truncated" in run.skipped[0]
        and "through step 10" in run.skipped[0]
    )


def test_truncation_before_a_resume_stays_reported(tmp_path, caplog):
    write(tmp_path, CHUNKS)
    ends = chunk_ends(tmp_path)
    os.truncate(tmp_path / RECORD_FILE, ends[1])
    with caplog.at_level("WARNING", logger="clippy_monitor.record"):
        write(tmp_path, [make_chunk(20, 2, 7)])
    assert len(caplog.records) == 1 and "truncated" in caplog.records[0].getMessage()
    run = load_run(tmp_path)
    assert run.steps.tolist() == [1, 2, 3, 4, 20, 21]
    assert len(run.skipped) == 1
    assert "truncated" in run.skipped[0] and f"{ends[-1] - ends[1]} bytes" in run.skipped[0]


def test_a_record_without_the_mark_still_loads(tmp_path):
    write(tmp_path, CHUNKS)
    (tmp_path / WRITER_FILE).unlink()  # a record written before the mark existed
    os.truncate(tmp_path / RECORD_FILE, chunk_ends(tmp_path)[1])
    run = load_run(tmp_path)
    assert_rows(run, CHUNKS[:2])
    assert run.skipped == []
    write(tmp_path, CHUNKS[2:3])  # resuming it starts a mark
    assert_rows(load_run(tmp_path), CHUNKS[:3])


def test_follower_reports_a_truncation_once(tmp_path):
    write(tmp_path, CHUNKS)
    os.truncate(tmp_path / RECORD_FILE, chunk_ends(tmp_path)[2])
    follower = RunFollower(tmp_path)
    delta = follower.poll()
    assert delta.steps.tolist() == list(range(1, 9))
    assert len(delta.skipped) == 1 and "truncated" in delta.skipped[0]
    assert follower.poll().empty


# --------------------------------------------------------------------- events

GOOD_EVENTS = [
    {
        "kind": "micro",
        "step_a": 4,
        "step_b": 5,
        "step_c": None,
        "recovered": 8,
        "task": "loss",
        "reason": "spike",
    },
    {
        "kind": "full",
        "step_a": None,
        "step_b": 1,
        "step_c": 1,
        "recovered": None,
        "task": None,
        "reason": "non_finite",
    },
    # step_c after the record's last step is legitimate: events survive a rewind.
    {
        "kind": "full",
        "step_a": 9,
        "step_b": 10,
        "step_c": 500,
        "recovered": None,
        "task": None,
        "reason": "no_recovery",
    },
    {"kind": "note"},
    {"kind": "micro", "step_a": 2.0, "step_b": 3},  # integral floats are steps
]
BAD_EVENTS = [
    ({"kind": "full", "step_a": -6, "step_b": -5, "step_c": -5}, "step_a -6 is negative"),
    ({"kind": "full", "step_a": 7, "step_b": 5, "step_c": 9}, "step_a 7 is not before step_b 5"),
    ({"kind": "full", "step_a": 4, "step_b": 5, "step_c": 3}, "step_c 3 is before step_b 5"),
    (
        {"kind": "full", "step_a": 4, "step_b": 5, "step_c": 6, "decided_at": 3},
        "decided_at 3 is before step_b 5",
    ),
    (
        {"kind": "micro", "step_a": 4, "step_b": 5, "recovered": 5},
        "recovered 5 is not after step_b 5",
    ),
    ({"kind": "full", "step_a": 8, "step_c": 8}, "step_a 8 is not before step_c 8"),
    (
        {"kind": "full", "step_a": 1, "step_b": 2, "step_c": 1e308},
        "step_c 1e+308 is not an integer step",
    ),
    ({"kind": "full", "step_b": 2, "step_c": 2**63}, "out of range"),
    ({"kind": "micro", "step_b": 2.5}, "step_b 2.5 is not an integer step"),
    ({"kind": "micro", "step_b": "7"}, "step_b '7' is not an integer step"),
    ({"kind": "micro", "step_b": True}, "step_b True is not an integer step"),
]


def test_impossible_events_are_dropped_with_one_line_each(tmp_path):
    write(tmp_path, CHUNKS)
    lines = [json.dumps(e) for e in GOOD_EVENTS + [e for e, _ in BAD_EVENTS]]
    lines.insert(2, '{"kind": "full", "step_b": 3, "step_c": NaN}')
    lines.insert(3, '{"kind": "full", "step_b": 3, "step_c": Infinity}')
    (tmp_path / EVENTS_FILE).write_text("".join(line + "\n" for line in lines))
    run = load_run(tmp_path)
    assert run.events == [{**e, "step_a": 2} if e.get("step_a") == 2.0 else e for e in GOOD_EVENTS]
    assert all(type(e.get("step_a", 0)) is int or e["step_a"] is None for e in run.events)
    expected = ["step_c nan is not an integer step", "step_c inf is not an integer step"] + [
        why for _, why in BAD_EVENTS
    ]
    assert len(run.skipped) == len(expected), run.skipped
    for note, why in zip(run.skipped, expected):
        assert (
            note.startswith(f"{EVENTS_FILE} offset ") and "event dropped" in note and why in note
        ), note
        assert "\n" not in note
    follower_skipped = RunFollower(tmp_path).poll().skipped  # every reader drops them
    assert follower_skipped == run.skipped


def test_deeply_nested_json_is_unreadable_not_a_traceback(tmp_path):
    write(tmp_path, CHUNKS[:1])
    (tmp_path / EVENTS_FILE).write_bytes(b"[" * 100_000 + b"\n" + b'{"kind": "x"}\n')
    run = load_run(tmp_path)
    assert (
        run.events == [{"kind": "x"}]
        and len(run.skipped) == 1
        and "unreadable line" in run.skipped[0]
    )
    (tmp_path / META_FILE).write_bytes(b'{"layers": ' + b"[" * 100_000)
    with pytest.raises(RecordError, match="unreadable clippy meta"):
        load_run(tmp_path)


# ------------------------------------------------------------- forged chunks


def forge_chunk(steps, *, first=None, last=None, n_layers=N_LAYERS) -> bytes:
    """A chunk with valid CRCs holding ``steps`` (which need not be increasing)."""
    steps = np.asarray(steps, np.int64)
    n = len(steps)
    layout = PayloadLayout(n, N_METRICS, n_layers, N_SERIES, STATE_SIZE)
    payload = steps.tobytes() + bytes(layout.size - steps.nbytes)
    header = ChunkHeader(
        VERSION,
        0,
        n,
        N_METRICS,
        n_layers,
        N_SERIES,
        STATE_SIZE,
        zlib.crc32(payload),
        int(steps[0]) if first is None else first,
        int(steps[-1]) if last is None else last,
        layout.size,
        0.0,
    )
    return header.pack() + payload


@pytest.mark.parametrize("steps", [[5, 5, 6], [9, 3, 10], [10, 8, 7]])
def test_chunk_with_steps_out_of_order_is_skipped(tmp_path, steps):
    write(tmp_path, CHUNKS[:1])
    with open(tmp_path / RECORD_FILE, "ab") as f:
        f.write(forge_chunk(steps))
    run = load_run(tmp_path)
    assert_rows(run, CHUNKS[:1])
    assert len(run.skipped) == 1 and "not strictly increasing" in run.skipped[0]


# ------------------------------------------------------------------ fuzzing


class Template:
    """The files of a clean record, written once; each example mutates copies of them."""

    def __init__(self, logdir: Path) -> None:
        write(logdir, CHUNKS)
        with RunWriter(logdir, META, tensorboard=False) as writer:
            writer.add_events(GOOD_EVENTS[:3])
        self.files = {p.name: p.read_bytes() for p in logdir.iterdir()}
        self.spans = list(zip(chunk_starts(logdir), chunk_ends(logdir)))
        assert len(self.spans) == len(CHUNKS)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Template:
    return Template(tmp_path_factory.mktemp("template"))


def mutate(data: bytes, ops) -> bytes:
    """``data`` after ``ops`` (truncations, byte flips, insertions, appended garbage)."""
    out = bytearray(data)
    for op, *args in ops:
        if op == "truncate":
            del out[args[0] % (len(out) + 1) :]
        elif op == "flip" and out:
            out[args[0] % len(out)] ^= args[1]
        elif op == "insert":
            at = args[0] % (len(out) + 1)
            out[at:at] = args[1]
        elif op == "append":
            out += args[0]
    return bytes(out)


def without_padding(data: bytes) -> bytes:
    """``data`` with the 4 padding bytes of every chunk header zeroed: no CRC covers them
    and no reader uses them, so changing them changes nothing."""
    out = bytearray(data)
    at = out.find(MAGIC)
    while at >= 0:
        if len(out) - at >= HEADER_SIZE and ChunkHeader.unpack_from(data, at) is not None:
            out[at + HEADER_BODY.size + 4 : at + HEADER_SIZE] = bytes(4)
        at = out.find(MAGIC, at + 1)
    return bytes(out)


def intact_chunks(record: bytes, original: bytes, spans) -> list[int]:
    """Indices of the original chunks whose bytes are all still in ``record``, in one piece
    (garbage never holds a whole chunk: it would need a payload with a matching CRC)."""
    record, original = without_padding(record), without_padding(original)
    return [k for k, (start, end) in enumerate(spans) if original[start:end] in record]


BYTE_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("truncate"), st.integers(0, 10**6)),
        st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
        st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=80)),
        st.tuples(st.just("append"), st.binary(min_size=1, max_size=200)),
        # Garbage that looks like the start of a chunk.
        st.tuples(st.just("append"), st.binary(max_size=120).map(lambda b: b"CLPY" + b)),
    ),
    max_size=4,
)
STEP_VALUE = st.one_of(
    st.none(), st.integers(-5, 50), st.integers(), st.floats(), st.text(max_size=3), st.booleans()
)
EVENT_LINES = st.lists(
    st.one_of(
        st.fixed_dictionaries(
            {},
            optional={k: STEP_VALUE for k in ("step_a", "step_b", "step_c", "recovered", "step")},
        ).map(lambda e: json.dumps({"kind": "full", **e}).encode()),
        st.binary(max_size=40),
        st.integers(1, 3000).map(lambda depth: b"[" * depth),
    ),
    max_size=5,
)


def is_step(value) -> bool:
    return type(value) is int and 0 <= value < 2**63


def check_event(event: dict) -> None:
    """What every event a reader returns satisfies."""
    assert isinstance(event, dict)
    steps = {k: event.get(k) for k in ("step_a", "step_b", "step_c", "recovered", "step")}
    assert all(v is None or is_step(v) for v in steps.values()), event
    a, b, c, r = (steps[k] for k in ("step_a", "step_b", "step_c", "recovered"))
    assert a is None or b is None or a < b
    assert b is None or c is None or b <= c
    assert b is None or r is None or b < r
    assert a is None or c is None or a < c


@settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(record_ops=BYTE_OPS, writer_ops=BYTE_OPS, event_ops=BYTE_OPS, event_lines=EVENT_LINES)
@example(record_ops=[("truncate", 0)], writer_ops=[], event_ops=[], event_lines=[])
@example(
    record_ops=[("flip", HEADER_BODY.size + 4, 1)], writer_ops=[], event_ops=[], event_lines=[]
)  # header padding
@example(record_ops=[], writer_ops=[("truncate", 0)], event_ops=[], event_lines=[b"[" * 5000])
def test_fuzz_damaged_records_read_exactly_their_intact_chunks(
    template, record_ops, writer_ops, event_ops, event_lines
):
    """Truncations, byte flips, insertions and garbage anywhere: the reader never raises,
    reads exactly the chunks left intact, reports every change to the record, and
    returns only possible events."""
    base = template
    record = mutate(base.files[RECORD_FILE], record_ops)
    files = dict(base.files)
    files[RECORD_FILE] = record
    files[WRITER_FILE] = mutate(files[WRITER_FILE], writer_ops)
    files[EVENTS_FILE] = mutate(
        files[EVENTS_FILE] + b"".join(line + b"\n" for line in event_lines), event_ops
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        run = load_run(tmp)
        delta = RunFollower(tmp).poll()
    intact = intact_chunks(record, base.files[RECORD_FILE], base.spans)
    assert_rows(run, [CHUNKS[k] for k in intact])
    np.testing.assert_array_equal(delta.steps, run.steps)
    record_changed = without_padding(record) != without_padding(base.files[RECORD_FILE])
    record_notes = [n for n in run.skipped if not n.startswith(EVENTS_FILE)]
    assert record_changed or not record_notes, record_notes  # no false alarm
    if FlushMark.latest(files[WRITER_FILE]) == FlushMark.latest(base.files[WRITER_FILE]):
        assert record_notes or not record_changed, record_ops  # every change is reported
    assert all("\n" not in note for note in run.skipped)
    for event in run.events + delta.events:
        check_event(event)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=12,
)
META_CHANGE = st.dictionaries(
    st.sampled_from(
        ["layers", "layer_metrics", "series", "detector_state_size", "record_version", "other"]
    ),
    JSON | st.lists(st.text(max_size=3), max_size=4) | st.integers(-2, 6),
    max_size=3,
)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    change=META_CHANGE,
    raw=st.none() | JSON.map(json.dumps).map(str.encode) | st.binary(max_size=30),
)
def test_fuzz_meta(template, change, raw):
    """Any meta: a RecordError of one line naming the file, or a clean load that reads all
    the chunks if its shapes are the record's, and none (each noted) otherwise."""
    base = template
    meta = {**META, **change}
    data = json.dumps(meta).encode() if raw is None else raw
    with tempfile.TemporaryDirectory() as tmp:
        for name, content in base.files.items():
            (Path(tmp) / name).write_bytes(content)
        (Path(tmp) / META_FILE).write_bytes(data)
        try:
            run = load_run(tmp)
        except RecordError as exc:
            assert "\n" not in str(exc) and META_FILE in str(exc)
            return
    loaded = run.meta
    shapes = (
        len(loaded["layer_metrics"]),
        len(loaded["layers"]),
        len(loaded["series"]),
        loaded["detector_state_size"],
    )
    if shapes == (N_METRICS, N_LAYERS, N_SERIES, STATE_SIZE):
        assert run.steps.tolist() == list(range(1, 14)) and run.skipped == []
    else:
        assert len(run) == 0 and len(run.skipped) == len(CHUNKS)
        assert all("does not match the shapes" in note for note in run.skipped)
