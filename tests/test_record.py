"""Tests for clippy_monitor.record: format, writer, readers, crash safety."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

import clippy_monitor
from clippy_monitor.record import (
    FACTOR_METRICS,
    LAYER_METRICS,
    LiveRecord,
    RecordError,
    RunFollower,
    RunWriter,
    detector_state_at,
    find_runs,
    load_run,
    resume_point,
)
from clippy_monitor.record.format import (
    EVENTS_FILE,
    HEADER_SIZE,
    META_FILE,
    RECORD_FILE,
    PayloadLayout,
    optimizer_name,
)
from clippy_monitor.record.tfevents import masked_crc32c_batch as _masked_crc32c_batch

LAYERS = ["emb", "shared/dense", "head/click"]
SERIES = ["loss", "loss/click", "detector/status"]
STATE_SIZE = 4
META = {
    "layers": LAYERS,
    "layer_metrics": list(LAYER_METRICS),
    "series": SERIES,
    "tasks": ["click"],
    "thresholds": {"loss_ratio": 3.0},
    "detector_state_size": STATE_SIZE,
    "optimizer": {"name": "ClippyAdagrad", "lambda_rel": 0.5},
}


def make_chunk(first: int, n: int, seed: int = 0):
    """Random chunk arrays for steps first..first+n-1."""
    rng = np.random.default_rng(seed)
    steps = np.arange(first, first + n, dtype=np.int64)
    stats = rng.standard_normal((n, len(LAYER_METRICS), len(LAYERS))).astype(np.float32)
    series = rng.standard_normal((n, len(SERIES)))
    state = rng.standard_normal(STATE_SIZE).astype(np.float32)
    return steps, stats, series, state


def write_chunks(logdir: Path, chunks, *, tensorboard: bool = False) -> None:
    with RunWriter(logdir, META, tensorboard=tensorboard) as writer:
        for chunk in chunks:
            writer.append(*chunk)


def assert_rows(run, chunks) -> None:
    """``run`` holds exactly the concatenated rows of ``chunks``."""
    steps, stats, series, _ = (np.concatenate(parts) for parts in zip(*chunks))
    np.testing.assert_array_equal(run.steps, steps)
    for m, metric in enumerate(LAYER_METRICS):
        np.testing.assert_array_equal(run.layer(metric), stats[:, m, :])
    for s, name in enumerate(SERIES):
        np.testing.assert_array_equal(run.series(name), series[:, s])


def head(chunk, k: int):
    """The first ``k`` rows of a chunk (its detector state unchanged)."""
    return tuple(x[:k] for x in chunk[:3]) + (chunk[3],)


def chunk_offsets(path: Path) -> list[int]:
    return [c.offset for c in load_run(path).chunks]


# ------------------------------------------------------------------ round trips


def test_round_trip_is_exact(tmp_path):
    chunks = [make_chunk(1, 7, seed=1), make_chunk(8, 5, seed=2), make_chunk(13, 1, seed=3)]
    write_chunks(tmp_path, chunks)
    run = load_run(tmp_path)
    assert_rows(run, chunks)
    assert run.layer("grad_norm").dtype == np.float32
    assert run.series("loss").dtype == np.float64
    assert run.layers == LAYERS and run.series_names == SERIES
    assert run.layer_metrics == list(LAYER_METRICS)
    assert run.meta["optimizer"] == META["optimizer"]
    assert run.skipped == [] and run.events == []
    np.testing.assert_array_equal(run.detector_state, chunks[-1][3])
    assert [(c.first_step, c.last_step, c.rows) for c in run.chunks] == [
        (1, 7, 7),
        (8, 12, 5),
        (13, 13, 1),
    ]


def test_other_dtypes_and_factor_helpers(tmp_path):
    steps, stats, series, state = make_chunk(1, 8)
    steps, stats, series = steps[::2].astype(np.int32), stats[::2], series[::2]  # strided input
    write_chunks(tmp_path, [(steps, stats, series.astype(np.float32), state)])
    np.testing.assert_array_equal(load_run(tmp_path).steps, steps)
    run = load_run(tmp_path)
    np.testing.assert_array_equal(run.series("loss"), series[:, 0].astype(np.float32))
    clippy = stats[:, LAYER_METRICS.index(FACTOR_METRICS["clippy"]), :]
    np.testing.assert_array_equal(run.factor("clippy"), clippy)
    np.testing.assert_array_equal(run.min_factor("clippy"), clippy.min(axis=1))
    with pytest.raises(KeyError, match="no series 'nope'"):
        run.series("nope")


def test_empty_record_and_empty_append(tmp_path):
    with RunWriter(tmp_path, META, tensorboard=False) as writer:
        steps, stats, series, state = make_chunk(1, 0)
        writer.append(steps, stats, series, state)
    run = load_run(tmp_path)
    assert len(run) == 0 and run.layer("grad_norm").shape == (0, 3)
    assert run.detector_state is None
    assert resume_point(tmp_path) == (None, None)


def test_append_rejects_bad_input(tmp_path):
    steps, stats, series, state = make_chunk(1, 4)
    with RunWriter(tmp_path, META, tensorboard=False) as writer:
        with pytest.raises(ValueError, match="strictly increasing"):
            writer.append(steps[::-1], stats, series, state)
        with pytest.raises(ValueError, match="layer_stats has shape"):
            writer.append(steps, stats[:, :, :2], series, state)
        with pytest.raises(ValueError, match="detector_state has shape"):
            writer.append(steps, stats, series, state[:2])
    with pytest.raises(ValueError, match="'series' must be a list of strings"):
        RunWriter(tmp_path / "other", {**META, "series": "loss"})


def test_resuming_a_record_of_another_detector_state_layout_says_so(tmp_path):
    steps, stats, series, state = make_chunk(1, 4)
    with RunWriter(tmp_path, META, tensorboard=False) as writer:
        writer.append(steps, stats, series, state)
    # One more state entry: the detector's onset look-back slot (out_run) since issue 17.
    with pytest.raises(ValueError, match="another detector state layout.*start a new logdir"):
        RunWriter(tmp_path, {**META, "detector_state_size": STATE_SIZE + 1}, tensorboard=False)
    assert resume_point(tmp_path)[0] == 4  # the record is untouched


def test_one_writer_at_a_time(tmp_path):
    code = (
        "import sys, json; from clippy_monitor.record import RunWriter\n"
        "try:\n    RunWriter(sys.argv[1], json.loads(sys.argv[2]), tensorboard=False)\n"
        "except RuntimeError as e:\n    print(e); sys.exit(3)\n"
    )
    with RunWriter(tmp_path, META, tensorboard=False):
        other = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path), json.dumps(META)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert other.returncode == 3 and "another RunWriter is appending" in other.stdout
    write_chunks(tmp_path, [make_chunk(1, 2)])  # free again once closed


def test_abandoned_writer_in_the_same_process_is_taken_over(tmp_path):
    # fit() that raises never reaches on_train_end: a retry must not find the record locked.
    abandoned = RunWriter(tmp_path, META, tensorboard=False)
    abandoned.append(*make_chunk(1, 3))
    with RunWriter(tmp_path, META, tensorboard=False) as writer:
        writer.append(*make_chunk(4, 2))
    with pytest.raises(ValueError, match="closed"):
        abandoned.append(*make_chunk(6, 2))
    assert load_run(tmp_path).steps.tolist() == [1, 2, 3, 4, 5]


def test_tail(tmp_path):
    chunks = [make_chunk(1, 5, seed=1), make_chunk(6, 5, seed=2)]
    write_chunks(tmp_path, chunks)
    with RunWriter(tmp_path, META, tensorboard=False) as writer:
        writer.add_events(
            [{"kind": "micro", "step_a": 2, "step_b": 3}, {"kind": "full", "step_a": 7}]
        )
    tail = load_run(tmp_path).tail(3)
    assert_rows(tail, [tuple(x[3:] for x in chunks[0]), chunks[1]])
    assert [e["kind"] for e in tail.events] == ["full"]
    assert len(tail.chunks) == 2
    assert len(load_run(tmp_path).tail(5).chunks) == 1


# ------------------------------------------------------------- resume / rewind


def test_resume_appends_to_the_same_record(tmp_path):
    first, second = make_chunk(1, 6, seed=1), make_chunk(7, 6, seed=2)
    write_chunks(tmp_path, [first])
    assert resume_point(tmp_path)[0] == 6
    np.testing.assert_array_equal(resume_point(tmp_path)[1], first[3])
    with RunWriter(tmp_path, {**META, "optimizer": "changed"}, tensorboard=False) as writer:
        assert writer.resumed and writer.last_step == 6
        writer.append(*second)
    run = load_run(tmp_path)
    assert_rows(run, [first, second])
    assert run.meta["optimizer"] == META["optimizer"]  # meta is written once
    step, state = resume_point(tmp_path)
    assert step == 12
    np.testing.assert_array_equal(state, second[3])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"layers": ["emb", "shared/dense"]},
            "'layers' has 3 entries in the record and 2 in this run",
        ),
        (
            {"series": ["loss", "loss/like", "detector/status"]},
            "first difference at index 1: 'loss/click'",
        ),
        ({"detector_state_size": 5}, "saved detector state has 4 entries but this run's has 5"),
    ],
)
def test_resume_with_different_shapes_fails(tmp_path, change, message):
    write_chunks(tmp_path, [make_chunk(1, 3)])
    with pytest.raises(ValueError, match=message) as info:
        RunWriter(tmp_path, {**META, **change})
    assert "\n" not in str(info.value)


def test_rewind_drops_superseded_rows(tmp_path):
    a, b, c = make_chunk(1, 10, seed=1), make_chunk(11, 10, seed=2), make_chunk(21, 10, seed=3)
    write_chunks(tmp_path, [a, b, c])
    rewound = make_chunk(16, 10, seed=4)  # restart from a checkpoint at step 15
    write_chunks(tmp_path, [rewound])
    run = load_run(tmp_path)
    assert_rows(run, [a, head(b, 5), rewound])
    assert [c.rows for c in run.chunks] == [10, 5, 10]
    # b was cut by the rewind, so its state (after step 20) no longer applies.
    np.testing.assert_array_equal(detector_state_at(tmp_path, 19), a[3])
    np.testing.assert_array_equal(detector_state_at(tmp_path, 25), rewound[3])
    assert detector_state_at(tmp_path, 9) is None
    assert resume_point(tmp_path)[0] == 25


def test_rewind_before_several_chunks(tmp_path):
    chunks = [make_chunk(1 + 10 * i, 10, seed=i) for i in range(4)]
    rewound = make_chunk(5, 3, seed=9)
    write_chunks(tmp_path, chunks + [rewound])
    run = load_run(tmp_path)
    assert_rows(run, [head(chunks[0], 4), rewound])
    assert len(run.chunks) == 2


def test_detector_state_at_chunk_boundaries(tmp_path):
    chunks = [make_chunk(1, 10, seed=1), make_chunk(11, 10, seed=2)]
    write_chunks(tmp_path, chunks)
    np.testing.assert_array_equal(detector_state_at(tmp_path, 10), chunks[0][3])
    np.testing.assert_array_equal(detector_state_at(tmp_path, 20), chunks[1][3])
    np.testing.assert_array_equal(detector_state_at(tmp_path, 10**9), chunks[1][3])
    assert detector_state_at(tmp_path / "nothing-here", 5) is None


# ------------------------------------------------------------- damaged records


@pytest.mark.parametrize("cut", [1, 7, 100, HEADER_SIZE + 1, "header+3"])
def test_torn_tail_keeps_earlier_chunks(tmp_path, cut):
    chunks = [make_chunk(1 + 5 * i, 5, seed=i) for i in range(3)]
    write_chunks(tmp_path, chunks[:2])
    last = (tmp_path / RECORD_FILE).stat().st_size
    blob = chunk_bytes(tmp_path / "scratch", chunks[2])
    append_torn(tmp_path, blob[:3] if cut == "header+3" else blob[:-cut])
    run = load_run(tmp_path)
    assert_rows(run, chunks[:2])
    assert len(run.skipped) == 1
    assert f"offset {last}" in run.skipped[0] and "torn tail" in run.skipped[0]


def test_corrupt_payload_byte_skips_only_that_chunk(tmp_path):
    chunks = [make_chunk(1 + 5 * i, 5, seed=i) for i in range(3)]
    write_chunks(tmp_path, chunks)
    middle = chunk_offsets(tmp_path)[1]
    flip_byte(tmp_path / RECORD_FILE, middle + HEADER_SIZE + 50)
    run = load_run(tmp_path)
    assert_rows(run, [chunks[0], chunks[2]])
    assert len(run.skipped) == 1 and "payload CRC mismatch" in run.skipped[0]


def test_corrupt_header_byte_resyncs_on_next_chunk(tmp_path):
    chunks = [make_chunk(1 + 5 * i, 5, seed=i) for i in range(3)]
    write_chunks(tmp_path, chunks)
    middle = chunk_offsets(tmp_path)[1]
    flip_byte(tmp_path / RECORD_FILE, middle + 20)
    run = load_run(tmp_path)
    assert_rows(run, [chunks[0], chunks[2]])
    assert len(run.skipped) == 1 and "no valid chunk header" in run.skipped[0]


def test_resume_after_torn_tail(tmp_path):
    chunks = [make_chunk(1 + 5 * i, 5, seed=i) for i in range(3)]
    write_chunks(tmp_path, chunks[:2])
    append_torn(tmp_path, chunk_bytes(tmp_path / "scratch", chunks[2])[:-40])
    assert resume_point(tmp_path)[0] == 10
    more = make_chunk(11, 5, seed=7)
    write_chunks(tmp_path, [more])  # appended after the torn bytes
    run = load_run(tmp_path)
    assert_rows(run, chunks[:2] + [more])
    assert (
        len(run.skipped) == 1
        and "chunk (steps 11..15) is torn or corrupt (payload CRC mismatch); 808 bytes skipped"
        in run.skipped[0]
    )


def append_torn(logdir: Path, blob: bytes) -> None:
    """Append the part of a chunk that a writer killed mid-write left (never counted as flushed)."""
    with open(logdir / RECORD_FILE, "ab") as f:
        f.write(blob)


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0xFF]))


# Deterministic chunks of the crash tests, defined once for the child and the test.
CHILD_CHUNKS = textwrap.dedent("""
    import numpy as np

    CHUNK_STEPS, CHILD_LAYERS = 400, 64

    def child_chunk(i):
        rng = np.random.default_rng(i)
        steps = np.arange(i * CHUNK_STEPS + 1, (i + 1) * CHUNK_STEPS + 1)
        return (steps, rng.random((CHUNK_STEPS, 10, CHILD_LAYERS), dtype=np.float32),
                rng.random((CHUNK_STEPS, 3)), rng.random(4, dtype=np.float32))
    """)
# The child appends chunks forever, acknowledging each on stdout.  It stubs the
# top-level package so the record modules load without TensorFlow
# (clippy_monitor/__init__.py imports the optimizers), keeping startup fast.
# argv: logdir, package dir, optional file size limit (bytes).
CHILD = CHILD_CHUNKS + textwrap.dedent("""
    import resource, sys, types
    package = types.ModuleType("clippy_monitor")
    package.__path__ = [sys.argv[2]]
    sys.modules["clippy_monitor"] = package
    from clippy_monitor.record import RunWriter

    if len(sys.argv) > 3:  # writes past this size fail part-way, like a crash
        limit = int(sys.argv[3])
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    meta = {"layers": [f"l{j}" for j in range(CHILD_LAYERS)], "series": ["a", "b", "c"],
            "detector_state_size": 4}
    writer = RunWriter(sys.argv[1], meta)
    for i in range(10**6):
        writer.append(*child_chunk(i))
        writer.add_events([{"kind": "tick", "step_a": i}])
        print(i, flush=True)
    """)


def start_child(logdir: Path, *args: str) -> subprocess.Popen:
    package_dir = str(Path(clippy_monitor.__file__).parent)
    command = [sys.executable, "-c", CHILD, str(logdir), package_dir, *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def assert_child_chunks(run, n_chunks: int) -> None:
    namespace: dict = {}
    exec(CHILD_CHUNKS, namespace)
    assert len(run.chunks) == n_chunks
    expected = [namespace["child_chunk"](i) for i in range(n_chunks)]
    steps = [c[0] for c in expected]
    np.testing.assert_array_equal(run.steps, np.concatenate(steps) if steps else [])
    for i, (_, stats, series, _state) in enumerate(expected):
        rows = slice(i * 400, (i + 1) * 400)
        np.testing.assert_array_equal(run.layer("grad_norm")[rows], stats[:, 0, :])
        np.testing.assert_array_equal(run.layer("zero_grad_fraction")[rows], stats[:, 9, :])
        np.testing.assert_array_equal(run.series("c")[rows], series[:, 2])
    if n_chunks:
        np.testing.assert_array_equal(run.detector_state, expected[-1][3])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_9_leaves_a_readable_record(tmp_path, seed):
    rand = random.Random(seed)
    child = start_child(tmp_path)
    try:
        for _ in range(rand.randint(1, 4)):
            acked = int(child.stdout.readline())
        time.sleep(rand.uniform(0.0, 0.02))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    run = load_run(tmp_path)
    assert len(run.chunks) >= acked + 1
    assert_child_chunks(run, len(run.chunks))
    assert len(run.skipped) <= 2 and all("torn" in note for note in run.skipped)
    assert [e["step_a"] for e in run.events] == list(range(len(run.events)))
    assert len(run.events) >= acked + 1


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_death_at_a_random_byte_keeps_complete_chunks(tmp_path, seed):
    """The child's record file cannot grow past a random size: its last write stops mid-chunk."""
    chunk_size = HEADER_SIZE + PayloadLayout(400, 10, 64, 3, 4).size
    limit = random.Random(seed).randint(chunk_size, 4 * chunk_size)
    child = start_child(tmp_path, str(limit))
    child.communicate(timeout=60)
    assert child.returncode != 0
    assert (tmp_path / RECORD_FILE).stat().st_size == limit
    run = load_run(tmp_path)
    complete = limit // chunk_size
    assert_child_chunks(run, complete)
    if limit % chunk_size:
        assert len(run.skipped) == 1
        assert f"offset {complete * chunk_size}" in run.skipped[0] and "torn tail" in run.skipped[0]
    assert resume_point(tmp_path)[0] == complete * 400


