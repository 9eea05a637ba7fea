"""Benchmark the post-mortem on a long record: 1,000,000 steps x 32 layers by default.

    python benchmarks/postmortem_speed.py                   # analysis (JSON report), median of 3
    python benchmarks/postmortem_speed.py --html            # also time the HTML report
    python benchmarks/postmortem_speed.py --steps 100000 --layers 8 --repeats 5

The record is written with ``RunWriter`` (no TensorBoard scalars) in a temp dir,
shaped like the paper's Figure 4: healthy noise, then layer ``tower_3/kernel``
leaves its baseline 40 steps before step-b (at 90% of the run), every layer's
statistics jump at step-b, the loss fully diverges at step-c and the gradients
then collapse (dead units).  Timings are wall-clock medians, the record in the
page cache (it was just written): ``load_run`` + ``build_report`` is what
``clippy-monitor postmortem RUN --json`` does after start-up; the CLI column runs
exactly that command in a fresh process (so it includes Python start-up and imports).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clippy_monitor.record import LAYER_METRICS, RunWriter, load_run
from clippy_monitor.tensorboard_plugin.demo import SERIES, TASKS

LEAD = 40  # steps before step-b at which the culprit layer leaves its baseline


def layer_names(n: int) -> list[str]:
    names = ["embedding/embeddings"]
    i = 0
    while len(names) < n:
        names += [f"tower_{i}/kernel", f"tower_{i}/bias"]
        i += 1
    return names[:n]


@dataclass(frozen=True)
class Shape:
    """Where the synthetic divergence happens: step-b, step-c and the culprit layer's index."""

    step_b: int
    step_c: int
    culprit: int


