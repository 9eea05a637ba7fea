"""A custom ``strategy.run`` training loop that records like ``DivergenceMonitor`` in ``fit``.

Keras 3's ``model.fit`` does not run under ``tf.distribute.MultiWorkerMirroredStrategy``
(keras-team/keras#20585).  This module is the loop to use instead; it runs the
same recording step as the callback does in ``fit``, so the run record is the
same.  It works with any ``tf.distribute`` strategy, and with none (the default
strategy), which is how a single-device reference run is made.

Example (run the same script on every worker, each with its own ``TF_CONFIG``)::

    import keras
    import numpy as np
    import tensorflow as tf
    from clippy_monitor.monitor import DivergenceMonitor
    from clippy_monitor.monitor.distributed import train_distributed
    from clippy_monitor.optimizers import ClippyAdagrad

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    GLOBAL_BATCH = 64
    with strategy.scope():
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)])
        model.compile(optimizer=ClippyAdagrad(learning_rate=0.1))
    x = np.random.default_rng(0).normal(size=(4096, 8)).astype("float32")  # same on every worker
    y = x.sum(axis=1, keepdims=True)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(GLOBAL_BATCH, drop_remainder=True)
    monitor = DivergenceMonitor("runs/exp1", flush_every=100)  # only the chief writes
    train_distributed(
        model, keras.losses.MeanSquaredError(reduction=None), dataset, strategy, monitor,
        steps=10_000, global_batch_size=GLOBAL_BATCH,
    )

``loss_fn(y_true, y_pred)`` returns one loss per example (a Keras loss with
``reduction=None``).  ``dataset`` is batched with the *global* batch size; it is
split across the replicas with ``strategy.experimental_distribute_dataset`` (an
already distributed dataset or iterator is used as it is).

To write your own loop, build the step with :func:`make_train_step` and drive
the monitor as :func:`train_distributed` does: ``set_model`` and
``on_train_begin`` inside ``strategy.scope()`` after the optimizer is built,
``on_train_batch_begin``/``on_train_batch_end`` around each step, and
``on_train_end`` at the end.  Make the step after ``on_train_begin`` (it must be
traced with the monitor's hooks installed) and make a new one per training run.
"""

from __future__ import annotations

from typing import Any, Callable

import keras
import tensorflow as tf

from clippy_monitor.monitor.callback import DivergenceMonitor


def make_train_step(
    model: keras.Model,
    loss_fn: Callable[[Any, Any], tf.Tensor],
    strategy: tf.distribute.Strategy,
    monitor: DivergenceMonitor | None,
    *,
    global_batch_size: int | None = None,
) -> Callable[[Any], tf.Tensor]:
    """A ``tf.function`` ``step(iterator)`` that trains one step on every replica.

    Each replica computes its loss as ``tf.nn.compute_average_loss`` of its
    per-example losses over the global batch (plus ``model.losses`` scaled by
    ``tf.nn.scale_regularization_loss``), so the losses of the replicas sum to
    the global mean loss; it passes that loss to ``monitor.record_loss`` and
    updates with ``model.optimizer.apply``, where the monitor records the step.
    ``global_batch_size`` defaults to the replica's batch size times the number
    of replicas.  Returns the global mean loss of the step.
    """

    def replica_step(batch: Any) -> tf.Tensor:
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(batch)
        with tf.GradientTape() as tape:
            y_pred = model(x, training=True)
            per_example = loss_fn(y, y_pred)
            loss = tf.nn.compute_average_loss(
                per_example, sample_weight=sample_weight, global_batch_size=global_batch_size
            )
            if model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
            scaled_loss = model.optimizer.scale_loss(loss)  # LossScaleOptimizer (mixed precision)
        grads = tape.gradient(scaled_loss, model.trainable_variables)
        if monitor is not None:
            monitor.record_loss(loss)
        model.optimizer.apply(grads, model.trainable_variables)
        return loss

    @tf.function
    def train_step(iterator: Any) -> tf.Tensor:
        losses = strategy.run(replica_step, args=(next(iterator),))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None)

    return train_step


def train_distributed(
    model: keras.Model,
    loss_fn: Callable[[Any, Any], tf.Tensor],
    dataset: Any,
    strategy: tf.distribute.Strategy,
    monitor: DivergenceMonitor,
    steps: int,
    *,
    global_batch_size: int | None = None,
) -> int:
    """Train ``steps`` steps with ``make_train_step``, driving ``monitor`` as ``fit`` would.

    Stops early when ``model.stop_training`` is set (``on_divergence="stop"``;
    every worker sees the same record, so all stop at the same step).
    Returns the number of steps run.
    """
    with strategy.scope():
        model.optimizer.build(model.trainable_variables)
        monitor.set_model(model)
        monitor.on_train_begin()
    train_step = make_train_step(
        model, loss_fn, strategy, monitor, global_batch_size=global_batch_size
    )
    if isinstance(dataset, tf.data.Dataset):
        dataset = strategy.experimental_distribute_dataset(dataset)
    iterator = iter(dataset)
    model.stop_training = False
    done = 0
    while done < steps and not model.stop_training:
        monitor.on_train_batch_begin(done)
        train_step(iterator)
        monitor.on_train_batch_end(done)
        done += 1
    monitor.on_train_end()
    return done
