"""Build and serve the Dash app over a directory of run records."""

from __future__ import annotations

import ipaddress
import logging
import os
import sys
from pathlib import Path

import dash

from clippy_monitor.dashboards.dash_app.callbacks import register_callbacks
from clippy_monitor.dashboards.dash_app.data import Catalog
from clippy_monitor.dashboards.dash_app.layout import build_layout

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8050
DEFAULT_REFRESH_MS = 1000


def create_app(logdir: str | os.PathLike, refresh_ms: int = DEFAULT_REFRESH_MS) -> dash.Dash:
    """The app over the runs under ``logdir``; the Live view polls every ``refresh_ms``.

    Only runs inside ``logdir`` are served (see ``data.Catalog.resolve``).
    Debug mode and dev tools stay off; everything is served locally (no CDN).
    """
    if int(refresh_ms) < 100:
        raise ValueError(f"refresh_ms must be >= 100, got {refresh_ms}")
    catalog = Catalog(logdir)
    app = dash.Dash(
        __name__,
        assets_folder=str(ASSETS),
        title="clippy-monitor",
        update_title=None,
        serve_locally=True,
        enable_mcp=False,
    )
    app.layout = build_layout(str(catalog.logdir), int(refresh_ms))
    register_callbacks(app, catalog)
    app.clippy_catalog = catalog  # for tests and embedding
    return app


def make_server(
    logdir: str | os.PathLike,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    refresh_ms: int = DEFAULT_REFRESH_MS,
):
    """A threaded werkzeug server for the app (``.serve_forever()``, ``.shutdown()``, ``.port``)."""
    from werkzeug.serving import make_server as _make_server

    app = create_app(logdir, refresh_ms)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per callback request
    server = _make_server(host, port, app.server, threaded=True)
    server.dash_app = app
    return server


def serve(
    logdir: str | os.PathLike,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    refresh_ms: int = DEFAULT_REFRESH_MS,
) -> None:
    """Serve the app until interrupted.  Binds 127.0.0.1 unless ``host`` says otherwise."""
    server = make_server(logdir, host, port, refresh_ms)
    if not _is_loopback(host):
        print(
            f"warning: serving on {host}: anyone who can reach this port can read the runs under {logdir}",
            file=sys.stderr,
        )
    shown = f"[{host}]" if ":" in host else host
    print(f"clippy-monitor dash: serving {Path(logdir)} at http://{shown}:{server.port}/  (Ctrl+C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
