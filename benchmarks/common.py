"""Shared pieces of the benchmarks: the two reference models and an interleaved timer.

Variants are timed side by side in one process, interleaved round by round so
that machine noise hits all of them alike; we report medians and ratios of
both wall time and process CPU time.  On the shared, CPU-quota'd dev machines
wall time is quantised by throttling (steps of ~4 ms show up), so CPU time --
what the variant actually costs -- is the steadier of the two.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def recommender_model(
    vocab: int = 10_000, features: int = 8, dim: int = 32, width: int = 1024, depth: int = 4
) -> keras.Model:
    """Embeddings for ``features`` categorical ids plus a ``depth`` x ``width`` ReLU tower."""
    ids = keras.Input((features,), dtype="int32", name="ids")
    dense = keras.Input((16,), name="dense")
    x = keras.layers.Flatten()(keras.layers.Embedding(vocab, dim, name="embedding")(ids))
    x = keras.layers.Concatenate()([x, dense])
    for i in range(depth):
        x = keras.layers.Dense(width, activation="relu", name=f"tower_{i}")(x)
    out = keras.layers.Dense(1, activation="sigmoid", name="click")(x)
    return keras.Model([ids, dense], out)


def small_model(width: int = 128, depth: int = 2, inputs: int = 64) -> keras.Model:
    """A small MLP where per-step fixed costs dominate (128 wide)."""
    x_in = keras.Input((inputs,))
    x = x_in
    for i in range(depth):
        x = keras.layers.Dense(width, activation="relu", name=f"hidden_{i}")(x)
    return keras.Model(x_in, keras.layers.Dense(1, activation="sigmoid", name="click")(x))


def recommender_data(
    batch: int, steps: int, vocab: int = 10_000, features: int = 8, seed: int = 0
) -> tf.data.Dataset:
    rng = np.random.default_rng(seed)
    n = batch * steps
    ids = rng.integers(0, vocab, size=(n, features), dtype=np.int32)
    dense = rng.normal(size=(n, 16)).astype("float32")
    y = (rng.random((n, 1)) < 0.3).astype("float32")
    return tf.data.Dataset.from_tensor_slices(((ids, dense), y)).batch(batch).cache().repeat()


def small_data(batch: int, steps: int, inputs: int = 64, seed: int = 0) -> tf.data.Dataset:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch * steps, inputs)).astype("float32")
    y = (x[:, :1] > 0).astype("float32")
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch).cache().repeat()


Timing = tuple[float, float]  # (wall seconds per step, CPU seconds per step)


def interleaved_medians(
    runs: dict[str, Callable[[], Timing]], rounds: int
) -> dict[str, list[Timing]]:
    """Call every variant once per round (after one warm-up call each); return all timings.

    Each round starts one variant later than the last, so that no variant always
    runs first (right after a pause) or right after the same neighbour.
    """
    for fn in runs.values():
        fn()
    names = list(runs)
    times: dict[str, list[Timing]] = {name: [] for name in runs}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(runs[name]())
    return times


def timed_fit(
    model: keras.Model, data: tf.data.Dataset, steps: int, callbacks: list | None = None
) -> Callable[[], Timing]:
    """A callable returning (wall, CPU) seconds per step of ``model.fit`` over ``steps`` steps."""

    def run() -> Timing:
        wall, cpu = time.perf_counter(), time.process_time()
        model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0, callbacks=callbacks or [])
        return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps

    return run


def ratios(times: dict[str, list[Timing]], baseline: str) -> dict[str, Timing]:
    """Per variant, (wall, CPU) ratio to ``baseline``: the median over rounds of the
    round's ratio.  The variants of one round ran back to back, so pairing them
    cancels the machine's slow drift."""
    return {
        name: tuple(
            statistics.median(t[i] / b[i] for t, b in zip(times[name], times[baseline]))
            for i in (0, 1)
        )
        for name in times
    }


def report(times: dict[str, list[Timing]], baseline: str) -> str:
    """Markdown table of median wall and CPU ms/step, and the ratios to ``baseline`` (``ratios``)."""

    def med(name: str, i: int) -> float:
        return statistics.median(t[i] for t in times[name])

    paired = ratios(times, baseline)
    lines = [
        "| variant | wall ms/step | wall ratio | CPU ms/step | CPU ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in times:
        lines.append(
            f"| {name} | {med(name, 0) * 1e3:.2f} | {paired[name][0]:.3f}x "
            f"| {med(name, 1) * 1e3:.2f} | {paired[name][1]:.3f}x |"
        )
    return "\n".join(lines)


def in_fresh_processes(
    module: str, argv: list[str], processes: int
) -> list[dict[str, dict[str, Timing]]]:
    """Run ``python -m module *argv --ratios-json PATH`` in ``processes`` fresh processes, one
    after another; return what each wrote: ``{table heading: {variant: (wall, CPU) ratio}}``.

    On these machines the same variant moves by 5-10% between processes, more than
    between the rounds of one process, so a figure worth quoting is a median over processes.
    """
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(processes):
            path = os.path.join(tmp, f"{i}.json")
            subprocess.run([sys.executable, "-m", module, *argv, "--ratios-json", path], check=True)
            with open(path) as f:
                results.append(json.load(f))
    return results


def report_across_processes(results: list[dict[str, dict[str, Timing]]]) -> str:
    """Markdown tables, one per heading: each process's CPU ratio, and the medians over processes."""
    out = []
    for heading in results[0]:
        per_process = [r[heading] for r in results]
        out += [
            f"\n### {heading}, {len(results)} processes",
            "",
            "| variant | CPU ratio, each process | median CPU ratio | median wall ratio |",
            "|---|---|---:|---:|",
        ]
        for name in per_process[0]:
            cpu = [r[name][1] for r in per_process]
            wall = statistics.median(r[name][0] for r in per_process)
            out.append(
                f"| {name} | {', '.join(f'{c:.3f}' for c in cpu)} | **{statistics.median(cpu):.3f}x** | {wall:.3f}x |"
            )
    return "\n".join(out)
