"""Optimizers bundled with clippy-monitor (Keras 3)."""

from clippy_monitor.optimizers._base import ClippingOptimizer
from clippy_monitor.optimizers.baselines import AGCAdagrad, GCAdagrad, LAMBAdagrad
from clippy_monitor.optimizers.clippy_adagrad import ClippyAdagrad
from clippy_monitor.optimizers.clippy_adam import ClippyAdam

__all__ = [
    "AGCAdagrad",
    "ClippingOptimizer",
    "ClippyAdagrad",
    "ClippyAdam",
    "GCAdagrad",
    "LAMBAdagrad",
]
