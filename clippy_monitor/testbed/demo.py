"""``clippy-monitor demo``: the paper's story in a few minutes on two CPU cores.

The same multitask model (section 3.1) is trained three times at the same high
learning rate on the same drifting synthetic log: with naive Adagrad, with
ClippyAdagrad, and with naive Adagrad under the monitor's recovery ladder
(``on_divergence="recover"``, default ``RecoveryConfig``), each recorded by a
``DivergenceMonitor``.  Then the records are read back and summarised: the naive
run's step-a/b/c (Figure 4a) and the layers whose update ``||r/w||_inf`` and
gradient norm jumped most at step-b (Figure 4b), the Clippy run's health and
clipping factors (Figure 6), and what the recovery ladder did (skipped steps,
rollbacks, cool-downs).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from clippy_monitor.episodes import first_full
from clippy_monitor.record import Run, load_run
from clippy_monitor.recovered import Recovery, read_recovery
from clippy_monitor.replay_reading import read_replays
from clippy_monitor.sensitivity import event_sensitivity
from clippy_monitor.testbed.experiments import (
    Outcome,
    RunSpec,
    Testbed,
    primary_metrics,
    replay_outcome,
    run_one,
    steps_lost,
)

#: The demo's configuration: Small model, calibrated so that naive Adagrad fully
#: diverges after the sudden shift and ClippyAdagrad does not (docs/RESULTS.md).
DEMO_TESTBED = Testbed()
DEMO_MODEL = "Small"
DEMO_LR_MULTIPLIER = 2.0


def short_layer(path: str) -> str:
    """``"Small/shared_bottom_0/kernel"`` -> ``"shared_bottom_0/kernel"``."""
    parts = path.split("/")
    return "/".join(parts[-2:]) if len(parts) > 2 else path


def _fmt_ratio(r: float) -> str:
    return "inf" if not np.isfinite(r) else f"x{r:,.0f}" if r >= 10 else f"x{r:.1f}"


def describe_divergence(outcome: Outcome, run: Run, testbed: Testbed, top: int = 5) -> list[str]:
    """Lines describing a fully diverged run: step-a/b/c and the layers that blew up first."""
    event = first_full(run.events)
    spd = testbed.protocol.steps_per_day
    day = event["step_b"] // spd
    shift = ", a sudden-shift day" if day in testbed.data.shift_days else ""
    task = (event.get("task") or "loss").replace("loss/", "")
    lines = [
        f"  FULLY DIVERGED ({event['reason']}), first seen on the {task!r} loss:",
        f"    step-a {event['step_a']:>5}  last healthy step",
        f"    step-b {event['step_b']:>5}  onset: the loss starts to rise (training day {day}{shift})",
        f"    step-c {event['step_c']:>5}  fully diverged",
    ]
    if event.get("decided_at") is not None:
        lines.append(
            f"    (the detector confirmed the onset at step {event.get('confirmed_at')} "
            f"and declared the full divergence at step {event['decided_at']})"
        )
    return lines + _jump_lines(run, event, top)


def _jump_lines(run: Run, event: dict, top: int) -> list[str]:
    """The layers whose ||r/w||_inf jumped most at step-b, with their gradient norm's jump
    (``clippy_monitor.sensitivity``: value at step-b over the healthy median)."""
    sensitivity = event_sensitivity(run, event)
    layers = [r for r in sensitivity.by_layer().items() if "clippy" in r[1]]
    if not sensitivity.healthy_count or not layers:
        return []
    layers.sort(key=lambda item: -_ratio(item[1]["clippy"].jump))
    lines = [
        "  Layers that blew up first (at step-b, vs their own median over the "
        f"{sensitivity.healthy_count} healthy steps up to step-a):",
        f"    {'layer':34} {'||r/w||_inf':>12} {'grad norm':>11}",
    ]
    for layer, rules in layers[:top]:
        grad = _fmt_jump(rules["gc"].jump if "gc" in rules else None)
        linf = _fmt_jump(rules["clippy"].jump)
        lines.append(f"    {short_layer(layer):34} {linf:>12} {grad:>11}")
    return lines


def _ratio(jump: float | None) -> float:
    return -math.inf if jump is None else jump


def _fmt_jump(jump: float | None) -> str:
    return "" if jump is None else _fmt_ratio(jump)


def describe_health(outcome: Outcome, run: Run, top: int = 3) -> list[str]:
    """Lines describing a run that did not fully diverge: micro-divergences and clipping."""
    micro = [e for e in run.events if e["kind"] == "micro"]
    lines = [
        "  healthy: no full divergence"
        + (
            f"; {len(micro)} micro-divergence(s), all recovered"
            if micro
            else ", no micro-divergence"
        )
    ]
    for e in micro[:3]:
        lines.append(
            f"    micro: step-b {e['step_b']}, recovered at step {e['recovered']} "
            f"({(e.get('task') or 'loss').replace('loss/', '')})"
        )
    applied = np.asarray(run.layer("applied_factor"), np.float64)
    if applied.size:
        clipped = np.nanmin(applied, axis=1) < 1.0
        lowest = np.nanmin(applied, axis=0)
        order = np.argsort(lowest)[:top]
        names = ", ".join(f"{short_layer(run.layers[i])} (min {lowest[i]:.2g})" for i in order)
        lines.append(
            f"  Clippy clipped the update at {100 * clipped.mean():.0f}% of steps; most in: {names}"
        )
    return lines


def describe_recovery(recovery: Recovery | None) -> list[str]:
    """Lines describing what the recovery ladder did: skipped steps, each rollback, the outcome."""
    if recovery is None:
        return ["  recorded without the recovery ladder"]
    reasons = ", ".join(f"{r.replace('_', ' ')} {n}" for r, n in recovery.reason_counts().items())
    lines = [f"  {recovery.summary()}" + (f" ({reasons})" if reasons else "")]
    for r in recovery.rollbacks:
        cooldown = (
            f"cool-down: lr x{r.lr_factor:g} rising to x1 over {r.cooldown_steps} steps"
            if r.lr_factor is not None
            else "no cool-down recorded"
        )
        last = f"; last healthy step {r.step_a}" if r.step_a is not None else ""
        lines.append(
            f"    rollback at step {r.step:>5} ({r.trigger or 'trigger not recorded'}{last}): "
            f"to the snapshot after step {r.snapshot_step}, {r.batches_skipped} batches skipped, {cooldown}"
        )
    if recovery.gave_up is not None:
        lines.append(f"    gave up at step {recovery.gave_up.step}: {recovery.gave_up.message}")
    elif recovery.stayed_healthy is not None:
        after = "stayed healthy" if recovery.stayed_healthy else "diverged again"
        lines.append(f"    after the last rollback the run {after}")
    lines.append(f"  steps lost (skipped or undone by a rollback): {steps_lost(recovery)}")
    return lines


def _metrics_line(outcome: Outcome, testbed: Testbed) -> str:
    auc, rmse = primary_metrics(testbed)
    peak = max((p[auc] for p in outcome.curve), default=float("nan"))
    final = outcome.final
    return (
        f"  eval on the last day: {auc} {final.get(auc, float('nan')):.3f} (best during training {peak:.3f}), "
        f"{rmse} {final.get(rmse, float('nan')):.3f}"
    )


#: The demo's runs: (key, title, method, recover).
DEMO_RUNS: tuple[tuple[str, str, str, bool], ...] = (
    ("naive", "Naive Adagrad", "naive", False),
    ("clippy", "ClippyAdagrad (lambda_rel 0.5, lambda_abs 1e-2)", "Clippy", False),
    ("recover", "Naive Adagrad + recovery (on_divergence='recover')", "naive", True),
)


def side_by_side(outcomes: dict[str, Outcome], testbed: Testbed) -> list[str]:
    """One line per demo run: last-day metrics, full divergence, what the recovery did."""
    auc, rmse = primary_metrics(testbed)
    lines = [f"  {'run':28} {auc:>10} {rmse:>16} {'steps lost':>10}  outcome"]
    for key, title, _, _ in DEMO_RUNS:
        o = outcomes[key]
        recovery = o.recovery()
        outcome = (
            recovery.summary()
            if recovery is not None and recovery.acted
            else ("fully diverged" if o.diverged else "healthy")
        )
        lost = steps_lost(recovery) if recovery is not None else "-"
        lines.append(
            f"  {title.split(' (')[0]:28} {o.final.get(auc, float('nan')):>10.3f} "
            f"{o.final.get(rmse, float('nan')):>16.3f} {lost:>10}  {outcome}"
        )
    return lines


def _describe(o: Outcome, testbed: Testbed) -> list[str]:
    run = load_run(o.logdir)
    recovery = read_recovery(run)
    if recovery is not None and recovery.acted:
        return describe_recovery(recovery)
    lines = describe_divergence(o, run, testbed) if o.diverged else describe_health(o, run)
    return lines + ([f"  {recovery.summary()}"] if recovery is not None else [])


def replay_lines(naive: Outcome, testbed: Testbed) -> list[str]:
    """Replay the naive run's divergence with ClippyAdagrad (``clippy_monitor.replay``) and
    say what happened: would Clippy have saved this run?"""
    if not naive.diverged:
        return ["Replay: the naive run did not diverge; nothing to replay."]
    start = time.perf_counter()
    try:
        replay_outcome(naive, testbed, "Clippy", "clippy")
    except ValueError as err:  # nothing kept to replay from (a divergence at the start)
        return [f"Replay: not possible: {err}"]
    (outcome,) = [r for r in read_replays(load_run(naive.logdir)) if r.name == "clippy"]
    return [
        "Would Clippy have saved the naive run? Its divergence replayed from the snapshot "
        f"before step-a, on the same batches, with ClippyAdagrad ({time.perf_counter() - start:.0f} s):",
        f"  {outcome.verdict}",
    ]


def run_demo(
    out: str | Path = "runs",
    *,
    seed: int = 0,
    testbed: Testbed = DEMO_TESTBED,
    stream: TextIO | None = None,
) -> dict[str, Any]:
    """Train naive Adagrad, ClippyAdagrad and naive Adagrad with recovery on the same
    model and learning rate, then explain the records.

    Returns ``{"naive": Outcome, "clippy": Outcome, "recover": Outcome, "wall_s": float}``.
    """
    stream = stream or sys.stdout
    out = Path(out)
    lr = testbed.base_lr * DEMO_LR_MULTIPLIER

    def say(*lines: str) -> None:
        print(*lines, sep="\n", file=stream, flush=True)

    say(
        "clippy-monitor demo (Tang et al., KDD 2023)",
        f"  model: {DEMO_MODEL} multitask ranking model, {len(testbed.data.tasks)} tasks, "
        f"{testbed.data.n_dense} dense + {testbed.data.n_categorical} categorical features",
        f"  data: synthetic log of {testbed.data.num_days} days, drifting, sudden shift on day(s) "
        f"{', '.join(map(str, testbed.data.shift_days))}; trained day by day, evaluated on the last day",
        f"  optimizer: Adagrad, peak learning rate {lr:g} after a {testbed.warmup_steps}-step warm-up, "
        f"{len(DEMO_RUNS)} runs:",
        "",
    )
    start = time.perf_counter()
    outcomes: dict[str, Outcome] = {}
    for i, (key, title, method, recover) in enumerate(DEMO_RUNS, start=1):
        say(f"[{i}/{len(DEMO_RUNS)}] training with {title} ...")
        spec = RunSpec(DEMO_MODEL, method, DEMO_LR_MULTIPLIER, None, seed, recover=recover)
        logdir = out / f"demo-{key}"
        o = run_one(spec, testbed, out, logdir=logdir, reuse=False, keep_replay=key == "naive")
        outcomes[key] = o
        stopped = o.diverged and not recover
        say(
            f"      {o.steps} steps in {o.wall_s:.0f} s -> {o.logdir}"
            + ("  (stopped after the full divergence)" if stopped else "")
        )
    wall = time.perf_counter() - start

    say("", "What the records say:", "")
    for key, title, _, _ in DEMO_RUNS:
        o = outcomes[key]
        say(f"{title.split(' (')[0]}  ({o.logdir})", *_describe(o, testbed))
        say(_metrics_line(o, testbed), "")
    say("Side by side (eval on the last day):", *side_by_side(outcomes, testbed), "")
    say(*replay_lines(outcomes["naive"], testbed), "")
    say(
        f"Total {wall:.0f} s.  Open the records:",
        f"  tensorboard --logdir {out}",
        f"  clippy-monitor dash --logdir {out}",
    )
    return {**outcomes, "wall_s": wall}
