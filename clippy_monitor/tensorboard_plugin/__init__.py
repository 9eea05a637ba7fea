"""The "Clippy" TensorBoard tab: per-layer statistics and divergence events of our run records.

TensorBoard finds :class:`~clippy_monitor.tensorboard_plugin.plugin.ClippyPlugin`
through the ``tensorboard_plugins`` entry point declared in pyproject.toml.
The backend (``plugin.py``: HTTP routes; ``data.py``: cached, live-updating
views of run records and the JSON payloads) reads our run records directly,
not TensorBoard's sampled event data; the front end is the ES module
``static/index.js`` inside this package.  See docs/TENSORBOARD.md.

Importing this package is cheap: no TensorFlow, no TensorBoard.
"""

from clippy_monitor.tensorboard_plugin.metadata import PLUGIN_NAME

__all__ = ["PLUGIN_NAME"]
