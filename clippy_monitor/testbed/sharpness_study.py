"""Preconditioned sharpness against 2 on the testbed (issue 16, paper section 3.2).

Runs are trained with ``Testbed.sharpness_every`` set, so that their records hold
``sharpness`` and ``preconditioned_sharpness`` (``DivergenceMonitor(sharpness_every=N)``).
Per run the study reads:

* step-b: the onset of the run's first ``full`` or ``micro`` episode
  (``episodes.read_episodes``);
* the first probe above 2 and its lead on step-b, and the largest value up to
  step-b (``sharpness_reading.read_crossing``);
* every probe above 2, each classed as a *warning* (an episode's step-b follows
  within ``window`` steps), *during* (at or after the step-b of an episode that is
  not over: a full one, or a micro one before its recovery) or a *false alarm*
  (neither).

Diverging runs either stop at the first day boundary after the full divergence
(the default) or train to the last day (``--train-through``).

Run ``python -m clippy_monitor.testbed.sharpness_study --out DIR`` (``--help``).
Finished runs are cached under ``DIR`` as ``experiments.run_one`` does.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from clippy_monitor.episodes import Event, Recorded, read_episodes
from clippy_monitor.record import load_run
from clippy_monitor.sharpness_reading import PRECONDITIONED, SHARPNESS, THRESHOLD, read_crossing
from clippy_monitor.testbed.experiments import RunSpec, Testbed, run_one
from clippy_monitor.testbed.recovery_study import TESTBEDS

#: Episode kinds whose step-b a warning may precede.
ONSET_KINDS = ("full", "micro")


@dataclasses.dataclass(frozen=True)
class Planned:
    """One run of the study: a spec on a named testbed."""

    testbed: str
    spec: RunSpec

    @property
    def label(self) -> str:
        return f"{self.testbed}: {self.spec.label}"


@dataclasses.dataclass(frozen=True)
class Alarms:
    """The probes above the threshold, by class (see the module docstring)."""

    warnings: int
    during: int
    false_alarms: int
    first_false: int | None


@dataclasses.dataclass(frozen=True)
class SharpnessRow:
    """What one run's record says about its preconditioned sharpness."""

    label: str
    steps: int
    probes: int
    onset_kind: str | None
    step_b: int | None
    crossing_step: int | None
    lead: int | None
    peak_before_b: float | None
    peak_all: float | None
    raw_peak_before_b: float | None
    above: int
    alarms: Alarms
    wall_s: float


def first_onset(run: Recorded) -> Event | None:
    """The run's first ``full`` or ``micro`` episode with a step-b (None without one)."""
    onsets = [e for e in read_episodes(run) if e.kind in ONSET_KINDS and e.step_b is not None]
    return min(onsets, key=lambda e: e.step_b, default=None)


def _in_episode(step: int, episodes: Sequence[Event], end: int) -> bool:
    for e in episodes:
        stop = e.recovered if e.kind == "micro" and e.recovered is not None else end
        if e.step_b <= step <= stop:
            return True
    return False


def classify_alarms(
    steps: np.ndarray, values: np.ndarray, episodes: Sequence[Event], window: int
) -> Alarms:
    """Class every probe above :data:`THRESHOLD` as a warning, during an episode, or false."""
    episodes = [e for e in episodes if e.kind in ONSET_KINDS and e.step_b is not None]
    values = np.asarray(values, np.float64)
    above = np.flatnonzero(~np.isnan(values) & (values > THRESHOLD))
    end = int(steps[-1]) if len(steps) else 0
    counts = {"warning": 0, "during": 0, "false": 0}
    first_false = None
    for i in above:
        s = int(steps[i])
        if any(s < e.step_b <= s + window for e in episodes):
            counts["warning"] += 1
        elif _in_episode(s, episodes, end):
            counts["during"] += 1
        else:
            counts["false"] += 1
            first_false = s if first_false is None else first_false
    return Alarms(counts["warning"], counts["during"], counts["false"], first_false)


def _peak(steps: np.ndarray, values: np.ndarray, upto: int | None) -> float | None:
    values = np.asarray(values, np.float64)
    mask = ~np.isnan(values) & (np.asarray(steps) <= (upto if upto is not None else math.inf))
    peak = float(values[mask].max()) if mask.any() else None
    return peak if peak is None or math.isfinite(peak) else None


