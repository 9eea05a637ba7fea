"""clippy-monitor: keep multitask ranking models from silently diverging.

Implements Tang et al., "Improving Training Stability for Multitask Ranking
Models in Recommender Systems" (KDD 2023): the Clippy optimizers, the paper's
baselines, and the tools that watch and explain loss divergence.
"""

from clippy_monitor.monitor import DetectorConfig, DivergenceMonitor, Thresholds, detect_divergence
from clippy_monitor.optimizers import (
    AGCAdagrad,
    ClippingOptimizer,
    ClippyAdagrad,
    ClippyAdam,
    GCAdagrad,
    LAMBAdagrad,
)

from clippy_monitor.record import RecordError, Run, load_run

__version__ = "0.1.0"

__all__ = [
    "AGCAdagrad",
    "ClippingOptimizer",
    "ClippyAdagrad",
    "ClippyAdam",
    "DetectorConfig",
    "DivergenceMonitor",
    "GCAdagrad",
    "LAMBAdagrad",
    "RecordError",
    "Run",
    "Thresholds",
    "detect_divergence",
    "load_run",
]
