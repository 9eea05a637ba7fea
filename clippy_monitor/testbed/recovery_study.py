"""The recovery ladder on the testbed: false-positive margins and a Table-2-style comparison.

Two measurements (docs/RECOVERY_MEASURED.md, docs/RESULTS.md):

* **Margins of the skip rung.**  :func:`replay_skip_ratios` replays the rung's
  test (``monitor.skipping.SkipGuard``) offline over a recorded ``grad_norm``
  series: the ratio of each step's norm to the lower median of the last
  ``skip_window`` applied steps, once ``skip_min_history`` exist, with the steps
  it would skip left out of the window.  On runs that stay healthy the largest
  ratio is the margin below ``skip_ratio``; on diverging runs the ratio at and
  after step-b says whether the rung would act.  The same runs are also trained
  with ``on_divergence="recover"`` and their skips and rollbacks counted.
* **Comparison**: naive Adagrad, naive Adagrad + recovery and ClippyAdagrad per
  model, learning-rate multiplier and seed: last-day AUC / RMSE, full divergence,
  rollbacks, steps lost, wall time.  Every run trains to the last day (naive
  Adagrad is not stopped at its full divergence).

Run ``python -m clippy_monitor.testbed.recovery_study --out DIR`` (``--help``).
Finished runs are cached under ``DIR`` as ``experiments.run_one`` does.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from clippy_monitor.episodes import first_full
from clippy_monitor.monitor.recovery import RecoveryConfig
from clippy_monitor.record import load_run
from clippy_monitor.testbed.experiments import (
    QUICK_TESTBED,
    Outcome,
    RunSpec,
    Testbed,
    primary_metrics,
    run_one,
    steps_lost,
)

#: The testbeds a study runs on: ``quick-long`` is the quick one with 4 more days
#: after the shift, so that a rollback that comes ``recovery_window`` steps after
#: step-b leaves days to train on.
TESTBEDS: dict[str, Testbed] = {
    "quick": QUICK_TESTBED,
    "default": Testbed(),
    "quick-long": dataclasses.replace(
        QUICK_TESTBED, data=dataclasses.replace(QUICK_TESTBED.data, num_days=12)
    ),
}

#: The comparison's columns: (method, recover).
COMPARED: tuple[tuple[str, bool], ...] = (("naive", False), ("naive", True), ("Clippy", False))


# --------------------------------------------------------------------------
# Margins of the skip rung
# --------------------------------------------------------------------------
def replay_skip_ratios(
    grad_norm: Sequence[float], config: RecoveryConfig
) -> tuple[np.ndarray, np.ndarray]:
    """``(ratio, skip)`` per step: ``grad_norm / median`` of the window the rung would hold
    (NaN before ``skip_min_history`` applied steps; inf for a non-finite norm) and
    whether the rung would skip the step.  As on the device: a skipped norm stays out
    of the window, and after ``max_consecutive_skips`` skips in a row a finite step
    above the bound is applied and the window starts again from it."""
    norms = np.asarray(grad_norm, np.float64)
    ratio = np.full(len(norms), np.nan)
    skip = np.zeros(len(norms), bool)
    window: list[float] = []
    streak = 0
    for t, g in enumerate(norms):
        if not np.isfinite(g):
            ratio[t], skip[t], streak = np.inf, True, streak + 1
            continue
        over = False
        if len(window) >= max(config.skip_min_history, 1):
            median = sorted(window)[(len(window) - 1) // 2]  # the lower median, as on the device
            ratio[t] = g / median if median > 0 else np.inf
            over = g > config.skip_ratio * median
        relearn = over and streak >= config.max_consecutive_skips
        skip[t] = over and not relearn
        if skip[t]:
            streak += 1
            continue
        window = ([] if relearn else window) + [float(g)]
        window, streak = window[-config.skip_window :], 0
    return ratio, skip


@dataclasses.dataclass(frozen=True)
class Margin:
    """The skip test over one recorded run: how close its steps came to ``skip_ratio``."""

    run: str
    steps: int
    max_ratio: float
    max_step: int
    p999_ratio: float
    would_skip: int
    first_would_skip: int | None
    ordinary_max_ratio: float  # over the steps outside the ``shift`` days


def margin_of(
    name: str,
    steps: np.ndarray,
    grad_norm: np.ndarray,
    config: RecoveryConfig,
    shift: np.ndarray | None = None,
) -> Margin:
    """The :class:`Margin` of one run's ``grad_norm`` series (``steps``: its step numbers;
    ``shift``: True on the steps of a sudden-shift day)."""
    ratio, skip = replay_skip_ratios(grad_norm, config)
    tested = ~np.isnan(ratio)
    ordinary = tested & ~(shift if shift is not None else np.zeros(len(ratio), bool))
    finite = np.where(tested, ratio, -np.inf)
    at = int(np.argmax(finite)) if tested.any() else 0
    return Margin(
        run=name,
        steps=len(steps),
        max_ratio=float(finite[at]) if tested.any() else math.nan,
        max_step=int(steps[at]) if tested.any() else -1,
        p999_ratio=float(np.percentile(np.minimum(ratio[tested], 1e300), 99.9))
        if tested.any()
        else math.nan,
        would_skip=int(skip.sum()),
        first_would_skip=int(steps[np.argmax(skip)]) if skip.any() else None,
        ordinary_max_ratio=float(ratio[ordinary].max()) if ordinary.any() else math.nan,
    )


@dataclasses.dataclass(frozen=True)
class Onset:
    """The skip test around a full divergence's step-b (a run recorded without recovery)."""

    run: str
    step_b: int
    ratio_at_b: float
    max_ratio_after_b: float
    would_skip_after_b: int
    steps_after_b: int


