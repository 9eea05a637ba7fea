"""A monitored ClippyAdagrad run on a small synthetic two-task ranking problem.

    python examples/quickstart.py [--out runs/quickstart]

Trains with `DivergenceMonitor` attached, then reads the run record back and
prints what it holds.  Open it with `tensorboard --logdir runs`.
"""

from __future__ import annotations

import argparse

import keras
import numpy as np

from clippy_monitor import ClippyAdagrad, DivergenceMonitor, load_run


def make_model(features: int = 32) -> keras.Model:
    inputs = keras.Input((features,), name="features")
    shared = keras.layers.Dense(64, activation="relu", name="shared_0")(inputs)
    shared = keras.layers.Dense(64, activation="relu", name="shared_1")(shared)
    click = keras.layers.Dense(1, activation="sigmoid", name="click")(shared)
    watch = keras.layers.Dense(1, name="watch_time")(shared)
    return keras.Model(inputs, {"click": click, "watch_time": watch})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/quickstart")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    x = rng.normal(size=(20_000, 32)).astype("float32")
    w = rng.normal(size=(32,)).astype("float32")
    y = {
        "click": (x @ w + rng.normal(size=20_000) > 0).astype("float32")[:, None],
        "watch_time": np.log1p(np.exp(x @ w / 4))[:, None].astype("float32"),
    }
    model = make_model()
    model.compile(
        optimizer=ClippyAdagrad(learning_rate=0.1),
        loss={"click": "binary_crossentropy", "watch_time": "mse"},
        steps_per_execution=8,
    )
    model.fit(
        x,
        y,
        batch_size=256,
        epochs=3,
        verbose=2,
        callbacks=[DivergenceMonitor(args.out, flush_every=100)],
    )

    run = load_run(args.out)
    print(f"\nrecorded {len(run.steps)} steps x {len(run.layers)} layers in {args.out}")
    print(f"final loss {run.series('loss')[-1]:.4f}; divergence events: {run.events or 'none'}")
    for name, factor in zip(run.layers, run.layer("applied_factor")[-1]):
        print(f"  {name:24s} applied clipping factor at the last step: {factor:.3g}")
    print(f"\nopen it:  tensorboard --logdir {args.out}")


if __name__ == "__main__":
    main()
