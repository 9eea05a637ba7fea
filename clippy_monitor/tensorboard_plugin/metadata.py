"""Names shared by the plugin's backend, its front end and its tests."""

from __future__ import annotations

# Per-layer metric -> label, and how a heatmap bucket of steps is reduced (the catalog's).
from clippy_monitor.catalog import HEATMAP_REDUCE, METRIC_LABELS  # noqa: F401  (re-exported)

PLUGIN_NAME = "clippy"  # routes live under /data/plugin/clippy/
TAB_NAME = "Clippy"


# Request limits (clamped, never an error).
DEFAULT_MAX_POINTS = 2000  # per line series (min/max envelope: 2 points per bucket)
MAX_MAX_POINTS = 20_000
DEFAULT_MAX_COLUMNS = 600  # heatmap columns (buckets of steps)
MAX_MAX_COLUMNS = 4000