# ------------------------------------------------------------------------ events


def test_events_round_trip_and_torn_last_line(tmp_path):
    events = [
        {
            "kind": "micro",
            "step_a": np.int64(10),
            "step_b": 12,
            "step_c": None,
            "recovered": 13,
            "task": "click",
            "reason": "loss ratio 4.1 > 3",
        },
        {
            "kind": "full",
            "step_a": 40,
            "step_b": 41,
            "step_c": 45,
            "recovered": None,
            "task": None,
            "reason": "nonfinite",
        },
    ]
    with RunWriter(tmp_path, META, tensorboard=False) as writer:
        writer.add_events(events)
    with open(tmp_path / EVENTS_FILE, "ab") as f:
        f.write(b'{"kind": "micro", "step_a": 5')  # killed mid-write
    run = load_run(tmp_path)
    assert run.events == [{**events[0], "step_a": 10}, events[1]]
    assert len(run.skipped) == 1 and "torn last line" in run.skipped[0]

    with RunWriter(tmp_path, META, tensorboard=False) as writer:  # resume after the torn line
        writer.add_events([{"kind": "micro", "step_a": 50}])
    run = load_run(tmp_path)
    assert [e["step_a"] for e in run.events] == [10, 40, 50]
    assert len(run.skipped) == 1 and "unreadable line" in run.skipped[0]


