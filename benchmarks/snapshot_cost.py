"""Cost of one recovery snapshot (take and restore), in host memory and in a directory.

The ladder (``on_divergence="recover"``) copies the model's and the optimizer's
variables every ``snapshot_every`` steps; this times one copy and one restore
for the small MLP and the recommender model (embedding table of ``--vocab`` rows,
Adagrad accumulators included), side by side in one process, and the cost per
step at ``snapshot_every`` = 100 and 1000 against the measured step time.

    python -m benchmarks.snapshot_cost [--vocab 1000000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import keras

from benchmarks.common import recommender_data, recommender_model, small_data, small_model
from clippy_monitor.monitor.recovery import RecoveryConfig
from clippy_monitor.monitor.rollback import SnapshotStore


def _compiled(make_model, data) -> tuple[keras.Model, float]:
    """A model trained a few steps (optimizer built) and its median step time in ms."""
    model = make_model()
    model.compile(optimizer=keras.optimizers.Adagrad(0.01), loss="binary_crossentropy")
    model.fit(data, steps_per_epoch=5, verbose=0)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        model.fit(data, steps_per_epoch=20, verbose=0)
        times.append((time.perf_counter() - start) / 20 * 1e3)
    return model, statistics.median(times)


def _time_snapshot(model: keras.Model, directory: str | None, rounds: int) -> tuple[float, float]:
    """Median ms of one take and of one restore."""
    store = SnapshotStore(RecoveryConfig(snapshot_dir=directory, keep_snapshots=1))
    variables = model.variables + model.optimizer.variables
    takes, restores = [], []
    for step in range(rounds):
        start = time.perf_counter()
        store.take(step, variables, None)
        takes.append((time.perf_counter() - start) * 1e3)
        start = time.perf_counter()
        for variable, value in zip(variables, store.snapshots[-1].load()):
            variable.assign(value)
        restores.append((time.perf_counter() - start) * 1e3)
        store.confirm(step)
    store.clear()
    return statistics.median(takes), statistics.median(restores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    models = {
        "small": (small_model, small_data(256, 64)),
        f"recommender (vocab {args.vocab})": (
            lambda: recommender_model(vocab=args.vocab),
            recommender_data(256, 8, vocab=args.vocab),
        ),
    }
    print("| model | state MB | step ms | where | take ms | restore ms | per step at 100 / 1000 |")
    print("|---|---|---|---|---|---|---|")
    for name, (make_model, data) in models.items():
        model, step_ms = _compiled(make_model, data)
        megabytes = sum(v.numpy().nbytes for v in model.variables + model.optimizer.variables) / 1e6
        with tempfile.TemporaryDirectory() as tmp:
            for where, directory in (("memory", None), ("directory", tmp)):
                take, restore = _time_snapshot(model, directory, args.rounds)
                share = f"{take / 100 / step_ms:.2%} / {take / 1000 / step_ms:.3%}"
                print(
                    f"| {name} | {megabytes:.1f} | {step_ms:.2f} | {where} | {take:.1f} | "
                    f"{restore:.1f} | {share} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
