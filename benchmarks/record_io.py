"""Benchmark the run record: append (with TensorBoard scalars), load_run, follower polls.

    python benchmarks/record_io.py                 # 100k steps x 32 layers
    python benchmarks/record_io.py --huge          # also 1M steps x 32 layers (~1.3 GB on disk)
    python benchmarks/record_io.py --dir /some/disk --repeats 5

Timings are medians over ``--repeats`` runs with the record in the page cache
(it was just written).  Memory is the process's resident anonymous memory
(RssAnon); the memory-mapped record file shows up separately as RssFile.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

# Import the record package without clippy_monitor/__init__.py, which imports
# TensorFlow (seconds of startup that have nothing to do with the record).
if "clippy_monitor" not in sys.modules:
    _package = types.ModuleType("clippy_monitor")
    _package.__path__ = [str(Path(__file__).resolve().parents[1] / "clippy_monitor")]
    sys.modules["clippy_monitor"] = _package

from clippy_monitor.record import LAYER_METRICS, RunFollower, RunWriter, load_run  # noqa: E402
from clippy_monitor.record.writer import resume_point  # noqa: E402

SERIES = [
    "loss",
    "loss/click",
    "loss/like",
    "learning_rate",
    "detector/status",
    "detector/since_onset",
    "detector/task",
]
STATE_SIZE = 16


def meta(n_layers: int) -> dict:
    return {
        "layers": [f"layer_{i}" for i in range(n_layers)],
        "layer_metrics": list(LAYER_METRICS),
        "series": SERIES,
        "tasks": ["click", "like"],
        "thresholds": {"loss_ratio": 3.0},
        "detector_state_size": STATE_SIZE,
    }


def chunks(n_steps: int, chunk: int, n_layers: int, n_distinct: int = 4):
    """Chunks covering steps 1..n_steps; payloads cycle through a few random ones."""
    rng = np.random.default_rng(0)
    payloads = [
        (
            rng.random((chunk, len(LAYER_METRICS), n_layers), dtype=np.float32),
            rng.random((chunk, len(SERIES))),
            rng.random(STATE_SIZE, dtype=np.float32),
        )
        for _ in range(n_distinct)
    ]
    for i, first in enumerate(range(1, n_steps + 1, chunk)):
        stats, series, state = payloads[i % n_distinct]
        yield (np.arange(first, first + chunk, dtype=np.int64), stats, series, state)


def write_record(
    logdir: Path, n_steps: int, chunk: int, n_layers: int, *, tensorboard: bool
) -> list[float]:
    """Write a record; returns the seconds each append took."""
    times = []
    with RunWriter(logdir, meta(n_layers), tensorboard=tensorboard) as writer:
        for args in chunks(n_steps, chunk, n_layers):
            start = time.perf_counter()
            writer.append(*args)
            times.append(time.perf_counter() - start)
    return times


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rss_mib() -> dict[str, float]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def load_all_metrics(logdir: Path) -> None:
    run = load_run(logdir)
    for metric in run.layer_metrics:
        run.layer(metric)


def report(name: str, seconds: float, note: str = "") -> None:
    print(f"  {name:<44} {seconds * 1e3:10.1f} ms  {note}")


def bench_size(
    root: Path, n_steps: int, n_layers: int, chunk: int, repeats: int, tensorboard: bool
) -> None:
    logdir = root / f"run_{n_steps}x{n_layers}"
    print(
        f"{n_steps:,} steps x {n_layers} layers, chunks of {chunk}, "
        f"TensorBoard {'on' if tensorboard else 'off'}:"
    )
    start = time.perf_counter()
    appends = write_record(logdir, n_steps, chunk, n_layers, tensorboard=tensorboard)
    size = (logdir / "clippy_record.bin").stat().st_size
    print(f"  wrote {size / 2**20:,.0f} MiB in {time.perf_counter() - start:.1f} s")
    report(
        "append (median of all chunks)",
        statistics.median(appends),
        f"max {max(appends) * 1e3:.1f} ms",
    )
    report("load_run (steps, series, events)", median_time(lambda: load_run(logdir), repeats))
    report(
        "load_run + layer('grad_norm')",
        median_time(lambda: load_run(logdir).layer("grad_norm"), repeats),
    )
    report(
        "load_run + all 10 layer metrics", median_time(lambda: load_all_metrics(logdir), repeats)
    )
    report("resume_point", median_time(lambda: resume_point(logdir), repeats))

    before = rss_mib()
    run = load_run(logdir)
    after_load = rss_mib()
    for metric in run.layer_metrics:
        run.layer(metric)
    after_all = rss_mib()
    print(
        f"  memory: +{after_load['RssAnon'] - before['RssAnon']:,.0f} MiB anon after load_run, "
        f"+{after_all['RssAnon'] - before['RssAnon']:,.0f} MiB anon with all metrics "
        f"(mapped file {after_all['RssFile']:,.0f} MiB, peak RSS {after_all['VmHWM']:,.0f} MiB)"
    )
    del run


def bench_follower(root: Path, n_layers: int, chunk: int, repeats: int) -> None:
    logdir = root / "follow"
    print(f"RunFollower on a live {100 * chunk:,}-step record:")
    write_record(logdir, 100 * chunk, chunk, n_layers, tensorboard=False)
    follower = RunFollower(logdir)
    report("first poll (whole record)", median_time(lambda: RunFollower(logdir).poll(), repeats))
    follower.poll()
    report("poll with nothing new", median_time(follower.poll, repeats))
    times = []
    with RunWriter(logdir, meta(n_layers), tensorboard=False) as writer:
        for args in chunks(repeats * chunk, chunk, n_layers):
            writer.append(args[0] + 100 * chunk, *args[1:])
            start = time.perf_counter()
            follower.poll().layer("grad_norm")
            times.append(time.perf_counter() - start)
    report("poll of one new chunk + layer()", statistics.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--huge", action="store_true", help="also 1,000,000 steps (TensorBoard off)"
    )
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to write (default: a temp dir)"
    )
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="clippy_record_bench_", dir=args.dir))
    try:
        bench_size(root, args.steps, args.layers, args.chunk, args.repeats, tensorboard=True)
        bench_follower(root, args.layers, args.chunk, args.repeats)
        if args.huge:
            shutil.rmtree(root / f"run_{args.steps}x{args.layers}", ignore_errors=True)
            bench_size(root, 1_000_000, args.layers, args.chunk, args.repeats, tensorboard=False)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