# ------------------------------------------------------------------ RecordError


def test_record_errors_are_one_clear_line(tmp_path):
    cases = {
        tmp_path / "missing": "no such file or directory",
        tmp_path / "empty": "holds no clippy record",
        tmp_path / "bad_json": "unreadable clippy meta",
        tmp_path / "bad_meta": "corrupt clippy meta ('layers' must be a list of strings)",
    }
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad_json").mkdir()
    (tmp_path / "bad_json" / META_FILE).write_text('{"layers": [')
    (tmp_path / "bad_meta").mkdir()
    (tmp_path / "bad_meta" / META_FILE).write_text(json.dumps({**META, "layers": None}))
    for path, message in cases.items():
        with pytest.raises(
            RecordError, match=message.replace("(", r"\(").replace(")", r"\)")
        ) as info:
            load_run(path)
        assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_parent_directory_with_one_or_several_runs(tmp_path):
    write_chunks(tmp_path / "exp" / "run1", [make_chunk(1, 3)])
    assert load_run(tmp_path / "exp").path == tmp_path / "exp" / "run1"
    write_chunks(tmp_path / "exp" / "run2", [make_chunk(1, 3)])
    with pytest.raises(RecordError, match="holds 2 clippy records"):
        load_run(tmp_path / "exp")


