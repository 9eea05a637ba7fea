"""Time the Dash app's data-shaping callbacks on a 100,000-step, 32-layer run.

    python benchmarks/dash_speed.py                     # 100k steps x 32 layers
    python benchmarks/dash_speed.py --steps 300000 --repeats 9 --dir /some/disk

Two records are written with :class:`clippy_monitor.record.RunWriter` (through
the demo's ``DemoRun``): ``naive`` (a micro-divergence, then a full divergence)
and ``clippy`` (one micro-divergence).  The callbacks' ``render_*`` functions
are called directly (no browser, no HTTP), and their outputs are serialised
with Dash's own JSON encoder, since that is part of every response.

* **first paint** -- a fresh app: the run list, then the Live view of ``naive``
  (reads the whole record: that is the first poll of its ``RunFollower``).
* **live refresh** -- one 100-step flush is appended to the live run, then the
  Live view is refreshed (reads only the new chunk).  Also the refresh when
  nothing changed (what every ``dcc.Interval`` tick costs).
* **replay** -- opening the replay of the full divergence, moving the slider.
* **compare** -- the two runs side by side.

Targets (issue 7): first paint < 2 s, live refresh < 300 ms.  Timings are
medians over ``--repeats`` (the page cache is warm after the first repeat,
as it is for a run that was just written).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from clippy_monitor.dashboards.dash_app import callbacks as C  # noqa: E402
from clippy_monitor.dashboards.dash_app import data as D  # noqa: E402
from dash._utils import to_json  # noqa: E402

from clippy_monitor.record import RunWriter, load_run  # noqa: E402
from clippy_monitor.tensorboard_plugin.demo import DemoRun  # noqa: E402


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    if out is not None:
        to_json(out)  # what Dash sends back
    return time.perf_counter() - start, out


def first_paint(root: Path) -> float:
    """A new app's first answer: the run list, then the Live view of the diverged run."""
    start = time.perf_counter()
    catalog = D.Catalog(root)
    runs = C.render_runs(catalog, None, None, None)
    to_json(runs["options"])
    live = C.render_live(catalog, "naive", None)
    to_json(live)
    assert "Fully diverged" in str(live["badge"])
    return time.perf_counter() - start


def fmt(times: list[float]) -> str:
    return f"{statistics.median(times) * 1e3:8.1f} ms  (min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f})"


def write_runs(root: Path, n: int, n_layers: int) -> DemoRun:
    """Write ``naive`` (micro then full divergence) and ``clippy``; returns ``naive``'s shape."""
    naive = DemoRun(n, n_layers, micro=[n // 3], full=int(n * 0.7), clippy=False, seed=2)
    naive.write(root / "naive", chunk=1000, tensorboard=False)
    DemoRun(n, n_layers, micro=[n // 2], clippy=True, seed=1).write(
        root / "clippy", chunk=1000, tensorboard=False
    )
    return naive


def time_live_refresh(
    root: Path, catalog: D.Catalog, naive: DemoRun, n: int, rep: range
) -> dict[str, list[float]]:
    """A writer keeps appending 100-step flushes to the live run; the Live view follows."""
    shown = C.render_live(catalog, "naive", None)["shown"]
    refresh, idle, rows = [], [], []
    with RunWriter(root / "naive", naive.meta(), tensorboard=False) as writer:
        last = n
        for _ in rep:
            steps, stats, series = naive.chunk(last + 1, last + 100)
            writer.append(steps, stats, series, None)
            last += 100
            elapsed, out = timed(lambda shown=shown: C.render_live(catalog, "naive", shown))
            shown = out["shown"]
            refresh.append(elapsed)
            rows.append(catalog.opened("naive").last_delta_rows)
            idle.append(timed(lambda shown=shown: C.render_live(catalog, "naive", shown))[0])
    assert all(r == 100 for r in rows), rows  # incremental: only the new chunk was read
    assert shown["last_step"] == last
    return {
        "live refresh after a 100-step flush (reads 100 rows)": refresh,
        "live refresh, nothing new (an idle interval tick)": idle,
    }


def time_replay(root: Path, catalog: D.Catalog, rep: range) -> dict[str, list[float]]:
    """Opening the replay of the full divergence, moving its slider, its post-mortem summary."""
    live = catalog.live("naive")
    key = next(e["key"] for e in D.episodes(live) if e["kind"] == "full")
    step_b = int(key.split(":")[1])

    def open_replay():
        fresh = D.Catalog(root)
        fresh.live("naive")  # the Live view has already read the run
        start = time.perf_counter()
        out = [
            C.render_episodes(fresh, "naive", None),
            C.render_replay_controls(fresh, "naive", key, "replay-episode", None, False),
            C.render_replay(fresh, "naive", key, step_b),
            C.render_figure4(fresh, "naive", key, live.layers[-1]),
        ]
        to_json(out)
        return time.perf_counter() - start

    return {
        "replay: open the episode (window, bars, Figure 4b)": [open_replay() for _ in rep],
        "replay: move the slider one frame": [
            timed(lambda i=i: C.render_replay(catalog, "naive", key, step_b + i))[0] for i in rep
        ],
        "replay: post-mortem summary (reads the whole record)": [
            timed(lambda: C.render_summary(catalog, "naive", key, None))[0] for _ in rep
        ],
    }


def check_peak_kept(root: Path, catalog: D.Catalog) -> None:
    """Downsampling keeps the spike: the loss figure holds the record's maximum, at its step."""
    record = load_run(root / "naive")
    loss = record.series("loss")
    fig = D.live_loss_figure(catalog.live("naive"))
    trace = fig["data"][0]
    peak = int(np.nanargmax(loss))
    assert int(record.steps[peak]) in trace["x"]
    assert max(y for y in trace["y"] if y is not None) == float(loss[peak])
    print(
        f"\nloss plot: {len(trace['x'])} of {len(loss):,} points, "
        f"peak {loss[peak]:.3f} at step {record.steps[peak]} kept"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to write (default: a temp dir)"
    )
    args = parser.parse_args()
    n, rep = args.steps, range(args.repeats)

    root = Path(tempfile.mkdtemp(prefix="clippy_dash_bench_", dir=args.dir))
    try:
        start = time.perf_counter()
        naive = write_runs(root, n, args.layers)
        size = (root / "naive" / "clippy_record.bin").stat().st_size
        print(
            f"{n:,} steps x {args.layers} layers per run: {size / 2**20:,.0f} MiB each, "
            f"written in {time.perf_counter() - start:.1f} s"
        )
        print(f"medians of {args.repeats} repeats\n")
        results: dict[str, list[float]] = {}
        results["first paint (run list + Live view, reads the record)"] = [
            first_paint(root) for _ in rep
        ]
        catalog = D.Catalog(root)
        results.update(time_live_refresh(root, catalog, naive, n, rep))
        results.update(time_replay(root, catalog, rep))
        results["compare: naive vs clippy"] = [
            timed(lambda: C.render_compare(catalog, ["naive", "clippy"], None))[0] for _ in rep
        ]

        width = max(len(k) for k in results)
        for name, values in results.items():
            print(f"{name:<{width}}  {fmt(values)}")
        check_peak_kept(root, catalog)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
