"""Attach the DivergenceMonitor to an existing ``model.fit`` -- the whole change is marked ``# <--``.

    python examples/attach_monitor.py [--out runs/attach]

The model, data and compile call below stand for yours; nothing in them changes.
"""

from __future__ import annotations

import argparse

import keras
import numpy as np

from clippy_monitor import DivergenceMonitor, load_run  # <--


def existing_training(callbacks: list[keras.callbacks.Callback]) -> keras.Model:
    """Your training script: a two-task model, Keras' own Adagrad, a plain fit."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8192, 16)).astype("float32")
    y = {
        "click": (x[:, 0] + x[:, 1] > 0).astype("float32")[:, None],
        "watch_time": (x[:, 2] ** 2).astype("float32")[:, None],
    }
    inputs = keras.Input((16,))
    hidden = keras.layers.Dense(32, activation="relu", name="shared")(inputs)
    outputs = {
        "click": keras.layers.Dense(1, activation="sigmoid", name="click")(hidden),
        "watch_time": keras.layers.Dense(1, name="watch_time")(hidden),
    }
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.Adagrad(0.05),
        loss={"click": "binary_crossentropy", "watch_time": "mse"},
    )
    model.fit(x, y, batch_size=128, epochs=2, verbose=2, callbacks=callbacks)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/attach")
    args = parser.parse_args()

    existing_training(callbacks=[DivergenceMonitor(args.out, flush_every=64)])  # <--

    run = load_run(args.out)  # <-- read the record back (or open it in TensorBoard / the Dash app)
    print(
        f"\n{len(run)} steps x {len(run.layers)} layers recorded in {args.out}; "
        f"series: {', '.join(run.series_names[:4])}, ..."
    )
    print(f"divergence events: {run.events or 'none'}")
    print(
        f"open it:  tensorboard --logdir {args.out}    or    clippy-monitor dash --logdir {args.out}"
    )


if __name__ == "__main__":
    main()
