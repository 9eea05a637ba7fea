"""Names shared by the plugin's backend, its front end and its tests."""

from __future__ import annotations
from clippy_monitor.record.format import METRIC_LABELS  # noqa: F401  (re-exported for the readers)

PLUGIN_NAME = "clippy"  # routes live under /data/plugin/clippy/
TAB_NAME = "Clippy"

# Heatmaps: per-layer metric -> how a bucket of steps is reduced for display.
# Large values are the alarm for magnitudes; small values (strong clipping)
# for factors, so factor buckets keep their minimum.
HEATMAP_REDUCE = {
    "grad_norm": "max",
    "weight_norm": "max",
    "grad_weight_ratio": "max",
    "update_weight_linf": "max",
    "gc_factor": "min",
    "agc_factor": "min",
    "clippy_factor": "min",
    "applied_factor": "min",
    "nonfinite_count": "max",
    "zero_grad_fraction": "max",
}


# Request limits (clamped, never an error).
DEFAULT_MAX_POINTS = 2000  # per line series (min/max envelope: 2 points per bucket)
MAX_MAX_POINTS = 20_000
DEFAULT_MAX_COLUMNS = 600  # heatmap columns (buckets of steps)
MAX_MAX_COLUMNS = 4000
