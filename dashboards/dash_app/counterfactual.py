"""The Compare view's counterfactual replays: a run and each of its replays, losses overlaid.

A replay record is ``<run>/replay-<name>`` (:mod:`clippy_monitor.replay_reading`), so
the run list shows it as a run of its own; picking either the original or one of its
replays shows the original with every replay.  Plain data, no Dash.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from clippy_monitor.dashboards.dash_app.style import (
    LOSS_COLOR,
    TASK_COLORS,
    axis,
    figure_layout,
    line_trace,
)

from clippy_monitor.display import vline
from clippy_monitor.record import load_run
from clippy_monitor.record.format import optimizer_name
from clippy_monitor.replay_reading import REPLAY_PREFIX, ReplayOutcome, read_replays

REPLAY_HEIGHT = 340
MAX_POINTS = 2000


@dataclass(frozen=True)
class LossLine:
    """One record's loss, by step."""

    label: str
    steps: np.ndarray
    loss: np.ndarray
    color: str


@dataclass(frozen=True)
class ReplayComparison:
    """A run (``run``: its name in the run list) and its replays, in ``replay_paths`` order."""

    run: str
    original: LossLine
    replays: tuple[LossLine, ...]
    outcomes: tuple[ReplayOutcome, ...]

    @property
    def verdicts(self) -> list[str]:
        """Each replay's one-line verdict (:attr:`ReplayOutcome.verdict`)."""
        return [o.verdict for o in self.outcomes]


def original_of(name: str, names: Iterable[str]) -> str:
    """The run whose replay ``name`` is (``<run>/replay-<x>`` with ``<run>`` in ``names``), else ``name``."""
    parent, _, last = name.rpartition("/")
    if last.startswith(REPLAY_PREFIX):
        parent = parent or "."
        if parent in set(names):
            return parent
    return name


def replay_originals(picked: Iterable[str], names: Iterable[str]) -> list[str]:
    """The distinct originals of the picked runs (a picked replay stands for its run), in order."""
    names = list(names)
    out: list[str] = []
    for name in picked:
        original = original_of(name, names)
        if original not in out:
            out.append(original)
    return out


def _loss(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    run = load_run(path)
    if "loss" not in run.series_names:
        return np.zeros(0, np.int64), np.zeros(0)
    return np.asarray(run.steps), np.asarray(run.series("loss"), float)


def replay_comparison(name: str, path: str | Path) -> ReplayComparison | None:
    """The run at ``path`` (listed as ``name``) and its replays; None when it has none."""
    original = load_run(path)
    outcomes = tuple(read_replays(original))
    if not outcomes:
        return None
    steps, loss = _loss(path)
    lines = tuple(
        LossLine(
            f"replay {o.name} ({o.optimizer})", *_loss(o.path), TASK_COLORS[i % len(TASK_COLORS)]
        )
        for i, o in enumerate(outcomes)
    )
    return ReplayComparison(
        run=name,
        original=LossLine(f"original ({_optimizer(original.meta)})", steps, loss, LOSS_COLOR),
        replays=lines,
        outcomes=outcomes,
    )


def _optimizer(meta: dict) -> str:
    return optimizer_name(meta.get("optimizer")) or "?"


def step_window(comparison: ReplayComparison) -> tuple[float, float]:
    """The x range shown: the replayed steps, with as many steps of the original before them."""
    first = min(o.snapshot_step for o in comparison.outcomes)
    last = max(o.last_step for o in comparison.outcomes)
    return float(max(first - (last - first), 0)), float(last + 1)


def _marker(step: int, text: str, dash: str) -> tuple[dict, dict]:
    shape = vline(step, "#9ca3af", width=1, dash=dash)
    note = {"x": step, "y": 1, "xref": "x", "yref": "paper", "text": text, "showarrow": False}
    font = {"size": 10, "color": "#6b7280"}
    return shape, {**note, "xanchor": "left", "xshift": 3, "yanchor": "top", "font": font}


def replay_figure(comparison: ReplayComparison) -> dict:
    """Loss of the original and of each replay on one step axis (log scale), around the replay."""
    data = [
        line_trace(line.steps, _positive(line.loss), MAX_POINTS, name=line.label,
                   line={"color": line.color, "width": 2.5 if i == 0 else 1.8,
                         "dash": "solid" if i == 0 else "dot" if i % 2 else "dash"})
        for i, line in enumerate((comparison.original, *comparison.replays))
    ]  # fmt: skip
    layout = figure_layout(REPLAY_HEIGHT, f"{comparison.run}: original and replays")
    layout["xaxis"] = axis(title={"text": "step"}, range=list(step_window(comparison)))
    layout["yaxis"] = axis(title={"text": "loss"}, type="log")
    first = comparison.outcomes[0]
    marks = [_marker(first.snapshot_step, f"snapshot (step {first.snapshot_step})", "dot")]
    if first.step_c is not None:
        marks.append(_marker(first.step_c, f"original step-c {first.step_c}", "dash"))
    layout["shapes"] = [s for s, _ in marks]
    layout["annotations"] = [a for _, a in marks]
    return {"data": data, "layout": layout}


def _positive(values: np.ndarray) -> np.ndarray:
    """Loss for a log axis: non-positive values become gaps (NaN)."""
    out = np.asarray(values, float).copy()
    out[~(out > 0)] = math.nan
    return out
