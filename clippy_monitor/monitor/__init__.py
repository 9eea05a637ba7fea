"""Divergence monitoring: per-layer reductions in the train step, a device buffer,
statistics and detectors over the buffered steps at each flush, and the
``DivergenceMonitor`` callback that writes them to the run record."""

from clippy_monitor.monitor.callback import DivergenceMonitor
from clippy_monitor.monitor.detectors import (
    DetectorConfig,
    DivergenceDetector,
    EventTracker,
    detect_divergence,
)
from clippy_monitor.monitor.recovery import RecoveryConfig
from clippy_monitor.monitor.statistics import Thresholds

__all__ = [
    "DetectorConfig",
    "DivergenceDetector",
    "DivergenceMonitor",
    "EventTracker",
    "RecoveryConfig",
    "Thresholds",
    "detect_divergence",
]