def onset_of(outcome: Outcome, config: RecoveryConfig) -> Onset | None:
    """The :class:`Onset` of a run holding a ``full`` event (None otherwise)."""
    full = first_full(outcome.events)
    if full is None:
        return None
    run = load_run(outcome.logdir)
    steps = np.asarray(run.steps)
    ratio, skip = replay_skip_ratios(run.series("grad_norm"), config)
    after = steps >= full["step_b"]
    at_b = ratio[np.argmax(after)] if after.any() else math.nan
    return Onset(
        run=outcome.spec.label,
        step_b=int(full["step_b"]),
        ratio_at_b=float(at_b),
        max_ratio_after_b=float(np.nanmax(ratio[after])) if after.any() else math.nan,
        would_skip_after_b=int(skip[after].sum()),
        steps_after_b=int(after.sum()),
    )


def shift_steps(steps: np.ndarray, testbed: Testbed) -> np.ndarray:
    """True on the steps trained on a sudden-shift day of ``testbed``'s log."""
    days = np.asarray(steps) // testbed.protocol.steps_per_day
    return np.isin(days, list(testbed.data.shift_days))


def run_margin(outcome: Outcome, testbed: Testbed) -> Margin:
    """The :class:`Margin` of a finished run, read from its record."""
    run = load_run(outcome.logdir)
    steps = np.asarray(run.steps)
    return margin_of(
        outcome.spec.label,
        steps,
        run.series("grad_norm"),
        testbed.recovery,
        shift_steps(steps, testbed),
    )


# --------------------------------------------------------------------------
# The comparison
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Row:
    """One run of the comparison."""

    spec: RunSpec
    auc: float
    rmse: float
    diverged: bool  # a full divergence was recorded (with recovery: before a rollback)
    rollbacks: int
    skipped: int
    steps_lost: int
    gave_up: bool
    wall_s: float

    @property
    def column(self) -> str:
        return self.spec.method + (" + recover" if self.spec.recover else "")


def row_of(outcome: Outcome, testbed: Testbed) -> Row:
    """A :class:`Row` from a finished run and its record."""
    auc, rmse = primary_metrics(testbed)
    recovery = outcome.recovery()
    return Row(
        spec=outcome.spec,
        auc=outcome.final.get(auc, math.nan),
        rmse=outcome.final.get(rmse, math.nan),
        diverged=outcome.diverged,
        rollbacks=len(recovery.rollbacks) if recovery else 0,
        skipped=len(recovery.skipped_steps) if recovery else 0,
        steps_lost=steps_lost(recovery),
        gave_up=bool(recovery and recovery.gave_up),
        wall_s=outcome.wall_s,
    )


def comparison_specs(
    models: Sequence[str], multipliers: Sequence[float], seeds: Sequence[int]
) -> list[RunSpec]:
    """Every run of the comparison, model by model, seed 0 of everything first."""
    return [
        RunSpec(model, method, mult, None, seed, recover=recover)
        for seed in seeds
        for model in models
        for mult in multipliers
        for method, recover in COMPARED
    ]


