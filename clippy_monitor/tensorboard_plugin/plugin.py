"""TensorBoard backend of the Clippy tab: HTTP routes under ``/data/plugin/clippy/``.

TensorBoard loads :class:`ClippyPlugin` through the ``tensorboard_plugins``
entry point (pyproject.toml), so ``tensorboard --logdir runs`` shows the tab
with no flags.  The tab is an iframe that imports ``index.js`` (an ES module
shipped in this package's ``static/`` folder) and calls its
``render()``; everything it fetches is relative to this prefix:

=================  ===========================================================
``/index.js``      the front end (ES module)
``/plotly.min.js`` plotly.js from the installed ``plotly`` package (no CDN)
``/runs``          runs in the logdir holding a record (cheap: meta only)
``/summary``       ``run``: layers, metrics, tasks, events, step count, status,
                   recovery (what the recovery ladder did, or null)
``/series``        ``run`` [``names``, ``start``, ``end``, ``max_points``]:
                   loss and task losses (min/max envelope) with events,
                   and sharpness at the probed steps (or null)
``/heatmap``       ``run``, ``metric`` [``start``, ``end``, ``max_columns``,
                   ``reduce``]: layers x step buckets (bucket max / min)
``/layers``        ``run``, ``step`` [``until``, ``layer``, ``metric``]:
                   every layer's statistics at one step (Figure 4b)
=================  ===========================================================

Data comes from our run records (:mod:`clippy_monitor.tensorboard_plugin.data`),
not from TensorBoard's sampled event data, so every step reaches the tab.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import json
import re
import threading
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from tensorboard import errors
from tensorboard.backend import http_util
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from clippy_monitor.record import RecordError, RunRefused
from clippy_monitor.tensorboard_plugin import data
from clippy_monitor.tensorboard_plugin.metadata import (
    DEFAULT_MAX_COLUMNS,
    DEFAULT_MAX_POINTS,
    MAX_MAX_COLUMNS,
    MAX_MAX_POINTS,
    PLUGIN_NAME,
    TAB_NAME,
)

_JS = "application/javascript"
_JSON = "application/json"
_INTEGER = re.compile(r"[+-]?[0-9]+")  # ASCII digits only (int() would also take "1_0", " 5")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # the range of a recorded step


class ClippyPlugin(base_plugin.TBPlugin):
    """Per-layer statistics, factors and divergence events of clippy run records."""

    plugin_name = PLUGIN_NAME
    scan_ttl = 5.0  # seconds between scans of the logdir for new runs

    def __init__(self, context: base_plugin.TBContext):
        self._catalog = data.Catalog(getattr(context, "logdir", None), ttl=self.scan_ttl)
        self._static_lock = threading.Lock()
        self._plotly_gz: bytes | None = None

    # -- TBPlugin ------------------------------------------------------------------------

    def get_plugin_apps(self):
        return {
            "/index.js": self._serve_index_js,
            "/plotly.min.js": self._serve_plotly,
            "/runs": self._serve_runs,
            "/summary": self._serve_summary,
            "/series": self._serve_series,
            "/heatmap": self._serve_heatmap,
            "/layers": self._serve_layers,
        }

    def is_active(self) -> bool:
        """True when a run under the logdir holds a clippy record (scan cached for 5 s)."""
        return bool(self._catalog.runs())

    def frontend_metadata(self):
        # disable_reload: the tab refreshes itself (its "live" switch polls the
        # record); TensorBoard's reload button would do nothing for an iframe.
        return base_plugin.FrontendMetadata(
            es_module_path="/index.js", tab_name=TAB_NAME, disable_reload=True
        )

    def data_plugin_names(self):
        return ()  # we read our records, not TensorBoard summaries: is_active() decides

    # -- static files --------------------------------------------------------------------

    @wrappers.Request.application
    def _serve_index_js(self, request):
        source = resources.files(__package__).joinpath("static", "index.js")
        return http_util.Respond(request, source.read_bytes(), _JS)

    @wrappers.Request.application
    def _serve_plotly(self, request):
        with self._static_lock:
            if self._plotly_gz is None:
                self._plotly_gz = gzip.compress(plotly_js_path().read_bytes(), 6, mtime=0)
        return http_util.Respond(
            request, self._plotly_gz, _JS, content_encoding="gzip", expires=24 * 3600
        )

    # -- data ------------------------------------------------------------------------------

    @wrappers.Request.application
    def _serve_runs(self, request):
        return _json(request, data.runs_payload(self._catalog))

    @wrappers.Request.application
    def _serve_summary(self, request):
        with self._view(request) as (name, view):
            payload = data.summary_payload(name, view)
        return _json(request, payload)

    @wrappers.Request.application
    def _serve_series(self, request):
        with self._view(request) as (name, view):
            names = [n for n in request.args.get("names", "").split(",") if n] or None
            payload = _call(
                data.series_payload,
                name,
                view,
                names,
                _int_arg(request, "start"),
                _int_arg(request, "end"),
                _clamped(request, "max_points", DEFAULT_MAX_POINTS, 2, MAX_MAX_POINTS),
            )
        return _json(request, payload)

    @wrappers.Request.application
    def _serve_heatmap(self, request):
        with self._view(request) as (name, view):
            payload = _call(
                data.heatmap_payload,
                name,
                view,
                _required(request, "metric"),
                _int_arg(request, "start"),
                _int_arg(request, "end"),
                _clamped(request, "max_columns", DEFAULT_MAX_COLUMNS, 1, MAX_MAX_COLUMNS),
                request.args.get("reduce") or None,
            )
        return _json(request, payload)

    @wrappers.Request.application
    def _serve_layers(self, request):
        with self._view(request) as (name, view):
            payload = _call(
                data.layer_table_payload,
                name,
                view,
                _int_arg(request, "step", required=True),
                _int_arg(request, "until"),
                _int_arg(request, "layer"),
                request.args.get("metric") or None,
            )
        return _json(request, payload)

    @contextlib.contextmanager
    def _view(self, request) -> Iterator[tuple[str, data.RunView]]:
        """``(name, view)`` of the request's run, held for the ``with`` block (never closed under it)."""
        name = _required(request, "run")
        with contextlib.ExitStack() as stack:
            try:  # only opening is translated: the block's own errors pass through
                view = stack.enter_context(self._catalog.open_view(name))
            except KeyError:
                raise errors.NotFoundError(f"no clippy run {name!r} in the logdir") from None
            except RunRefused as exc:
                raise errors.PermissionDeniedError(str(exc)) from None
            except (RecordError, OSError) as exc:
                raise errors.NotFoundError(f"run {name!r}: {exc}") from None
            yield name, view