def layer_stats(
    t: np.ndarray, shape: Shape, noise: np.ndarray, base_g: np.ndarray, base_w: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(stats [n, M, L], grad_norm [n, L])`` for steps ``t`` (``[n, 1]``)."""
    n, n_layers = noise.shape
    m = {name: i for i, name in enumerate(LAYER_METRICS)}
    jump = np.where((t >= shape.step_b) & (t < shape.step_c), 30.0, 1.0)
    early = np.zeros((n, n_layers))
    early[:, shape.culprit] = np.clip((t[:, 0] - (shape.step_b - LEAD)) / LEAD, 0, 1) * (
        t[:, 0] < shape.step_c
    )
    dead = t >= shape.step_c
    g = np.where(dead, 1e-6, base_g * noise * jump * (1 + 50 * early))
    stats = np.empty((n, len(LAYER_METRICS), n_layers), np.float32)
    stats[:, m["grad_norm"]] = g
    stats[:, m["weight_norm"]] = base_w
    stats[:, m["grad_weight_ratio"]] = g / base_w
    stats[:, m["update_weight_linf"]] = np.where(
        dead, 1e-6, 0.01 * noise * jump * (1 + 500 * early)
    )
    stats[:, m["gc_factor"]] = np.where(dead, 1.0, np.minimum(1, 0.5 * noise / jump))
    stats[:, m["agc_factor"]] = np.where(dead, 1.0, np.minimum(1, 0.8 * noise / jump))
    stats[:, m["clippy_factor"]] = np.where(
        dead, 1.0, np.minimum(1, noise / (jump**2 * (1 + 500 * early)))
    )
    stats[:, m["applied_factor"]] = 1.0
    stats[:, m["nonfinite_count"]] = 0.0
    stats[:, m["zero_grad_fraction"]] = np.where(dead, 0.9, 0.02)
    return stats, g


def series_rows(t: np.ndarray, shape: Shape, loss_noise: np.ndarray, g: np.ndarray) -> np.ndarray:
    """``[n, S]`` in ``SERIES`` order: the losses, lr, grad norm and the detector's state."""
    n = len(t)
    tasks = 0.5 * loss_noise * np.where(t >= shape.step_b, 20.0, 1.0)
    status = np.where(t[:, 0] >= shape.step_c, 2.1, np.where(t[:, 0] >= shape.step_b, 1.0, 0.0))
    since = np.where(t[:, 0] >= shape.step_b, t[:, 0] - shape.step_b, -1)
    return np.column_stack(
        [
            tasks.sum(1),
            tasks,
            np.full(n, 0.1),
            np.linalg.norm(g, axis=1),
            status,
            since,
            np.where(since >= 0, 2, -1),
        ]
    )


def write_record(
    logdir: Path, n_steps: int, n_layers: int, *, chunk: int = 50_000, seed: int = 0
) -> dict:
    """Write the synthetic record; returns its event (step-a/b/c, culprit layer)."""
    layers = layer_names(n_layers)
    step_b = int(n_steps * 0.9)
    shape = Shape(step_b=step_b, step_c=step_b + 100, culprit=min(7, n_layers - 1))
    event = {
        "kind": "full",
        "step_a": step_b - 1,
        "step_b": step_b,
        "step_c": shape.step_c,
        "recovered": None,
        "task": "loss/like",
        "reason": "no_recovery",
    }
    meta = {
        "layers": layers,
        "layer_metrics": list(LAYER_METRICS),
        "series": SERIES,
        "tasks": list(TASKS),
        "detector_state_size": 0,
    }
    rng = np.random.default_rng(seed)
    base_g = 10 ** rng.uniform(-2, -1, n_layers)
    base_w = 10 ** rng.uniform(0.5, 1.5, n_layers)
    with RunWriter(logdir, meta, tensorboard=False) as writer:
        for first in range(0, n_steps, chunk):
            steps = np.arange(first, min(first + chunk, n_steps), dtype=np.int64)
            t = steps[:, None]
            noise = np.exp(0.1 * rng.standard_normal((len(steps), n_layers)))
            stats, g = layer_stats(t, shape, noise, base_g, base_w)
            # Drawn after the layer noise, as before, so a seed gives the same record.
            loss_noise = np.exp(0.05 * rng.standard_normal((len(steps), len(TASKS))))
            writer.append(steps, stats, series_rows(t, shape, loss_noise, g), None)
        writer.add_events([event])
    return {**event, "culprit": layers[shape.culprit]}


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--html", action="store_true", help="also time the HTML report")
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="where to write the temp record (default: system temp)",
    )
    args = parser.parse_args(argv)

    from clippy_monitor.postmortem import build_report

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        logdir = Path(tmp) / "run"
        start = time.perf_counter()
        truth = write_record(logdir, args.steps, args.layers)
        size = sum(f.stat().st_size for f in logdir.iterdir()) / 2**20
        print(
            f"record: {args.steps:,} steps x {args.layers} layers, {size:,.0f} MiB, "
            f"written in {time.perf_counter() - start:.1f} s"
        )

        report = {}

        def analyse() -> None:
            report.update(build_report(load_run(logdir)))

        results = {"load_run + build_report": _time(analyse, args.repeats)}
        assert report["events"][0]["step_b"] == truth["step_b"], report["events"]
        assert report["culprits"][0] == truth["culprit"], report["culprits"][:3]
        cli = [sys.executable, "-m", "clippy_monitor.cli", "postmortem", str(logdir), "--json"]
        results["CLI --json (fresh process)"] = _time(
            lambda: subprocess.run(cli, check=True, capture_output=True), args.repeats
        )
        if args.html:
            from clippy_monitor.postmortem.html import render_html

            run = load_run(logdir)
            rep = build_report(run)
            results["render_html (report built)"] = _time(
                lambda: render_html(run, rep), args.repeats
            )
        for name, times in results.items():
            print(
                f"{name:30s} median {statistics.median(times):6.2f} s   (runs: {', '.join(f'{t:.2f}' for t in times)})"
            )
        print(f"verdict: {report['verdict']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
