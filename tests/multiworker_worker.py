"""One process of tests/test_multiworker.py: train a tiny model with ``train_distributed``.

With ``TF_CONFIG`` set it is one worker of a ``MultiWorkerMirroredStrategy``;
without, it is the single-device reference (default strategy).  Both see the
same global batches and start from the same weights.

Usage: python multiworker_worker.py LOGDIR
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from clippy_monitor.monitor import DivergenceMonitor  # noqa: E402
from clippy_monitor.monitor.distributed import train_distributed  # noqa: E402
from clippy_monitor.optimizers import ClippyAdagrad  # noqa: E402

GLOBAL_BATCH = 16
STEPS = 10
FLUSH_EVERY = 5
COLLECTIVE_TIMEOUT_S = 60


def data() -> tf.data.Dataset:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(GLOBAL_BATCH * STEPS, 8)).astype("float32")
    y = (x @ rng.normal(size=(8, 1)) + 3.0).astype("float32")
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH, drop_remainder=True)
    options = tf.data.Options()
    # Each worker takes its replicas' slices of every global batch.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    options.deterministic = True
    return dataset.with_options(options)


def main(logdir: str) -> None:
    tf.config.threading.set_intra_op_parallelism_threads(1)
    if "TF_CONFIG" in os.environ:
        strategy = tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=tf.distribute.experimental.CommunicationOptions(
                implementation=tf.distribute.experimental.CommunicationImplementation.RING,
                timeout_seconds=COLLECTIVE_TIMEOUT_S,
            )
        )
    else:
        strategy = tf.distribute.get_strategy()
    with strategy.scope():
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)])
        model.compile(optimizer=ClippyAdagrad(learning_rate=0.5))
    kernel = np.linspace(-0.5, 0.5, 8, dtype="float32").reshape(8, 1)
    model.set_weights([kernel, np.array([0.1], "float32")])
    monitor = DivergenceMonitor(logdir, flush_every=FLUSH_EVERY, tensorboard=False)
    done = train_distributed(
        model,
        keras.losses.MeanSquaredError(reduction=None),
        data(),
        strategy,
        monitor,
        steps=STEPS,
        global_batch_size=GLOBAL_BATCH,
    )
    monitor.close()
    assert done == STEPS, done
    print("DONE", strategy.num_replicas_in_sync, flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
