"""Everything the ``DivergenceMonitor`` reads or patches inside Keras, in one place.

Keras callbacks never see the gradients, the weights before and after the update,
or each task's loss.  The monitor reaches them by shadowing methods on the
*instances* only (``optimizer.apply``, ``model.compute_loss``, ``model.train_step``)
and by wrapping the entries of the compiled loss (``_flat_losses``, once built); it
reads the loss scale of a ``LossScaleOptimizer`` and uses Keras' private
``unscale_loss_for_distribution``.  These rely on Keras internals written for
``SUPPORTED_KERAS`` (pyproject.toml's pin): this is the one module to revisit when
Keras changes, and another version gets one warning, not a crash.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

_log = logging.getLogger(__name__)

# keras>=3.8,<4, as pinned in pyproject.toml: keep the two in step.
SUPPORTED_KERAS = ((3, 8), (4, 0))

Undo = Callable[[], None]


def keras_supported(version: str) -> bool:
    """Whether Keras ``version`` lies in ``SUPPORTED_KERAS`` (lower bound included)."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        return False
    low, high = SUPPORTED_KERAS
    return low <= (int(match[1]), int(match[2])) < high


@functools.cache
def check_keras_version(version: str = keras.__version__) -> bool:
    """``keras_supported(version)``; outside the range, warn once per process."""
    if keras_supported(version):
        return True
    (low_major, low_minor), (high_major, _) = SUPPORTED_KERAS
    _log.warning(
        "clippy_monitor's Keras hooks were written for keras>=%d.%d,<%d and this is Keras %s: "
        "the DivergenceMonitor may miss losses or fail (the hooks are in %s)",
        low_major,
        low_minor,
        high_major,
        version,
        __name__,
    )
    return False


# ------------------------------------------------------------------ reads
def innermost(optimizer: Any) -> Any:
    """The optimizer that owns the update (unwraps ``LossScaleOptimizer``)."""
    return getattr(optimizer, "inner_optimizer", optimizer)


def loss_scale(optimizer: Any) -> tf.Tensor | None:
    """The factor the gradients reaching ``apply`` are multiplied by, if any."""
    if hasattr(optimizer, "dynamic_scale"):
        return tf.convert_to_tensor(optimizer.dynamic_scale)
    if getattr(optimizer, "loss_scale_factor", None):
        return tf.constant(float(optimizer.loss_scale_factor))
    return None


def skips_overflowed_steps(optimizer: Any) -> bool:
    """Whether the optimizer uses a dynamic loss scale (it skips overflowed steps)."""
    return hasattr(optimizer, "dynamic_scale")


def unscale_loss(loss: tf.Tensor) -> tf.Tensor:
    """A replica's loss scaled for distribution, back to the global loss's scale."""
    from keras.src.losses.loss import unscale_loss_for_distribution

    return unscale_loss_for_distribution(loss)


def compiled_output_names(model: keras.Model) -> list[str]:
    """The output names of the model's compiled loss (empty if it has none)."""
    compile_loss = getattr(model, "_compile_loss", None)
    return list(getattr(compile_loss, "output_names", None) or [])


# ---------------------------------------------------------------- patches
class KerasPatches:
    """Instance-level patches of a model and its optimizer, undone together by ``remove``."""

    def __init__(self) -> None:
        self._undo: list[Undo] = []

    @property
    def installed(self) -> bool:
        return bool(self._undo)

    def remove(self) -> None:
        """Undo every patch, newest first."""
        while self._undo:
            self._undo.pop()()

    def shadow(self, obj: Any, name: str, replacement: Any) -> None:
        """Set ``obj.name`` on the instance only (bypassing Keras' attribute tracking)."""
        object.__setattr__(obj, name, replacement)
        self._undo.append(lambda: obj.__dict__.pop(name, None))

    def wrap_apply(self, optimizer: Any, monitored: Callable[..., Any]) -> None:
        """``optimizer.apply(grads, tv)`` becomes ``monitored(original_apply, grads, tv)``."""
        original = optimizer.apply
        self.shadow(optimizer, "apply", lambda grads, tv=None: monitored(original, grads, tv))

    def scale_learning_rate(self, optimizer: Any, multiplier: Callable[[], Any]) -> None:
        """The learning rate the optimizer's update reads becomes ``lr * multiplier()``.

        Keras reads it through ``_get_current_learning_rate`` (the ``learning_rate``
        property), whatever it is: a float, a variable or a schedule.
        """
        original = optimizer._get_current_learning_rate

        def current() -> Any:
            learning_rate = original()
            return learning_rate * tf.cast(multiplier(), learning_rate.dtype)

        self.shadow(optimizer, "_get_current_learning_rate", current)

    def wrap_compute_loss(self, model: keras.Model, seen: Callable[[Any], None]) -> None:
        """``seen(loss)`` with every loss ``model.compute_loss`` returns."""
        original = model.compute_loss

        def compute_loss(*args: Any, **kwargs: Any) -> Any:
            loss = original(*args, **kwargs)
            seen(loss)
            return loss

        self.shadow(model, "compute_loss", compute_loss)

    def wrap_train_step(self, model: keras.Model, monitored: Callable[..., Any]) -> None:
        """``model.train_step(*a, **kw)`` becomes ``monitored(original_train_step, *a, **kw)``."""
        original = model.train_step
        self.shadow(model, "train_step", lambda *a, **kw: monitored(original, *a, **kw))

    def wrap_task_losses(
        self,
        model: keras.Model,
        tasks: list[str],
        reset: Callable[[int], None],
        seen: Callable[[int, Any], None],
    ) -> None:
        """``seen(index in tasks, loss)`` with each compiled task loss as it is computed.

        ``reset(number of losses)`` runs when the entries are wrapped: now if the
        compiled loss is built, else right after Keras builds it.
        """
        compile_loss = getattr(model, "_compile_loss", None)
        if compile_loss is None or not tasks:
            return
        if compile_loss.built:
            self._wrap_entries(compile_loss, tasks, reset, seen)
            return
        original_build = compile_loss.build

        def build(*args: Any, **kwargs: Any) -> Any:
            out = original_build(*args, **kwargs)
            compile_loss.__dict__.pop("build", None)
            self._wrap_entries(compile_loss, tasks, reset, seen)
            return out

        self.shadow(compile_loss, "build", build)

    def _wrap_entries(
        self, compile_loss: Any, tasks: list[str], reset: Callable, seen: Callable
    ) -> None:
        """Replace each entry of ``compile_loss._flat_losses`` with one that reports its loss."""
        entries = compile_loss._flat_losses
        reset(len(entries))
        # `entries` follow the loss dict's order, the recorded tasks the sorted
        # output names: place each loss by its name.
        slots = [tasks.index(e.name) if e.name in tasks else i for i, e in enumerate(entries)]

        def wrap(slot: int, fn: Any) -> Any:
            def task_loss(*args: Any, **kwargs: Any) -> Any:
                value = fn(*args, **kwargs)
                seen(slot, value)
                return value

            return task_loss

        compile_loss._flat_losses = [
            e._replace(loss=wrap(slot, e.loss)) for slot, e in zip(slots, entries)
        ]
        self._undo.append(lambda: setattr(compile_loss, "_flat_losses", entries))
