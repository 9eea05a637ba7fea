"""Rung 1 of the recovery ladder: skip a bad step inside the train step, on the device.

A step is *bad* when its global gradient norm or its loss is non-finite, or when
the norm exceeds ``skip_ratio`` x the median norm of the last ``skip_window``
applied steps (once ``skip_min_history`` of them exist).  After
``max_consecutive_skips`` finite skips in a row the next such step is applied and
the window starts again from it: a norm that stays high is a new level, not a
bad step.  The median, not a mean
and standard deviation, because the steps it must reject are the outliers that
would drag a mean.  The update of a bad step is not applied: the optimizer's
``apply`` runs in the false branch of a ``tf.cond``, so neither the weights nor
the optimizer's state (accumulators, moments, ``iterations`` and so the
learning-rate schedule) change.  Every input of the decision is all-reduced, so
every replica decides alike.

After a rollback the learning rate is cooled down (``Cooldown``): multiplied by
a factor that rises linearly back to 1, computed on the device from the step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

from clippy_monitor.monitor.recorder import replicated_variable
from clippy_monitor.monitor.recovery import RecoveryConfig

_NO_COOLDOWN = -(2**62)  # a start step so far back that the factor is 1


def global_grad_norm(padded: Sequence[tuple[tf.Tensor, Any]]) -> tf.Tensor:
    """``||g||_2`` over every gradient given as ``statistics.padded_gradient_values``
    (sparse rows summed first, as the recorded ``grad_norm``)."""
    squares = [tf.reduce_sum(tf.square(tf.cast(values, tf.float32))) for values, _ in padded]
    return tf.sqrt(tf.add_n(squares)) if squares else tf.zeros(())


class SkipGuard:
    """The running bound and the skip decision; its state lives on the device."""

    def __init__(self, config: RecoveryConfig) -> None:
        self.config = config
        self.norms = replicated_variable(tf.zeros([config.skip_window]), "clippy_skip_norms")
        self.count = replicated_variable(tf.constant(0, tf.int64), "clippy_skip_count")
        self.streak = replicated_variable(tf.constant(0, tf.int64), "clippy_skip_streak")

    def bound(self) -> tf.Tensor:
        """``skip_ratio`` x the median of the recent applied norms; +inf until enough exist."""
        window = self.config.skip_window
        filled = tf.minimum(self.count, window)
        values = tf.where(tf.range(window, dtype=tf.int64) < filled, self.norms, float("inf"))
        median = tf.gather(tf.sort(values), tf.maximum(filled - 1, 0) // 2)
        ready = filled >= max(self.config.skip_min_history, 1)
        return tf.where(ready, self.config.skip_ratio * median, float("inf"))

    def decide(
        self, grad_norm: tf.Tensor, loss: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """``(skip, relearn, bound)`` of this step, from the all-reduced norm and loss.

        A finite step above the bound after ``max_consecutive_skips`` skips in a row
        is applied instead (``relearn``): the level of the norm moved (a shift in the
        data), and the bound is learnt again from it; judging those steps is the
        detector's work.  Non-finite steps are always skipped.
        """
        bound = self.bound()
        finite = tf.math.is_finite(grad_norm) & tf.math.is_finite(loss)
        over = finite & (grad_norm > bound)
        relearn = over & (self.streak >= self.config.max_consecutive_skips)
        return tf.logical_not(finite) | (over & ~relearn), relearn, bound

    def update(self, grad_norm: tf.Tensor, skip: tf.Tensor, relearn: tf.Tensor) -> None:
        """Add an applied step's norm to the window (emptied first on ``relearn``);
        count the skips in a row."""
        count = tf.where(relearn, tf.constant(0, tf.int64), self.count)
        index = tf.math.floormod(count, self.config.skip_window)[None]
        kept = tf.where(skip, tf.gather(self.norms, index), grad_norm[None])
        self.norms.scatter_update(tf.IndexedSlices(kept, index))
        self.count.assign(count + tf.where(skip, tf.constant(0, tf.int64), 1))
        self.streak.assign(tf.where(skip, self.streak + 1, 0))

    def reset(self) -> None:
        """Forget the window (after a rollback: the bound is learnt again)."""
        self.count.assign(0)
        self.streak.assign(0)


class Cooldown:
    """The learning-rate multiplier after a rollback, as a function of the step."""

    def __init__(self, config: RecoveryConfig) -> None:
        self.config = config
        self.start = replicated_variable(tf.constant(_NO_COOLDOWN, tf.int64), "clippy_cooldown")

    def multiplier(self, step: tf.Tensor) -> tf.Tensor:
        """``f + (1 - f) * min(1, (step - start) / cooldown_steps)``, ``f`` the cool-down factor."""
        factor = self.config.cooldown_lr_factor
        length = max(self.config.cooldown_steps, 1)
        done = tf.cast(step - self.start, tf.float32) / float(length)
        return factor + (1.0 - factor) * tf.clip_by_value(done, 0.0, 1.0)

    def begin(self, step: int) -> None:
        """Start a cool-down at ``step`` (0 ``cooldown_steps``: none)."""
        self.start.assign(step if self.config.cooldown_steps else _NO_COOLDOWN)


def apply_unless(
    skip: tf.Tensor, apply: Callable[..., Any], grads: Sequence[Any], variables: Any
) -> None:
    """``apply(grads, variables)`` unless ``skip`` (the same on every replica).

    Under a strategy whose update needs a ``merge_call`` (``MirroredStrategy``), the
    ``tf.cond`` runs in cross-replica context, as Keras' ``LossScaleOptimizer``
    does: a ``merge_call`` inside a replica-context ``cond`` is not supported.
    """
    ctx = tf.distribute.get_replica_context()
    needs_merge = (
        ctx is not None
        and ctx.num_replicas_in_sync > 1
        and not tf.__internal__.distribute.strategy_supports_no_merge_call()
    )
    if not needs_merge:
        tf.cond(skip, lambda: None, lambda: _run(apply, grads, variables))
        return

    def cross_replica(distribution: Any, skip: Any, grads: Any, variables: Any) -> None:
        first = distribution.experimental_local_results(skip)[0]

        def run() -> None:
            distribution.extended.call_for_each_replica(_run, args=(apply, grads, variables))

        tf.cond(first, lambda: None, run)

    ctx.merge_call(cross_replica, args=(skip, grads, variables))


def _run(apply: Callable[..., Any], grads: Sequence[Any], variables: Any) -> None:
    apply(list(grads), variables)
