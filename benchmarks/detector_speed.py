"""Offline ``detect_divergence`` over a 100,000-step series (first call and warm calls).

python -m benchmarks.detector_speed [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from clippy_monitor import detect_divergence


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    loss = np.exp(rng.normal(0, 0.15, 100_000)) * np.repeat(
        rng.uniform(0.75, 1.35, 20).cumprod(), 5000
    )
    start = time.perf_counter()
    detect_divergence(loss)
    first = time.perf_counter() - start
    warm = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        detect_divergence(loss)
        warm.append(time.perf_counter() - start)
    print(
        f"100k steps: first call (includes XLA compile) {first:.2f} s; "
        f"warm median {statistics.median(warm) * 1e3:.0f} ms"
    )


if __name__ == "__main__":
    main()
