"""Benchmark the Clippy TensorBoard plugin's routes on a 100,000-step, 32-layer run.

    python benchmarks/tensorboard_routes.py                  # 100k steps x 32 layers
    python benchmarks/tensorboard_routes.py --steps 1000000  # bigger
    python benchmarks/tensorboard_routes.py --repeats 9 --dir /some/disk

Each route is called through the plugin's WSGI apps (werkzeug test client,
``Accept-Encoding: gzip`` like a browser, so JSON encoding and compression
count).  "uncached" requests vary a parameter so that no memoised payload is
reused; "cached" repeat the same request.  "first" is the first request after
the plugin starts (it reads the whole record).  "after append" appends one
1000-step chunk to the live run before each request (incremental read).
Timings are medians over ``--repeats`` requests.  The goal: every route < 1 s.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tensorboard.plugins import base_plugin  # noqa: E402
from werkzeug.test import Client  # noqa: E402

from clippy_monitor.record import RunWriter  # noqa: E402
from clippy_monitor.tensorboard_plugin.demo import DemoRun  # noqa: E402
from clippy_monitor.tensorboard_plugin.plugin import ClippyPlugin  # noqa: E402

HEATMAP_METRICS = (
    "grad_norm",
    "grad_weight_ratio",
    "update_weight_linf",
    "gc_factor",
    "agc_factor",
    "clippy_factor",
    "applied_factor",
)


class Routes:
    """A plugin over ``logdir`` and one werkzeug client per route."""

    def __init__(self, logdir: Path):
        self.plugin = ClippyPlugin(base_plugin.TBContext(logdir=str(logdir)))
        self.clients = {route: Client(app) for route, app in self.plugin.get_plugin_apps().items()}

    def get(self, route: str, **params) -> float:
        """Seconds for one request (the body is read; status must be 200)."""
        start = time.perf_counter()
        response = self.clients[route].get(
            route, query_string=params, headers={"Accept-Encoding": "gzip"}
        )
        body = response.get_data()
        elapsed = time.perf_counter() - start
        if response.status_code != 200:
            raise RuntimeError(f"{route} {params}: HTTP {response.status_code}: {body[:200]!r}")
        return elapsed


def write_run(logdir: Path, n_steps: int, n_layers: int) -> DemoRun:
    run = DemoRun(n_steps, n_layers, micro=[n_steps // 3], full=int(n_steps * 0.7), clippy=False)
    run.write(logdir, tensorboard=False)
    return run


def median_ms(times: list[float]) -> str:
    return f"{statistics.median(times) * 1e3:8.1f} ms (max {max(times) * 1e3:.1f})"


def time_first_requests(routes: Routes) -> dict[str, list[float]]:
    """The first requests after the plugin starts: they read the record."""
    return {
        "runs (first)": [routes.get("/runs")],
        "summary (first: reads the record)": [routes.get("/summary", run="big")],
        "heatmap grad_norm (first: assembles the metric)": [
            routes.get("/heatmap", run="big", metric="grad_norm", max_columns=600)
        ],
    }


def time_series(routes: Routes, n: int, rep: range) -> dict[str, list[float]]:
    """The run list, the summary and the scalar series, uncached and cached."""
    return {
        "runs": [routes.get("/runs") for _ in rep],
        "summary": [routes.get("/summary", run="big") for _ in rep],
        "series, all steps, uncached": [
            routes.get("/series", run="big", max_points=2000 + i) for i in rep
        ],
        "series, zoomed 1000 steps, uncached": [
            routes.get("/series", run="big", start=n // 2 + i, end=n // 2 + i + 1000) for i in rep
        ],
        "series, cached": [routes.get("/series", run="big") for _ in rep],
    }


def time_heatmaps(routes: Routes, rep: range) -> dict[str, list[float]]:
    """Each heatmap metric (its first use assembles it, then uncached), wider, zoomed, cached."""
    results = {}
    for metric in HEATMAP_METRICS:
        routes.get("/heatmap", run="big", metric=metric, max_columns=10)
        results[f"heatmap {metric}, all steps, 600 cols, uncached"] = [
            routes.get("/heatmap", run="big", metric=metric, max_columns=600 + i) for i in rep
        ]
    results["heatmap grad_norm, 2000 cols, uncached"] = [
        routes.get("/heatmap", run="big", metric="grad_norm", max_columns=2000 - i) for i in rep
    ]
    results["heatmap grad_norm, zoomed, uncached"] = [
        routes.get("/heatmap", run="big", metric="grad_norm", start=1000 + i, end=21000)
        for i in rep
    ]
    results["heatmap cached"] = [
        routes.get("/heatmap", run="big", metric="grad_norm", max_columns=600) for _ in rep
    ]
    return results


def time_layers(routes: Routes, n: int, rep: range) -> dict[str, list[float]]:
    """The per-layer bars at a step, and at the extreme step of a bucket."""
    return {
        "layers at a step": [routes.get("/layers", run="big", step=n // 3 + i) for i in rep],
        "layers, pick extreme step in a bucket": [
            routes.get(
                "/layers",
                run="big",
                step=n // 2,
                until=n // 2 + 170 + i,
                layer=5,
                metric="clippy_factor",
            )
            for i in rep
        ],
    }


def page_load_burst(routes: Routes, n: int) -> float:
    """What the tab does on load: every heatmap at once, from parallel threads
    (TensorBoard's server is threaded).  Latency of the slowest of them."""
    routes.plugin._catalog.view("big")._derived.clear()  # nothing memoised
    with ThreadPoolExecutor(len(HEATMAP_METRICS) + 2) as pool:
        jobs = [
            pool.submit(routes.get, "/heatmap", run="big", metric=m, max_columns=600)
            for m in HEATMAP_METRICS
        ]
        jobs.append(pool.submit(routes.get, "/series", run="big"))
        jobs.append(pool.submit(routes.get, "/layers", run="big", step=n // 2))
        return max(job.result() for job in jobs)


def time_after_append(
    routes: Routes, logdir: Path, demo: DemoRun, n: int, rep: range
) -> dict[str, list[float]]:
    """Live: append a 1000-step chunk, then the tab's requests see it (incremental read)."""
    after: dict[str, list[float]] = {"summary": [], "heatmap grad_norm": [], "series": []}
    with RunWriter(logdir, demo.meta(), tensorboard=False) as writer:
        for i in rep:
            first = n + 1 + i * 1000
            steps, stats, series = demo.chunk(first, first + 999)
            writer.append(steps, stats, series, None)
            after["summary"].append(routes.get("/summary", run="big"))
            after["heatmap grad_norm"].append(
                routes.get("/heatmap", run="big", metric="grad_norm", max_columns=600)
            )
            after["series"].append(routes.get("/series", run="big"))
    return {f"after append: {key}": times for key, times in after.items()}


def time_static(routes: Routes, rep: range) -> dict[str, list[float]]:
    """The tab's JavaScript and Plotly (gzipped once, then served from memory)."""
    return {
        "index.js": [routes.get("/index.js") for _ in rep],
        "plotly.min.js (first: gzip once)": [routes.get("/plotly.min.js")],
        "plotly.min.js": [routes.get("/plotly.min.js") for _ in rep],
    }


def print_results(results: dict[str, list[float]]) -> None:
    """One line per route, then the slowest median against the 1 s budget."""
    width = max(len(k) for k in results)
    worst = 0.0
    for key, times in results.items():
        worst = max(worst, statistics.median(times))
        print(f"  {key:<{width}} {median_ms(times)}")
    print(f"slowest median: {worst * 1e3:.0f} ms ({'OK' if worst < 1 else 'OVER'} the 1 s budget)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: temp)")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="clippy_tb_bench_", dir=args.dir))
    try:
        start = time.perf_counter()
        demo = write_run(root / "big", args.steps, args.layers)
        size = (root / "big" / "clippy_record.bin").stat().st_size
        print(
            f"{args.steps:,} steps x {args.layers} layers: wrote {size / 2**20:,.0f} MiB "
            f"in {time.perf_counter() - start:.1f} s; medians of {args.repeats} requests"
        )
        n, rep = args.steps, range(args.repeats)
        routes = Routes(root)
        results = time_first_requests(routes)
        results.update(time_series(routes, n, rep))
        results.update(time_heatmaps(routes, rep))
        results.update(time_layers(routes, n, rep))
        results["page load burst: slowest of 7 heatmaps + series + layers"] = [
            page_load_burst(routes, n) for _ in rep
        ]
        results.update(time_after_append(routes, root / "big", demo, n, rep))
        results.update(time_static(routes, rep))
        print_results(results)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