def test_find_runs(tmp_path):
    for name in ["b", "a", "a/nested"]:
        write_chunks(tmp_path / name, [make_chunk(1, 2)])
    (tmp_path / "not_a_run").mkdir()
    assert find_runs(tmp_path) == [tmp_path / "a", tmp_path / "a" / "nested", tmp_path / "b"]
    assert find_runs(tmp_path / "a" / "nested") == [tmp_path / "a" / "nested"]
    with pytest.raises(RecordError):
        find_runs(tmp_path / "missing")


def test_optimizer_name_of_the_meta():
    """One display name for the TensorBoard tab and the Dash app (meta from serialize_keras_object)."""
    keras_meta = {
        "module": "keras.optimizers",
        "class_name": "Adagrad",
        "config": {"name": "adagrad", "learning_rate": 0.1},
    }
    assert optimizer_name(keras_meta) == "Adagrad"  # Keras' default name adds nothing
    assert (
        optimizer_name({"class_name": "ClippyAdagrad", "config": {"name": "ClippyAdagrad"}})
        == "ClippyAdagrad"
    )
    assert optimizer_name({"class_name": "SGD", "config": {"name": "my_sgd"}}) == "SGD (my_sgd)"
    assert (
        optimizer_name(
            {"class_name": "LossScaleOptimizer", "config": {"name": "loss_scale_optimizer"}}
        )
        == "LossScaleOptimizer"
    )
    assert optimizer_name(META["optimizer"]) == "ClippyAdagrad"  # no class_name: its name
    assert optimizer_name({"config": {"name": "adam"}}) == "adam"
    assert optimizer_name("adam") == "adam"
    for nothing in (None, "", {}, {"config": None}):
        assert optimizer_name(nothing) is None


