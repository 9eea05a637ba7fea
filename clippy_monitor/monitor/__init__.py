"""Divergence monitoring: per-layer statistics and detectors in the train step,
a device buffer, and the ``DivergenceMonitor`` callback that flushes it to the run record."""

from clippy_monitor.monitor.callback import DivergenceMonitor
from clippy_monitor.monitor.detectors import DetectorConfig, DivergenceDetector, EventTracker, detect_divergence
from clippy_monitor.monitor.statistics import Thresholds

__all__ = ["DetectorConfig", "DivergenceDetector", "DivergenceMonitor", "EventTracker", "Thresholds", "detect_divergence"]
