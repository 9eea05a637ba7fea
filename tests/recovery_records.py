"""Run records of a tiny Keras model trained with the recovery ladder, for the readers' tests.

:func:`write_recovery_runs` trains a 4-8-1 MLP on 16-row batches (a second or two
each) with ``DivergenceMonitor(on_divergence="recover")`` and writes four runs:

* ``rollback`` (skipping off): a NaN batch at step 30 is a full divergence
  (step-a 29, step-b = step-c 30); the ladder rolls back at step 34 to the
  snapshot after step 25.
* ``mixed`` (skipping on): a loss spike at steps 20 and 60 and NaN batches at
  30..34 and 50 are skipped; five skips in a row at 30..34 roll back at step 34
  to step 25.  No divergence episode.
* ``gave_up``: as ``mixed`` without spikes, then NaN batches at 50..54 give up at 54
  (``max_rollbacks=1``).
* ``plain``: the monitor without the ladder (``read_recovery`` is None).

The step numbers above are what the tests assert on; they follow from the
seeds and the batches, and the tests check them against ``read_recovery``.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

BATCH = 16
#: Every setting the runs depend on, so a change of a default does not change them.
RECOVERY = dict(
    skip_ratio=10.0,
    skip_window=16,
    skip_min_history=8,
    max_consecutive_skips=4,
    snapshot_every=5,
    keep_snapshots=2,
    margin=0,
    cooldown_steps=10,
    cooldown_lr_factor=0.1,
    max_rollbacks=3,
    rollback_window=2000,
    check_every=5,
)


def train(
    logdir: Path,
    *,
    batches: int,
    nan_batches: tuple[int, ...] = (),
    spike_batches: tuple[int, ...] = (),
    recover: bool = True,
    skip: bool = True,
    **config,
) -> None:
    """Train the tiny model for ``batches`` steps, recording into ``logdir``."""
    from clippy_monitor import DivergenceMonitor
    from clippy_monitor.monitor.recovery import RecoveryConfig

    keras.utils.set_random_seed(0)
    layers = [keras.Input((4,)), keras.layers.Dense(8, "relu", name="hidden")]
    model = keras.Sequential([*layers, keras.layers.Dense(1, name="out")], name="mlp")
    model.compile(optimizer=keras.optimizers.Adagrad(0.1), loss="mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH * batches, 4)).astype("float32")
    y = x.sum(1, keepdims=True)
    for b in nan_batches:
        x[b * BATCH] = np.nan
    for b in spike_batches:
        y[b * BATCH : (b + 1) * BATCH] *= 10
    if recover:
        monitor = DivergenceMonitor(
            logdir,
            on_divergence="recover",
            skip_bad_steps=skip,
            recovery=RecoveryConfig(**{**RECOVERY, **config}),
            tensorboard=False,
        )
    else:
        monitor = DivergenceMonitor(logdir, tensorboard=False)
    model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0, callbacks=[monitor])


def write_recovery_runs(root: Path) -> Path:
    """The four runs of this module's docstring under ``root``; returns ``root``."""
    train(root / "rollback", batches=60, nan_batches=(30,), skip=False)
    nan = (30, 31, 32, 33, 34)
    train(root / "mixed", batches=80, nan_batches=(*nan, 50), spike_batches=(20, 60))
    train(root / "gave_up", batches=80, nan_batches=(*nan, 50, 51, 52, 53, 54), max_rollbacks=1)
    train(root / "plain", batches=40, recover=False)
    return root