# ------------------------------------------------------------------ TensorBoard


def read_scalars(logdir: Path) -> dict[str, list]:
    accumulator = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: accumulator.Scalars(tag) for tag in accumulator.Tags()["scalars"]}


def test_tensorboard_scalars(tmp_path):
    chunks = [make_chunk(1, 6, seed=1), make_chunk(7, 4, seed=2)]
    chunks[1][1][2, LAYER_METRICS.index("gc_factor"), 0] = np.nan  # NaN layers are ignored
    write_chunks(tmp_path, chunks, tensorboard=True)
    scalars = read_scalars(tmp_path)
    steps, stats, series, _ = (np.concatenate(parts) for parts in zip(*chunks))
    expected = {f"clippy_monitor/{name}": series[:, i] for i, name in enumerate(SERIES)}
    for rule, metric in FACTOR_METRICS.items():
        expected[f"clippy_monitor/min_factor/{rule}"] = np.nanmin(
            stats[:, LAYER_METRICS.index(metric)], axis=1
        )
    expected["clippy_monitor/nonfinite_count"] = stats[
        :, LAYER_METRICS.index("nonfinite_count")
    ].sum(axis=1)
    assert sorted(scalars) == sorted(expected)
    for tag, values in expected.items():
        assert [e.step for e in scalars[tag]] == steps.tolist()
        np.testing.assert_array_equal([e.value for e in scalars[tag]], values.astype(np.float32))
    wall_times = [e.wall_time for e in scalars["clippy_monitor/loss"]]
    assert wall_times == sorted(wall_times)


