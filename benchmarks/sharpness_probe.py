"""Cost of one sharpness probe (``hessian_top_eigenvalue``, issue 16).

Times one probe of exactly ``--iterations`` Hessian-vector products (``tol=0``, so
it never stops early), plain and preconditioned (Adagrad), for the small MLP and
the recommender model (embedding table of ``--vocab`` rows, 4 x 1024 tower), and
its cost per training step if run every N = 100 or 1000 steps, against the step
time measured in the same rounds.  Medians over ``--rounds`` rounds; each round
times 20 fit steps and then each probe.

    python -m benchmarks.sharpness_probe [--vocab 1000000] [--rounds 5] [--iterations 20]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import keras

from benchmarks.common import recommender_data, recommender_model, small_data, small_model
from clippy_monitor import hessian_top_eigenvalue

STEPS = 20


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall ms, CPU ms) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return (time.perf_counter() - wall) * 1e3, (time.process_time() - cpu) * 1e3


def _measure(make_model, data, rounds: int, iterations: int) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) ms of one fit step and of each probe; plus the first call's."""
    model = make_model()
    model.compile(optimizer=keras.optimizers.Adagrad(0.01), loss="binary_crossentropy")
    model.fit(data, steps_per_epoch=5, verbose=0)
    x, y = next(iter(data))
    probes = {
        variant: (
            lambda p=preconditioned: hessian_top_eigenvalue(
                model, x, y, preconditioned=p, iterations=iterations, tol=0.0
            )
        )
        for variant, preconditioned in (("probe", False), ("preconditioned probe", True))
    }
    first = {f"{name}, first call (trace)": _timed(fn) for name, fn in probes.items()}
    times: dict[str, list[tuple[float, float]]] = {"step": [], **{name: [] for name in probes}}
    for _ in range(rounds):
        wall, cpu = _timed(lambda: model.fit(data, steps_per_epoch=STEPS, verbose=0))
        times["step"].append((wall / STEPS, cpu / STEPS))
        for name, fn in probes.items():
            times[name].append(_timed(fn))
    medians = {
        name: tuple(statistics.median(t[i] for t in samples) for i in (0, 1))
        for name, samples in times.items()
    }
    return {**medians, **first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=20)
    args = parser.parse_args()
    models = {
        "small": (small_model, small_data(256, 64)),
        f"recommender ({args.vocab} x 32 table)": (
            lambda: recommender_model(vocab=args.vocab),
            recommender_data(256, 8, vocab=args.vocab),
        ),
    }
    print(
        "| model | step ms | probe | wall ms | CPU ms | per step at N = 100 / 1000 (wall) |\n"
        "|---|---:|---|---:|---:|---:|"
    )
    for name, (make_model, data) in models.items():
        result = _measure(make_model, data, args.rounds, args.iterations)
        step = result.pop("step")[0]
        for probe, (wall, cpu) in result.items():
            share = (
                "" if "first" in probe else f"{wall / 100 / step:.1%} / {wall / 1000 / step:.2%}"
            )
            print(
                f"| {name} | {step:.2f} | {probe} | {wall:.0f} | {cpu:.0f} | {share} |", flush=True
            )


if __name__ == "__main__":
    main()