def _cell(values: Sequence[float], fmt: str) -> str:
    shown = ", ".join(fmt.format(v) for v in values)
    finite = [v for v in values if math.isfinite(v)]
    return f"{fmt.format(np.mean(finite))} ({shown})" if len(values) > 1 and finite else shown


def _ints(group: Sequence[Row], field: Callable[[Row], int]) -> str:
    return ", ".join(str(field(r)) for r in group)


def comparison_table(rows: Sequence[Row]) -> str:
    """Markdown: one line per (model, multiplier, method), seeds listed in order."""
    lines = [
        "| Model | LR | Method | Seeds | AUC % (click): mean (per seed) | RMSE (watch_time) "
        "| Full divergence | Rollbacks | Steps skipped | Steps lost | Wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, float, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.spec.model, r.spec.lr_multiplier, r.column), []).append(r)
    for (model, mult, column), group in groups.items():
        group.sort(key=lambda r: r.spec.seed)
        ints = functools.partial(_ints, group)
        gave_up = sum(r.gave_up for r in group)
        lines.append(
            f"| {model} | {mult:g}x | {column}{' (gave up: ' + str(gave_up) + ')' if gave_up else ''} "
            f"| {ints(lambda r: r.spec.seed)} | {_cell([100 * r.auc for r in group], '{:.1f}')} "
            f"| {_cell([r.rmse for r in group], '{:.3f}')} | {sum(r.diverged for r in group)}/{len(group)} "
            f"| {ints(lambda r: r.rollbacks)} | {ints(lambda r: r.skipped)} | {ints(lambda r: r.steps_lost)} "
            f"| {_cell([r.wall_s for r in group], '{:.0f}')} |"
        )
    return "\n".join(lines)


def resolved(a: Sequence[float], b: Sequence[float]) -> str:
    """``"higher"`` / ``"lower"`` when every seed of ``a`` is above / below every seed of
    ``b``, else ``"not resolved"`` (the difference is inside the seed spread)."""
    a, b = [v for v in a if math.isfinite(v)], [v for v in b if math.isfinite(v)]
    if not a or not b:
        return "not resolved"
    if min(a) > max(b):
        return "higher"
    if max(a) < min(b):
        return "lower"
    return "not resolved"


def verdicts(rows: Sequence[Row]) -> list[str]:
    """Per (model, multiplier): naive + recover's AUC against naive's and Clippy's, by seed range."""
    lines = []
    for model, mult in dict.fromkeys((r.spec.model, r.spec.lr_multiplier) for r in rows):
        auc = {
            c: [
                100 * r.auc
                for r in rows
                if (r.spec.model, r.spec.lr_multiplier, r.column) == (model, mult, c)
            ]
            for c in ("naive", "naive + recover", "Clippy")
        }
        lines.append(
            f"{model} {mult:g}x, AUC of naive + recover: {resolved(auc['naive + recover'], auc['naive'])} "
            f"than naive, {resolved(auc['naive + recover'], auc['Clippy'])} than Clippy"
        )
    return lines


# --------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------
#: Runs that stay healthy on the quick testbed (no full event without recovery):
#: Clippy, GC and AGC at the quick settings, naive Adagrad at a low learning rate
#: (the study trains them on each of its models).
CLEAN_SPECS: tuple[RunSpec, ...] = (
    RunSpec("Small", "Clippy", 1.0),
    RunSpec("Small", "Clippy", 2.0),
    RunSpec("Small", "GC", 2.0, 1e-1),
    RunSpec("Small", "AGC", 2.0, 1e-3),
    RunSpec("Small", "naive", 0.25),
)


def _train(spec: RunSpec, testbed: Testbed, out: Path, log: list[str]) -> Outcome:
    began = time.perf_counter()
    outcome = run_one(spec, testbed, out, stop_on_divergence=False)
    log.append(f"{spec.label}: {time.perf_counter() - began:.0f} s")
    print(log[-1], file=sys.stderr, flush=True)
    return outcome


def replay_agrees(outcome: Outcome, config: RecoveryConfig) -> bool | None:
    """Whether :func:`replay_skip_ratios` reproduces the steps a run recorded with recovery
    skipped, up to its first rollback (None: no ``skipped`` series)."""
    run = load_run(outcome.logdir)
    if "skipped" not in run.series_names:
        return None
    recovery = outcome.recovery()
    steps = np.asarray(run.steps)
    end = recovery.rollbacks[0].step if recovery and recovery.rollbacks else int(steps[-1])
    upto = steps <= end
    _, skip = replay_skip_ratios(np.asarray(run.series("grad_norm"))[upto], config)
    return bool(np.array_equal(skip, np.asarray(run.series("skipped"))[upto] > 0.5))


def margins_report(
    out: Path,
    testbed: Testbed,
    clean: Sequence[RunSpec],
    diverging: Sequence[Outcome],
    log: list[str],
) -> str:
    """Markdown: margins of the clean runs (trained without and with recovery), onsets of the diverging ones."""
    config = testbed.recovery
    lines = [
        "| Run | Steps | Max ratio (step) | 99.9th pct ratio | Max off the shift day "
        "| Would skip (first) | With recover: skipped, rollbacks | Replay = device |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for spec in clean:
        m = run_margin(_train(spec, testbed, out, log), testbed)
        with_recovery = _train(dataclasses.replace(spec, recover=True), testbed, out, log)
        recovery = with_recovery.recovery()
        acted = f"{len(recovery.skipped_steps)}, {len(recovery.rollbacks)}" if recovery else "n/a"
        first = f" ({m.first_would_skip})" if m.first_would_skip is not None else ""
        lines.append(
            f"| {m.run} | {m.steps} | {m.max_ratio:.2f} ({m.max_step}) | {m.p999_ratio:.2f} "
            f"| {m.ordinary_max_ratio:.2f} "
            f"| {m.would_skip}{first} | {acted} | {replay_agrees(with_recovery, config)} |"
        )
    lines += [
        "",
        "| Diverging run | step-b | Ratio at step-b | Max ratio after | Would skip after step-b |",
        "|---|---|---|---|---|",
    ]
    for o in diverging:
        onset = onset_of(o, config)
        if onset is not None:
            lines.append(
                f"| {onset.run} | {onset.step_b} | {onset.ratio_at_b:.1f} | {onset.max_ratio_after_b:.1f} "
                f"| {onset.would_skip_after_b}/{onset.steps_after_b} |"
            )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m clippy_monitor.testbed.recovery_study",
        description="Naive, naive + recover and Clippy on the testbed; the skip rung's margins.",
    )
    p.add_argument("--out", type=Path, required=True, help="where the runs and the tables go")
    p.add_argument(
        "--testbed",
        choices=list(TESTBEDS),
        default="quick",
        help="quick (--quick's), default (the demo's), or quick-long (quick with 4 more days after the shift)",
    )
    p.add_argument(
        "--models", nargs="+", default=["Small"], choices=["Small", "Large", "Large+DCN"]
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--multipliers", nargs="+", type=float, default=[1.0, 2.0])
    p.add_argument("--no-margins", action="store_true", help="skip the clean runs and margins")
    p.add_argument(
        "--recovery",
        nargs="*",
        default=[],
        metavar="NAME=VALUE",
        help="RecoveryConfig fields other than the defaults, e.g. skip_ratio=100",
    )
    return p


def study_testbed(name: str, overrides: Sequence[str]) -> Testbed:
    """The quick or default testbed with the recovery ladder's fields in ``overrides`` changed."""
    fields = {f.name: f.type for f in dataclasses.fields(RecoveryConfig)}
    values: dict[str, float | int | str] = {}
    for item in overrides:
        key, _, value = item.partition("=")
        if key not in fields:
            raise SystemExit(f"unknown RecoveryConfig field {key!r}")
        kind = {"int": int, "float": float}.get(str(fields[key]), str)
        values[key] = kind(value)
    return dataclasses.replace(TESTBEDS[name], recovery=RecoveryConfig(**values))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    testbed, log = study_testbed(args.testbed, args.recovery), []
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    specs = comparison_specs(args.models, args.multipliers, args.seeds)
    outcomes = [_train(s, testbed, args.out, log) for s in specs]
    rows = [row_of(o, testbed) for o in outcomes]
    text = [f"recovery: {testbed.recovery}", "", "## Comparison", "", comparison_table(rows), ""]
    text += verdicts(rows)
    if not args.no_margins:
        clean = [
            dataclasses.replace(c, model=model, seed=seed)
            for seed in args.seeds
            for model in args.models
            for c in CLEAN_SPECS
        ]
        diverging = [o for o in outcomes if o.diverged and not o.spec.recover]
        text += ["", "## Margins", "", margins_report(args.out, testbed, clean, diverging, log)]
    text += ["", f"wall time {time.perf_counter() - start:.0f} s", "", *log]
    (args.out / "recovery_study.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