def row_of(label: str, logdir: str | Path, wall_s: float, window: int) -> SharpnessRow:
    """A :class:`SharpnessRow` read from one run record."""
    run = load_run(logdir)
    steps = np.asarray(run.steps)
    onset = first_onset(run)
    step_b = onset.step_b if onset is not None else None
    crossing = read_crossing(run, step_b)
    names = run.series_names
    pre = run.series(PRECONDITIONED) if PRECONDITIONED in names else np.full(len(steps), np.nan)
    raw = run.series(SHARPNESS) if SHARPNESS in names else np.full(len(steps), np.nan)
    return SharpnessRow(
        label=label,
        steps=len(steps),
        probes=crossing.probes,
        onset_kind=onset.kind if onset is not None else None,
        step_b=step_b,
        crossing_step=crossing.step,
        lead=crossing.lead,
        peak_before_b=crossing.peak,
        peak_all=_peak(steps, pre, None),
        raw_peak_before_b=_peak(steps, raw, step_b),
        above=int(np.sum(~np.isnan(pre) & (np.asarray(pre) > THRESHOLD))),
        alarms=classify_alarms(steps, pre, read_episodes(run), window),
        wall_s=wall_s,
    )


def _f(x: float | int | None, fmt: str = ".3g") -> str:
    return "-" if x is None else format(x, fmt)


def table(rows: Sequence[SharpnessRow]) -> str:
    """Markdown: one line per run."""
    lines = [
        "| Run | Steps | Probes | Onset (step-b) | First > 2 | Lead (steps) "
        "| Max P-sharpness to step-b | Max over run | Max raw sharpness to step-b "
        "| Probes > 2: warning / during / false | First false alarm | Wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        onset = f"{r.onset_kind} ({r.step_b})" if r.onset_kind else "none"
        a = r.alarms
        lines.append(
            f"| {r.label} | {r.steps} | {r.probes} | {onset} | {_f(r.crossing_step, 'd')} "
            f"| {_f(r.lead, 'd')} | {_f(r.peak_before_b)} | {_f(r.peak_all)} "
            f"| {_f(r.raw_peak_before_b)} | {a.warnings} / {a.during} / {a.false_alarms} "
            f"| {_f(a.first_false, 'd')} | {r.wall_s:.0f} |"
        )
    return "\n".join(lines)


#: The default runs: naive Adagrad 1x/2x and Clippy 1x/2x on the quick testbed (Small,
#: seeds 0 and 1), and the demo's naive run (default testbed, Small, 2x, seed 0).
DEFAULT_RUNS: tuple[Planned, ...] = (
    *(
        Planned("quick", RunSpec("Small", method, mult, None, seed))
        for method in ("naive", "Clippy")
        for seed in (0, 1)
        for mult in (2.0, 1.0)
    ),
    Planned("default", RunSpec("Small", "naive", 2.0, None, 0)),
)


def parse_run(text: str) -> Planned:
    """``TESTBED:MODEL:METHOD:MULT:SEED`` (e.g. ``quick:Small:naive:2:0``) as a :class:`Planned`."""
    testbed, model, method, mult, seed = text.split(":")
    if testbed not in TESTBEDS:
        raise argparse.ArgumentTypeError(f"unknown testbed {testbed!r}")
    return Planned(testbed, RunSpec(model, method, float(mult), None, int(seed)))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m clippy_monitor.testbed.sharpness_study",
        description="Preconditioned sharpness against 2 before step-b, on testbed runs.",
    )
    p.add_argument("--out", type=Path, required=True, help="where the runs and the table go")
    p.add_argument(
        "--runs",
        nargs="+",
        type=parse_run,
        default=list(DEFAULT_RUNS),
        metavar="TESTBED:MODEL:METHOD:MULT:SEED",
        help="runs to train (default: naive and Clippy 1x/2x quick Small seeds 0-1, the demo's naive run)",
    )
    p.add_argument("--every", type=int, default=10, help="probe every this many steps")
    p.add_argument(
        "--window", type=int, default=100, help="a probe > 2 is a warning if step-b follows within"
    )
    p.add_argument(
        "--train-through",
        action="store_true",
        help="train diverging runs to the last day (default: stop after the full divergence)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows, start = [], time.perf_counter()
    for planned in args.runs:
        testbed: Testbed = dataclasses.replace(
            TESTBEDS[planned.testbed], sharpness_every=args.every
        )
        out = args.out / planned.testbed
        began = time.perf_counter()
        o = run_one(planned.spec, testbed, out, stop_on_divergence=not args.train_through)
        rows.append(row_of(planned.label, o.logdir, o.wall_s, args.window))
        print(f"{planned.label}: {time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)
        (args.out / "sharpness_study.md").write_text(table(rows) + "\n")
    text = [
        f"probe every {args.every} steps; warning window {args.window} steps; "
        + ("trained through" if args.train_through else "stopped after a full divergence"),
        "",
        table(rows),
        "",
        f"wall time {time.perf_counter() - start:.0f} s",
    ]
    (args.out / "sharpness_study.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
