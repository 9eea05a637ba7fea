"""Step time of ClippyAdagrad against keras.optimizers.Adagrad (issue 2 target: <= 1.05x).

Recommender-sized model: 8 embedded ids (10k x 32) plus a 4 x 1024 ReLU tower,
batch 1024.  Both optimizers run in this process, interleaved round by round.

    python -m benchmarks.optimizer_step [--rounds 5] [--steps 20]

Measured with jit_compile False (Keras's default on CPU) and True (its default
on GPUs).
"""

from __future__ import annotations

import argparse

import keras

from benchmarks.common import (
    interleaved_medians,
    recommender_data,
    recommender_model,
    report,
    timed_fit,
)
from clippy_monitor import ClippyAdagrad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1024)
    args = parser.parse_args()

    data = recommender_data(args.batch, args.steps)
    for jit in (False, True):
        runs = {}
        for name, make in [
            ("keras Adagrad", lambda: keras.optimizers.Adagrad(0.05)),
            ("ClippyAdagrad", lambda: ClippyAdagrad(0.05)),
            (
                "ClippyAdagrad, embedding excluded",
                lambda: ClippyAdagrad(0.05, exclude_from_clipping=["embedding"]),
            ),
        ]:
            keras.utils.set_random_seed(0)
            model = recommender_model()
            model.compile(optimizer=make(), loss="binary_crossentropy", jit_compile=jit)
            runs[name] = timed_fit(model, data, args.steps)
        times = interleaved_medians(runs, args.rounds)
        print(
            f"\n### batch {args.batch}, {args.steps} steps x {args.rounds} rounds, "
            f"jit_compile={jit}, {keras.backend.backend()}"
        )
        print(report(times, "keras Adagrad"), flush=True)


if __name__ == "__main__":
    main()
