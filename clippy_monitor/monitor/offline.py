"""The divergence detector over a recorded loss series (offline; Tang et al., KDD 2023).

:func:`detect_divergence` and :func:`detector_outputs` run the *same* state
machine as training (``DivergenceDetector.step``'s body) with ``tf.scan``
inside an XLA-compiled ``tf.function`` on the CPU, then :class:`EventTracker`.
The thresholds are a graph input, so every config shares a compilation; the
compilations live in :data:`OFFLINE` (an :class:`OfflineDetector`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf

from clippy_monitor.monitor.detectors import (
    STEP_PARAMS,
    DetectorConfig,
    DivergenceDetector,
    EventTracker,
    dead_layer_signal,
    step_params,
)

__all__ = [
    "OFFLINE",
    "OfflineDetector",
    "OfflineInputs",
    "detect_divergence",
    "detector_outputs",
    "total_loss",
]

_log = logging.getLogger(__name__)


class OfflineInputs(NamedTuple):
    """The detector's per-step inputs for a whole series."""

    series: np.ndarray  # float32 [n, k]: the total loss, then one column per task
    grad_norm: np.ndarray  # float32 [n]; -1 = not measured (no collapse test)
    grads_finite: np.ndarray  # bool [n]
    dead_layer: np.ndarray  # bool [n]

    @classmethod
    def prepare(
        cls,
        loss: np.ndarray,
        grad_norm: np.ndarray | None,
        zero_grad_fraction: np.ndarray | None,
        config: DetectorConfig,
    ) -> OfflineInputs:
        """The inputs of :func:`detector_outputs` checked and converted."""
        series = _loss_series(loss)
        n = series.shape[0]
        if grad_norm is None:
            gn = np.full(n, -1.0, np.float32)
            gf = np.ones(n, bool)
        else:
            gn = np.asarray(grad_norm, np.float32).reshape(-1)
            if gn.shape[0] != n:
                raise ValueError(f"grad_norm has {gn.shape[0]} steps, loss has {n}")
            gf = np.isfinite(gn)
        return cls(series.astype(np.float32), gn, gf, _dead_layer(zero_grad_fraction, n, config))

    def padded(self) -> OfflineInputs:
        """Padded so that repeated calls reuse compilations: inert zero task columns up
        to a power of two >= 4 (multitask), inert rows up to :func:`_bucket`.

        Zero task columns never exceed, never block a recovery and never win the
        argmax at an onset; rows come after the data, so they cannot change it.
        """
        series, (n, k) = self.series, self.series.shape
        if k > 1:
            kp = max(4, 1 << (k - 1).bit_length())
            if kp > k:
                series = np.concatenate([series, np.zeros((n, kp - k), np.float32)], axis=1)
                k = kp
        pad = _bucket(n) - n
        if not pad:
            return self._replace(series=series)
        return OfflineInputs(
            np.concatenate([series, np.zeros((pad, k), np.float32)]),
            np.concatenate([self.grad_norm, np.full(pad, -1.0, np.float32)]),
            np.concatenate([self.grads_finite, np.ones(pad, bool)]),
            np.concatenate([self.dead_layer, np.zeros(pad, bool)]),
        )


def total_loss(loss: np.ndarray) -> np.ndarray:
    """The detector's series 0 of ``loss`` (1-D: itself; 2-D ``[steps, tasks]``: the sum)."""
    return _loss_series(loss)[:, 0]


def _loss_series(loss: np.ndarray) -> np.ndarray:
    """``[n, 1]`` for a 1-D loss; ``[n, 1 + tasks]`` (total = sum, then the tasks) for 2-D."""
    loss = np.asarray(loss, dtype=np.float64)
    if loss.ndim == 1:
        return loss[:, None]
    if loss.ndim == 2:
        if loss.shape[1] < 1:
            raise ValueError("a 2-D loss needs at least one task column")
        return np.concatenate([loss.sum(axis=1, keepdims=True), loss], axis=1)
    raise ValueError(f"loss must be 1-D or 2-D [steps, tasks], got shape {loss.shape}")


def _dead_layer(
    zero_grad_fraction: np.ndarray | None, n: int, config: DetectorConfig
) -> np.ndarray:
    """bool ``[n]``: a dead layer at the step (:func:`dead_layer_signal`); all False for None."""
    if zero_grad_fraction is None:
        return np.zeros(n, bool)
    zero = np.asarray(zero_grad_fraction, np.float32)
    zero = zero[:, None] if zero.ndim == 1 else zero
    if zero.ndim != 2 or zero.shape[0] != n:
        raise ValueError(
            f"zero_grad_fraction must be [steps, layers] with {n} steps, got shape {zero.shape}"
        )
    alive = np.zeros(zero.shape[1], bool)
    return dead_layer_signal(zero, alive, config.dead_layer_share)[0].numpy()


def _bucket(n: int) -> int:
    """Padded length: a power of two >= 8192, so repeated calls reuse compilations
    (padding costs microseconds; a compilation, a second)."""
    return max(8192, 1 << max(0, (n - 1).bit_length()))