def test_tensorboard_discards_rewound_points(tmp_path):
    write_chunks(tmp_path, [make_chunk(1, 10, seed=1)], tensorboard=True)
    rewound = make_chunk(6, 3, seed=2)
    write_chunks(tmp_path, [rewound], tensorboard=True)
    loss = read_scalars(tmp_path)["clippy_monitor/loss"]
    assert [e.step for e in loss] == [1, 2, 3, 4, 5, 6, 7, 8]
    np.testing.assert_array_equal([e.value for e in loss[5:]], rewound[2][:, 0].astype(np.float32))


def test_vectorised_crc_matches_tensorboard():
    rng = np.random.default_rng(0)
    records = [rng.bytes(int(n)) for n in rng.integers(0, 300, 50)] + [b"abc"] * 3
    expected = [masked_crc32c(r) for r in records]
    assert _masked_crc32c_batch(records).tolist() == expected


# ---------------------------------------------------------------------- follower


def test_follower_returns_only_new_data(tmp_path):
    first = [make_chunk(1, 5, seed=1), make_chunk(6, 5, seed=2)]
    write_chunks(tmp_path, first)
    follower = RunFollower(tmp_path)
    held = Accumulated()
    delta = held.apply(follower.poll())
    np.testing.assert_array_equal(delta.steps, np.arange(1, 11))
    np.testing.assert_array_equal(
        delta.layer("grad_norm"), np.concatenate([c[1][:, 0] for c in first])
    )
    assert follower.poll().empty

    # A chunk still being written is not returned until it is complete.
    nxt = make_chunk(11, 5, seed=3)
    blob = chunk_bytes(tmp_path / "scratch", nxt)
    record = tmp_path / RECORD_FILE
    with open(record, "ab") as f:
        f.write(blob[:100])
        f.flush()
        assert follower.poll().empty
        f.write(blob[100:])
    with RunWriter(tmp_path, META, tensorboard=False) as writer:
        writer.add_events([{"kind": "micro", "step_a": 12}])
    delta = held.apply(follower.poll())
    np.testing.assert_array_equal(delta.steps, nxt[0])
    np.testing.assert_array_equal(delta.series("loss"), nxt[2][:, 0])
    assert delta.events == [{"kind": "micro", "step_a": 12}] and delta.rewind_from is None

    with open(tmp_path / EVENTS_FILE, "ab") as f:
        f.write(b'{"kind": "full", ')
        f.flush()
        assert follower.poll().events == []
        f.write(b'"step_a": 13}\n')
    assert follower.poll().events == [{"kind": "full", "step_a": 13}]

    # Rewinds: two chunks in one poll, the second rewinding into the first.
    write_chunks(tmp_path, [make_chunk(8, 6, seed=4), make_chunk(12, 4, seed=5)])
    delta = held.apply(follower.poll())
    assert delta.rewind_from == 8
    np.testing.assert_array_equal(delta.steps, np.arange(8, 16))
    assert follower.last_step == 15
    np.testing.assert_array_equal(held.steps, load_run(tmp_path).steps)


