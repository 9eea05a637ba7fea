"""Synthetic run records for trying the Clippy tab, its tests and benchmarks.

    python -m clippy_monitor.tensorboard_plugin.demo runs/demo
    tensorboard --logdir runs/demo

writes two runs shaped like the paper's Figure 4: ``healthy`` (Clippy, one
micro-divergence it recovers from) and ``diverged`` (no treatment: a micro
spike, then a full divergence with step-a/b/c).  Per-layer statistics follow
the paper's story: at step-b ‖g‖₂ and ‖g‖₂/‖w‖₂ grow a little while ‖r/w‖∞
jumps, so the Clippy factor falls ~2 orders of magnitude below GC/AGC; after
step-c gradients vanish (‖g‖₂ small, many zero gradients) and a few are NaN.
Data is written through :class:`clippy_monitor.record.RunWriter` in chunks,
like the ``DivergenceMonitor`` does.  No TensorFlow needed.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clippy_monitor.record import LAYER_METRICS, RunWriter

TASKS = ("click", "like")
SERIES = [
    "loss",
    *(f"loss/{t}" for t in TASKS),
    "learning_rate",
    "grad_norm",
    "detector/status",
    "detector/since_onset",
    "detector/task",
]
THRESHOLDS = {"gc_clipnorm": 0.1, "agc_clipping": 0.001, "lambda_rel": 0.1, "lambda_abs": 0.0}


@dataclass
class DemoRun:
    """Shape of a synthetic run.  Steps are ``1 .. n_steps``."""

    n_steps: int = 3000
    n_layers: int = 8
    micro: list[int] = field(default_factory=list)  # onset steps of micro-divergences
    full: int | None = None  # step_b of a full divergence (None: stays healthy)
    clippy: bool = True  # applied factor = Clippy's (else 1: no treatment)
    micro_length: int = 25  # steps until a micro spike recovers
    full_length: int = 60  # steps from step_b to step_c
    seed: int = 0

    def layer_names(self) -> list[str]:
        names = ["embedding/embeddings"]
        tower = 0
        while len(names) < self.n_layers - 2:
            names += [f"tower_{tower}/kernel", f"tower_{tower}/bias"]
            tower += 1
        names = names[: self.n_layers - 2] + ["click/kernel", "like/kernel"]
        return names[: self.n_layers]

    def events(self) -> list[dict]:
        out = [
            {
                "kind": "micro",
                "step_a": m - 1,
                "step_b": m,
                "step_c": None,
                "recovered": m + self.micro_length,
                "confirmed_at": m + 1,
                "decided_at": None,
                "task": "loss/click",
                "reason": "spike",
            }
            for m in self.micro
        ]
        if self.full is not None:
            out.append(
                {
                    "kind": "full",
                    "step_a": self.full - 1,
                    "step_b": self.full,
                    "step_c": self.full + self.full_length,
                    "recovered": None,
                    "confirmed_at": self.full + 1,
                    "decided_at": self.full + self.full_length,
                    "task": "loss/like",
                    "reason": "no_recovery",
                }
            )
        return out

    def meta(self) -> dict:
        return {
            "layers": self.layer_names(),
            "layer_metrics": list(LAYER_METRICS),
            "series": SERIES,
            "tasks": list(TASKS),
            "thresholds": THRESHOLDS,
            "detector_state_size": 0,
            "optimizer": {"class_name": "ClippyAdagrad" if self.clippy else "Adagrad"},
            "demo": True,
        }

    # -- data ------------------------------------------------------------------------

    def chunk(self, first: int, last: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(steps, layer_stats [n, M, L], series [n, S])`` for steps ``first..last``."""
        rng = np.random.default_rng((self.seed, first))
        steps = np.arange(first, last + 1, dtype=np.int64)
        t = steps.astype(np.float64)[:, None]  # [n, 1]
        shape = self._shape(t)
        stats, grad_norm = self._layer_stats(rng, t, shape)
        return steps, stats, self._series(rng, t, shape, grad_norm)

    def _shape(self, t: np.ndarray) -> dict[str, np.ndarray]:
        """``spike`` (0 healthy .. 1 at the height of a micro spike), ``ramp`` (0 before
        step_b, rising to 1 at step_c) and ``dead`` (after step_c), each ``[n, 1]``."""
        n = len(t)
        spike = np.zeros((n, 1))
        for m in self.micro:
            k = (t - m) / self.micro_length
            spike = np.maximum(
                spike, np.where((k >= 0) & (k < 1), np.sin(np.pi * np.clip(k, 0, 1)), 0)
            )
        ramp, dead = np.zeros((n, 1)), np.zeros((n, 1), bool)
        if self.full is not None:
            ramp = np.clip((t - self.full + 1) / self.full_length, 0, 1)
            dead = t > self.full + self.full_length
        return {"spike": spike, "ramp": ramp, "dead": dead}

    def _layer_stats(
        self, rng: np.random.Generator, t: np.ndarray, shape: dict
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(layer_stats [n, M, L], grad_norm [n, L])``: deeper layers move more."""
        n, n_layers = len(t), self.n_layers
        spike, ramp, dead = shape["spike"], shape["ramp"], shape["dead"]
        layer_rng = np.random.default_rng(self.seed)
        depth = np.linspace(0.0, 1.0, n_layers)[None, :]  # 0 = embedding, 1 = output
        base_grad = 10 ** layer_rng.uniform(-2.3, -1.5, n_layers)[None, :]
        base_weight = 10 ** layer_rng.uniform(1.5, 2.2, n_layers)[None, :]
        noise = np.exp(0.15 * rng.standard_normal((n, n_layers)))
        grad_norm = base_grad * noise * (1 + 6 * spike * depth) * (1 + 25 * ramp * (0.3 + depth))
        grad_norm = np.where(dead, 1e-4 * base_grad * noise, grad_norm)
        weight_norm = base_weight * (1 + 0.3 * t / max(self.n_steps, 1)) * (1 + 0.5 * ramp)
        ratio = grad_norm / weight_norm
        linf = 0.01 * noise * (1 + 60 * spike * depth) * (1 + 3000 * ramp * (0.2 + depth))
        linf = np.where(dead, 1e-4 * noise, linf)
        clippy = np.minimum(1.0, THRESHOLDS["lambda_rel"] / linf)
        gc = np.minimum(1.0, THRESHOLDS["gc_clipnorm"] / grad_norm)
        agc = np.minimum(1.0, THRESHOLDS["agc_clipping"] / ratio)
        nonfinite = np.zeros((n, n_layers))
        if self.full is not None:
            # A few non-finite gradients once fully diverged: the reader and the
            # plots must show them, not choke on them.
            broken = dead & (rng.random((n, 1)) < 0.02)
            grad_norm = np.where(broken & (depth >= 0.5), np.nan, grad_norm)
            nonfinite = np.where(broken & (depth >= 0.5), 3.0, 0.0)
        values = {
            "grad_norm": grad_norm,
            "weight_norm": weight_norm,
            "grad_weight_ratio": ratio,
            "update_weight_linf": linf,
            "gc_factor": gc,
            "agc_factor": agc,
            "clippy_factor": clippy,
            "applied_factor": clippy if self.clippy else np.ones_like(clippy),
            "nonfinite_count": nonfinite,
            "zero_grad_fraction": np.clip(0.01 * noise + np.where(dead, 0.9, 0.0), 0, 1),
        }
        return np.stack([values[m] for m in LAYER_METRICS], axis=1).astype(np.float32), grad_norm

    def _series(
        self, rng: np.random.Generator, t: np.ndarray, shape: dict, grad_norm: np.ndarray
    ) -> np.ndarray:
        """``[n, S]``: the losses (``like`` diverges, ``click`` spikes), lr, grad norm, detector."""
        n, t = len(t), t[:, 0]
        spike, ramp, dead = shape["spike"][:, 0], shape["ramp"][:, 0], shape["dead"][:, 0]
        healthy = 0.35 + 0.4 * np.exp(-t / (0.25 * max(self.n_steps, 1)))
        task_noise = 0.02 * rng.standard_normal((n, len(TASKS)))
        click = healthy * 0.6 * (1 + task_noise[:, 0]) * (1 + 1.5 * spike)
        like = healthy * 0.4 * (1 + task_noise[:, 1]) * (1 + 8 * ramp**2)
        like = np.where(dead, 3.2 + 0.05 * task_noise[:, 1], like)
        click = np.where(dead, 1.1 * (1 + task_noise[:, 0]), click)
        status, since, task = np.where(spike > 0, 1.0, 0.0), np.zeros(n), np.full(n, -1.0)
        if self.full is not None:
            status = np.where(ramp > 0, 1.0, status)
            status = np.where(t >= self.full + self.full_length, 2.0, status)
            since = np.where(ramp > 0, t - self.full, 0.0)
            task = np.where(ramp > 0, 2.0, task)
        grad = np.sqrt(np.nansum(grad_norm**2, axis=1))
        return np.stack(
            [click + like, click, like, np.full(n, 0.01), grad, status, since, task], axis=1
        )

    def write(
        self, logdir: str | os.PathLike, *, chunk: int = 1000, tensorboard: bool = True
    ) -> Path:
        """Write the run to ``logdir`` (which must not hold a record yet)."""
        logdir = Path(logdir)
        with RunWriter(logdir, self.meta(), tensorboard=tensorboard) as writer:
            for first in range(1, self.n_steps + 1, chunk):
                last = min(first + chunk - 1, self.n_steps)
                steps, stats, series = self.chunk(first, last)
                writer.append(steps, stats, series, None)
                done = [
                    e for e in self.events() if _event_end(e) <= last and _event_end(e) >= first
                ]
                if done:
                    writer.add_events(done)
        return logdir


def _event_end(event: dict) -> int:
    return event["step_c"] if event["kind"] == "full" else event["recovered"]


def write_demo_logdir(
    root: str | os.PathLike, *, n_steps: int = 3000, n_layers: int = 8, tensorboard: bool = True
) -> dict[str, Path]:
    """Two runs under ``root``: ``healthy`` and ``diverged`` (see the module docstring)."""
    root = Path(root)
    runs = {
        "healthy": DemoRun(n_steps, n_layers, micro=[int(n_steps * 0.45)], clippy=True, seed=1),
        "diverged": DemoRun(
            n_steps,
            n_layers,
            micro=[int(n_steps * 0.3)],
            full=int(n_steps * 0.7),
            clippy=False,
            seed=2,
        ),
    }
    return {name: run.write(root / name, tensorboard=tensorboard) for name, run in runs.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write demo run records for the Clippy tab.")
    parser.add_argument("logdir", type=Path)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args(argv)
    for name, path in write_demo_logdir(
        args.logdir, n_steps=args.steps, n_layers=args.layers
    ).items():
        print(f"{name}: {path}")
    print(f"now: tensorboard --logdir {args.logdir}")


if __name__ == "__main__":
    main()