class OfflineDetector:
    """Runs the detector over whole series, keeping one compilation per series width.

    Attributes:
        functions: the cache, ``{(num_series, jit): tf.function}``; each takes
            ``(losses, grad_norm, grads_finite, dead_layer, params)`` and returns
            the outputs ``[T, 3]``. :meth:`clear` empties it.
        xla: False once XLA failed here; the graph executor is used from then on.
    """

    def __init__(self) -> None:
        self.functions: dict[tuple[int, bool], Any] = {}
        self.xla = True

    def clear(self) -> None:
        """Drop every compilation (and try XLA again on the next run)."""
        self.functions.clear()
        self.xla = True

    def function(self, num_series: int, jit: bool) -> Any:
        """The compiled run for ``num_series`` series (built on first use)."""
        key = (num_series, jit)
        if key not in self.functions:
            det = DivergenceDetector(num_series)

            def run(
                losses: tf.Tensor,
                grad_norm: tf.Tensor,
                grads_finite: tf.Tensor,
                dead: tf.Tensor,
                params: tf.Tensor,
            ) -> tf.Tensor:
                p = {name: params[i] for i, name in enumerate(STEP_PARAMS)}
                state = det.initial_state()
                return det.scan(state, losses, grad_norm, grads_finite, params=p, dead_layer=dead)[
                    1
                ]

            self.functions[key] = tf.function(run, jit_compile=jit, reduce_retracing=True)
        return self.functions[key]

    def run(self, inputs: OfflineInputs, config: DetectorConfig) -> np.ndarray:
        """The detector outputs ``[n, 3]`` of ``inputs`` under ``config``."""
        n = inputs.series.shape[0]
        if n == 0:
            return np.zeros((0, 3), np.float32)
        padded = inputs.padded()
        values = step_params(config)
        params = tf.constant([values[name] for name in STEP_PARAMS], tf.float32)
        args = (*map(tf.constant, padded), params)
        with tf.device("/CPU:0"):  # a sequential loop: a device would only add launch latency
            return self._call(padded.series.shape[1], args).numpy()[:n]

    def _call(self, num_series: int, args: tuple[tf.Tensor, ...]) -> tf.Tensor:
        """The XLA-compiled run, or the graph executor's once XLA has failed."""
        if self.xla:
            try:
                return self.function(num_series, True)(*args)
            except (
                tf.errors.UnimplementedError,
                tf.errors.InvalidArgumentError,
                tf.errors.InternalError,
            ) as err:
                _log.warning(
                    "XLA unavailable for the offline detector (%s); using the graph executor", err
                )
                self.xla = False
        return self.function(num_series, False)(*args)


#: The process's offline detector: its compilations serve every call of
#: :func:`detector_outputs` and :func:`detect_divergence` (``OFFLINE.clear()`` frees them).
OFFLINE = OfflineDetector()


def detector_outputs(
    loss: np.ndarray,
    grad_norm: np.ndarray | None = None,
    zero_grad_fraction: np.ndarray | None = None,
    **thresholds: Any,
) -> np.ndarray:
    """Per-step detector outputs ``[n, 3]`` (``OUTPUT_NAMES``) of an offline series.

    ``loss``/``grad_norm``/``zero_grad_fraction``/``thresholds`` as in
    :func:`detect_divergence`; the series are ``[total, task_0, ...]`` for a 2-D loss.
    """
    config = DetectorConfig.from_dict(thresholds)
    return OFFLINE.run(OfflineInputs.prepare(loss, grad_norm, zero_grad_fraction, config), config)


def detect_divergence(
    loss: np.ndarray,
    grad_norm: np.ndarray | None = None,
    *,
    zero_grad_fraction: np.ndarray | None = None,
    steps: np.ndarray | None = None,
    series_names: Sequence[str] | None = None,
    **thresholds: Any,
) -> list[dict]:
    """Find micro and full divergences in a recorded loss series.

    Runs the same state machine as training does (``DivergenceDetector.step``'s
    body, ``tf.scan`` in an XLA-compiled ``tf.function`` on the CPU, thresholds
    fed as tensors), then :class:`EventTracker`. A compilation is needed per
    padded length (a power of two >= 8192) and series width (1, or a power of
    two >= 4 for multitask); :data:`OFFLINE` keeps them.

    Args:
        loss: 1-D total loss, or 2-D ``[steps, num_tasks]`` per-task losses (the
            total is then their sum, series 0).
        grad_norm: optional 1-D global gradient norm per step; NaN/Inf there is a
            non-finite step; None disables the gradient-collapse test.
        zero_grad_fraction: optional ``[steps, layers]`` share of exactly-zero
            gradient entries per layer (``load_run(path).layer("zero_grad_fraction")``);
            None disables the dead-layer test.
        steps: the step number of each row (default ``0..n-1``).
        series_names: names of the task columns of a 2-D loss (default
            ``task_0, ...``; a list one longer also names the total), or of the
            single series of a 1-D loss (default ``total``).
        **thresholds: :class:`DetectorConfig` fields; an unknown name raises
            ``TypeError``.

    Returns:
        The completed events (see :class:`EventTracker`); an episode still open
        at the end of the series is not reported.
    """
    config = DetectorConfig.from_dict(thresholds)
    inputs = OfflineInputs.prepare(loss, grad_norm, zero_grad_fraction, config)
    n, k = inputs.series.shape
    if steps is None:
        steps_arr = np.arange(n, dtype=np.int64)
    else:
        steps_arr = np.asarray(steps, np.int64).reshape(-1)
        if steps_arr.shape[0] != n:
            raise ValueError(f"steps has {steps_arr.shape[0]} entries, loss has {n}")
    names = _series_names(np.asarray(loss).ndim, k, series_names)
    return EventTracker(names).update(steps_arr, OFFLINE.run(inputs, config), inputs.series[:, 0])


def _series_names(ndim: int, k: int, names: Sequence[str] | None) -> list[str]:
    """The name of each of the ``k`` detector series (see ``series_names`` above)."""
    if ndim == 1:
        if names is None:
            return ["total"]
        names = list(names)
        if len(names) != 1:
            raise ValueError(f"a 1-D loss has one series, got {len(names)} names")
        return names
    if names is None:
        return ["total"] + [f"task_{i}" for i in range(k - 1)]
    names = list(names)
    if len(names) == k - 1:
        return ["total"] + names
    if len(names) == k:
        return names
    raise ValueError(f"{k - 1} task columns but {len(names)} series_names")