def test_follower_skips_torn_bytes_once_the_writer_resumes(tmp_path):
    write_chunks(tmp_path, [make_chunk(1, 5, seed=1)])
    follower = RunFollower(tmp_path)
    follower.poll()
    blob = chunk_bytes(tmp_path / "scratch", make_chunk(6, 5, seed=2))
    with open(tmp_path / RECORD_FILE, "ab") as f:
        f.write(blob[:-30])  # the writer is killed mid-chunk
    assert follower.poll().empty
    write_chunks(tmp_path, [make_chunk(6, 5, seed=3)])  # a new writer resumes from step 5
    delta = follower.poll()
    np.testing.assert_array_equal(delta.steps, np.arange(6, 11))
    assert len(delta.skipped) == 1 and "payload CRC mismatch" in delta.skipped[0]


def test_follower_deltas_reproduce_load_run(tmp_path):
    """Deltas polled after every append (over several pages, with rewinds) add up to load_run."""
    follower, held = None, Accumulated()
    firsts = [1, 6, 11, 16, 21, 26, 13, 18, 23, 28, 33]
    with RunWriter(tmp_path, META, tensorboard=False) as writer:
        for i, first in enumerate(firsts):
            writer.append(*make_chunk(first, 5 * (1 + i % 3), seed=i))
            follower = follower or RunFollower(tmp_path)
            held.apply(follower.poll())
    run = load_run(tmp_path)
    assert (tmp_path / RECORD_FILE).stat().st_size > 3 * 4096
    np.testing.assert_array_equal(held.steps, run.steps)
    np.testing.assert_array_equal(held.grad_norm, run.layer("grad_norm"))


class Accumulated:
    """What a dashboard holds: the steps and grad norms of all deltas applied so far."""

    def __init__(self) -> None:
        self.steps = np.empty(0, np.int64)
        self.grad_norm = np.empty((0, len(LAYERS)), np.float32)

    def apply(self, delta):
        if delta.rewind_from is not None:
            keep = self.steps < delta.rewind_from
            self.steps, self.grad_norm = self.steps[keep], self.grad_norm[keep]
        self.steps = np.concatenate([self.steps, delta.steps])
        self.grad_norm = np.concatenate([self.grad_norm, delta.layer("grad_norm")])
        return delta


def chunk_bytes(scratch: Path, chunk) -> bytes:
    """The bytes RunWriter writes for ``chunk``."""
    write_chunks(scratch, [chunk])
    return (scratch / RECORD_FILE).read_bytes()


# -------------------------------------------------------------------- live record


