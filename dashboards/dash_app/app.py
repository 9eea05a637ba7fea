"""Build and serve the Dash app over a directory of run records."""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
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


class CannotServe(OSError):
    """``host:port`` cannot be served: the port is in use, the host unknown or not this machine's."""


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (0: any free port) and listening; :class:`CannotServe` if it cannot be."""
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise CannotServe(f"port {port!r} is not a port number (1..65535)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as werkzeug chooses
    try:
        address = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)[0][4]
    except (OSError, UnicodeError):
        raise CannotServe(f"cannot serve on host {host!r}: no such host") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
        )  # as werkzeug: restart while old connections linger
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise CannotServe(f"port {port} on {host} is in use") from None
        raise CannotServe(
            f"cannot serve on host {host!r} port {port}: {exc.strerror or exc}"
        ) from None
    return sock


def make_server(
    logdir: str | os.PathLike,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    refresh_ms: int = DEFAULT_REFRESH_MS,
):
    """A threaded werkzeug server for the app (``.serve_forever()``, ``.shutdown()``, ``.port``).

    :class:`CannotServe` if ``host:port`` cannot be bound (checked before the app is built).
    """
    from werkzeug.serving import make_server as _make_server

    sock = listening_socket(host, port)  # bound here: werkzeug would print its own text and exit
    try:
        app = create_app(logdir, refresh_ms)
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per callback request
        server = _make_server(host, port, app.server, threaded=True, fd=sock.fileno())
    finally:
        sock.close()  # the server holds its own duplicate of the socket
    server.dash_app = app
    return server


def serve(
    logdir: str | os.PathLike,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    refresh_ms: int = DEFAULT_REFRESH_MS,
) -> None:
    """Serve the app until interrupted.  Binds 127.0.0.1 unless ``host`` says otherwise;
    :class:`CannotServe` if ``host:port`` cannot be bound (in use, unknown host)."""
    server = make_server(logdir, host, port, refresh_ms)
    if not _is_loopback(host):
        print(
            f"warning: serving on {host}: anyone who can reach this port can read the runs under {logdir}",
            file=sys.stderr,
        )
    shown = f"[{host}]" if ":" in host else host
    print(
        f"clippy-monitor dash: serving {Path(logdir)} at http://{shown}:{server.port}/  (Ctrl+C to stop)",
        flush=True,
    )
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