def plotly_js_path() -> Path:
    """plotly.min.js inside the installed ``plotly`` package (found without importing plotly)."""
    spec = importlib.util.find_spec("plotly")
    if spec is None or not spec.submodule_search_locations:
        raise errors.NotFoundError("the plotly package is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise errors.NotFoundError(f"{path} is missing from the plotly package")
    return path


def _json(request, payload):
    # Payloads are already JSON-safe (non-finite numbers replaced, see data.py);
    # allow_nan=False makes sure no NaN literal (invalid JSON) ever goes out.
    body = json.dumps(payload, allow_nan=False, separators=(",", ":"))
    return http_util.Respond(request, body, _JSON)


def _call(fn, *args):
    try:
        return fn(*args)
    except KeyError as exc:
        raise errors.NotFoundError(str(exc.args[0]) if exc.args else "not found") from None
    except ValueError as exc:
        raise errors.InvalidArgumentError(str(exc)) from None


def _required(request, key: str) -> str:
    value = request.args.get(key)
    if not value:
        raise errors.InvalidArgumentError(f"missing query parameter {key!r}")
    return value


def _int_arg(request, key: str, *, required: bool = False) -> int | None:
    """Query parameter ``key`` as an int64 (None if absent); 400 unless it is ``[+-]digits``.

    Parsed as an integer, never through float: no rounding, no inf or NaN.
    """
    value = request.args.get(key)
    if value is None:
        if required:
            raise errors.InvalidArgumentError(f"missing query parameter {key!r}")
        return None
    shown = repr(value) if len(value) <= 40 else repr(value[:40]) + "..."
    if not _INTEGER.fullmatch(value):
        raise errors.InvalidArgumentError(
            f"query parameter {key}={shown}: not an integer (digits only)"
        )
    digits = value.lstrip("+-").lstrip("0") or "0"  # int() refuses strings over 4300 digits
    sign = -1 if value.startswith("-") else 1
    number = sign * int(digits) if len(digits) <= 19 else None  # int64 has at most 19 digits
    if number is None or not INT64_MIN <= number <= INT64_MAX:
        raise errors.InvalidArgumentError(
            f"query parameter {key}={shown}: out of range (-2**63 .. 2**63-1)"
        )
    return number


def _clamped(request, key: str, default: int, low: int, high: int) -> int:
    value = _int_arg(request, key)
    return default if value is None else min(max(value, low), high)
