"""clippy-monitor: keep multitask ranking models from silently diverging.

Implements Tang et al., "Improving Training Stability for Multitask Ranking
Models in Recommender Systems" (KDD 2023): the Clippy optimizers, the paper's
baselines, and the tools that watch and explain loss divergence.

Names are imported lazily, so readers (post-mortem, TensorBoard plugin, Dash)
that only need ``load_run`` never pay for importing TensorFlow.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "AGCAdagrad": "clippy_monitor.optimizers",
    "ClippingOptimizer": "clippy_monitor.optimizers",
    "ClippyAdagrad": "clippy_monitor.optimizers",
    "ClippyAdam": "clippy_monitor.optimizers",
    "GCAdagrad": "clippy_monitor.optimizers",
    "LAMBAdagrad": "clippy_monitor.optimizers",
    "DetectorConfig": "clippy_monitor.monitor",
    "DivergenceMonitor": "clippy_monitor.monitor",
    "RecoveryConfig": "clippy_monitor.monitor",
    "Thresholds": "clippy_monitor.monitor",
    "detect_divergence": "clippy_monitor.monitor",
    "hessian_top_eigenvalue": "clippy_monitor.sharpness",
    "replay": "clippy_monitor.counterfactual",
    "replay_start": "clippy_monitor.counterfactual",
    "RecordError": "clippy_monitor.record",
    "Run": "clippy_monitor.record",
    "load_run": "clippy_monitor.record",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'clippy_monitor' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