def test_live_record_follows_appends_rewinds_and_replaced_records(tmp_path):
    path = tmp_path / "run"
    live = LiveRecord(path, name="r")
    grad_min = ("grad_min", lambda run: (np.min(run.layer("grad_norm"), axis=1),))
    first = make_chunk(1, 5, seed=1)
    with RunWriter(path, META, tensorboard=False) as writer:
        writer.append(*first)
        assert live.refresh() and live.last_delta_rows == 5
        version = live.version
        assert not live.refresh() and live.last_delta_rows == 0 and live.version == version
        assert_live_matches(live, [first], grad_min)

        writer.append(*make_chunk(6, 5, seed=2))
        writer.add_events([{"kind": "micro", "step_a": 7}])
        assert live.refresh() and live.last_delta_rows == 5 and live.version > version
        assert live.events == [{"kind": "micro", "step_a": 7}]
        writer.append(*make_chunk(4, 3, seed=3))  # training rewound to step 4
        live.refresh()
        chunks = [tuple(a[:3] for a in first[:3]), make_chunk(4, 3, seed=3)]  # rows 1..3 kept
        assert_live_matches(live, chunks, grad_min)
        assert live.row_at(5) == 4 and live.row_range(2, 4) == (1, 4)
        assert live.loss_series == ["loss", "loss/click"] and live.reloads == 0

        live._MAX_SEGMENTS = 2  # past 2 chunk maps, the record is read afresh into one
        for start in (7, 9, 11):
            writer.append(*make_chunk(start, 2, seed=start))
            live.refresh()
            assert len(live._segments) <= 2
        chunks += [make_chunk(start, 2, seed=start) for start in (7, 9, 11)]
        assert_live_matches(live, chunks, grad_min)
        assert live.reloads == 0 and live.cached(("n",), lambda: len(live)) == 12

    with pytest.raises(KeyError, match="run 'r' has no series 'nope'"):
        live.series("nope")
    with pytest.raises(KeyError, match="run 'r' has no layer metric 'nope'"):
        live.layer_rows("nope", 0, 1)

    record = path / RECORD_FILE  # rewritten shorter in place: read again from the start
    record.write_bytes(record.read_bytes()[: record.stat().st_size // 2])
    assert live.refresh() and live.reloads == 1
    np.testing.assert_array_equal(live.steps, load_run(path).steps)

    for name in (META_FILE, RECORD_FILE, EVENTS_FILE):  # a new record in the same place
        (path / name).unlink()
    write_chunks(path, [make_chunk(1, 4, seed=9)])
    assert live.refresh() and live.reloads == 2 and live.events == []
    assert_live_matches(live, [make_chunk(1, 4, seed=9)], grad_min)

    (path / META_FILE).unlink()
    with pytest.raises(RecordError, match="is gone"):
        live.refresh()


def assert_live_matches(live: LiveRecord, chunks, per_row) -> None:
    """``live`` holds exactly the rows of ``chunks``, through every way of reading it."""
    steps, stats, series = (np.concatenate(parts) for parts in list(zip(*chunks))[:3])
    np.testing.assert_array_equal(live.steps, steps)
    for s, name in enumerate(SERIES):
        np.testing.assert_array_equal(live.series(name), series[:, s])
    for m, metric in enumerate(LAYER_METRICS):
        np.testing.assert_array_equal(live.layer(metric), stats[:, m])
        np.testing.assert_array_equal(live.layer_rows(metric, 1, len(steps) - 1), stats[1:-1, m])
    (grad_min,) = live.per_row(*per_row)
    np.testing.assert_array_equal(grad_min, stats[:, 0].min(axis=1))
    assert not grad_min.flags.writeable
    # Layer data stay in the chunks' memory maps: no segment keeps an array assembled from them.
    assert not any(run._cache for run, _ in live._segments)


def test_tensorboard_files_sort_in_the_order_they_were_made(tmp_path, monkeypatch):
    """Ten writers within one second: TensorBoard reads files in name order, so the
    tenth must sort after the ninth (a rewound run relies on it)."""
    import itertools

    import clippy_monitor.record.tfevents as writer_module

    monkeypatch.setattr(writer_module.time, "time", lambda: 1_800_000_000.0)
    monkeypatch.setattr(writer_module, "_FILE_IDS", itertools.count(5))  # 5..15: crosses 9 -> 10
    for i in range(11):
        write_chunks(tmp_path / "run", [make_chunk(1 + i, 1, seed=i)], tensorboard=True)
    files = sorted(p.name for p in (tmp_path / "run").glob("events.out.tfevents.*"))
    assert len(files) == 11
    ids = [int(name.split(".")[-2]) for name in files]
    assert ids == sorted(ids)
