"""The clippy-monitor Dash app: live view, step-a/b/c replay and run comparison.

``clippy-monitor dash --logdir DIR`` serves it (see docs/DASH.md); in Python::

    from clippy_monitor.dashboards.dash_app import create_app, serve
    serve("runs")                       # http://127.0.0.1:8050/
    app = create_app("runs", refresh_ms=1000)   # a dash.Dash, to embed or test

Importing this package does not import Dash (nor TensorFlow); ``create_app`` does.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app", "make_server", "serve"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from clippy_monitor.dashboards.dash_app import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
