"""The paper's experiments on the testbed: Table 2, Table 3 and Figure 5 (sections 5.1-5.2, A.1).

* **Table 2** -- methods naive Adagrad / GC / AGC / LAMB / Clippy x learning-rate
  multipliers {1x, 2x} x models {Small, Large, Large+DCN}, with the threshold grids
  of 5.1.3.  Each method's best multiplier (and threshold) on seed 0 is repeated
  over 3 seeds; we report mean +- std of the first binary task's AUC and the first
  regression task's RMSE on the last day, or "diverged" when the runs fully
  diverged according to their run records.
* **Table 3** -- naive Adagrad on Large+DCN at the edge of instability (the
  paper's 0.4x; 0.5x on this testbed), and the same with a smaller model,
  without DCN, with fewer input features, and with one or two tasks removed:
  the ratio of runs that failed (fully diverged, or ended near chance).
* **Figure 5** -- evaluation AUC over training, per method (plotly HTML).
* **GC and AGC as the paper ran them** (issue 17) -- optional methods beside the
  paper's columns: the gradient clipped before Adagrad's accumulator (eq. 2,
  ``-eq2``) and AGC per output unit as NFNets' official code (``AGC-unitwise``);
  shown as extra, labelled rows under Table 2 (``BASELINE_FORMS``).

Every run is a :func:`run_one` call: a model from ``models``, a log from ``data``,
sequential training from ``protocol``, a ``DivergenceMonitor`` record in its own
logdir.  Finished runs are cached in ``<out>/runs/<name>/result.json``, so an
interrupted experiment resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np

from clippy_monitor.episodes import Event, repeated_micro
from clippy_monitor.evaluations import AUC_COLLAPSE
from clippy_monitor.monitor import DetectorConfig
from clippy_monitor.monitor.recovery import RecoveryConfig
from clippy_monitor.optimizers import AGCAdagrad, ClippyAdagrad, GCAdagrad, LAMBAdagrad
from clippy_monitor.record import load_run
from clippy_monitor.recovered import Recovery, read_recovery
from clippy_monitor.testbed.data import (
    DayLog,
    FeatureSubset,
    SyntheticConfig,
    SyntheticLog,
    TaskSubset,
)
from clippy_monitor.testbed.models import build_model, compile_model
from clippy_monitor.testbed.protocol import (
    LinearWarmup,
    ProtocolConfig,
    RunResult,
    output_biases,
    train_sequentially,
    training_dataset,
)

METHODS = ("naive", "GC", "AGC", "LAMB", "Clippy")


@dataclasses.dataclass(frozen=True)
class BaselineForm:
    """How a GC or AGC method runs: its rule, eq. 5 (the step scaled; the paper's
    unified form) or eq. 2 (the gradient clipped before Adagrad's accumulator),
    and whole-tensor or per-output-unit (NFNets) norms."""

    rule: str
    label: str
    clip_before_accumulator: bool = False
    unitwise: bool = False


#: The GC/AGC methods by name: the paper's two columns and the forms of issue 17.
BASELINE_FORMS: dict[str, BaselineForm] = {
    "GC": BaselineForm("GC", "GC, eq. 5 (step scaled)"),
    "AGC": BaselineForm("AGC", "AGC whole-tensor, eq. 5 (step scaled)"),
    "GC-eq2": BaselineForm("GC", "GC, eq. 2 (gradient clipped before the accumulator)", True),
    "AGC-eq2": BaselineForm(
        "AGC", "AGC whole-tensor, eq. 2 (gradient clipped before the accumulator)", True
    ),
    "AGC-unitwise": BaselineForm("AGC", "AGC unit-wise (NFNets), eq. 5 (step scaled)", False, True),
    "AGC-unitwise-eq2": BaselineForm(
        "AGC", "AGC unit-wise (NFNets), eq. 2 (gradient clipped before the accumulator)", True, True
    ),
}
#: Methods beyond the paper's columns (``--baseline-forms``).
FORM_METHODS = ("GC-eq2", "AGC-eq2", "AGC-unitwise", "AGC-unitwise-eq2")
ALL_METHODS = METHODS + FORM_METHODS

#: Section 5.1.3's grids: GC clipnorm, AGC clipping, LAMB's learning-rate scale mu;
#: Clippy uses lambda_rel = 0.5, lambda_abs = 1e-2 throughout.
PAPER_GRIDS: dict[str, tuple[float | None, ...]] = {
    "naive": (None,),
    "GC": (1e-1, 1e-2, 1e-3),
    "AGC": (1e-2, 1e-3, 1e-4),
    "LAMB": (1e-1, 1e-2, 1e-3),
    "Clippy": (None,),
    **{m: (1e-1, 1e-2, 1e-3) if m.startswith("GC") else (1e-2, 1e-3, 1e-4) for m in FORM_METHODS},
}
THRESHOLD_NAMES = {**{m: "lambda" for m in BASELINE_FORMS}, "LAMB": "mu"}
EXCLUDE = ["embedding"]  # the paper clips non-embedding parameters only (5.1.3)

#: Table 3's rows (appendix A.1): (variant, label, model).
TABLE3_VARIANTS: tuple[tuple[str, str, str], ...] = (
    ("clean", "Clean", "Large+DCN"),
    ("smaller_model", "Smaller model size", "Small+DCN"),
    ("no_dcn", "Remove DCN", "Large"),
    ("fewer_features", "Remove subset of input features", "Large+DCN"),
    ("minus_one_task", "Remove one task", "Large+DCN"),
    ("minus_two_tasks", "Remove two tasks", "Large+DCN"),
)
#: Tasks removed by the Table 3 variants (the heavy-tailed regression first, then a binary task).
REMOVED_TASKS = {"minus_one_task": ("dwell",), "minus_two_tasks": ("dwell", "share")}


def make_optimizer(
    method: str, learning_rate: Any, threshold: float | None = None
) -> keras.optimizers.Optimizer:
    """The optimizer of one method (5.1.3), clipping non-embedding parameters only.

    ``learning_rate`` may be a schedule; LAMB's is scaled by ``threshold`` (= mu).
    """
    if method == "naive":
        return keras.optimizers.Adagrad(learning_rate)
    if method in BASELINE_FORMS:
        return baseline_optimizer(BASELINE_FORMS[method], learning_rate, threshold)
    if method == "LAMB":
        if isinstance(learning_rate, LinearWarmup):
            learning_rate = LinearWarmup(learning_rate.peak * threshold, learning_rate.warmup_steps)
        else:
            learning_rate = learning_rate * threshold
        return LAMBAdagrad(learning_rate, exclude_from_clipping=EXCLUDE)
    if method == "Clippy":
        return ClippyAdagrad(
            learning_rate,
            variable_relative_threshold=0.5,
            absolute_threshold=1e-2,
            exclude_from_clipping=EXCLUDE,
        )
    raise ValueError(f"unknown method {method!r}; known: {', '.join(ALL_METHODS)}")


def baseline_optimizer(
    form: BaselineForm, learning_rate: Any, threshold: float | None
) -> keras.optimizers.Optimizer:
    """GC or AGC in ``form`` at ``threshold`` (GC's clipnorm, AGC's clipping)."""
    options = {
        "exclude_from_clipping": EXCLUDE,
        "clip_before_accumulator": form.clip_before_accumulator,
    }
    if form.rule == "GC":
        return GCAdagrad(learning_rate, clipnorm=threshold, **options)
    return AGCAdagrad(learning_rate, clipping=threshold, unitwise=form.unitwise, **options)


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Testbed:
    """Everything fixed across the runs of an experiment.

    Attributes:
        base_lr: the "1x" peak learning rate, calibrated so that naive Adagrad
            fully diverges (see docs/RESULTS.md).
        warmup_steps: linear warm-up to the peak learning rate.
        scale: model width multiplier (1 = Table 1's sizes).
        data: the synthetic log (one log, seeded by ``data.seed``, for all runs).
        protocol: batch size, steps per day, window, evaluation.
        detector: the monitor's divergence detector.
        recovery: the recovery ladder's settings, for the runs whose spec asks for it.
        sharpness_every: probe the (preconditioned) sharpness every this many steps
            (``DivergenceMonitor(sharpness_every=...)``); None: not probed.
    """

    base_lr: float = 0.2
    warmup_steps: int = 360
    scale: float = 1 / 16
    embedding_dim: int = 8
    data: SyntheticConfig = dataclasses.field(
        default_factory=lambda: SyntheticConfig(num_days=11, rows_per_day=4096, shift_days=(6,))
    )
    protocol: ProtocolConfig = dataclasses.field(
        default_factory=lambda: ProtocolConfig(batch_size=256, steps_per_day=60, eval_rows=2048)
    )
    detector: DetectorConfig = dataclasses.field(default_factory=DetectorConfig)
    recovery: RecoveryConfig = dataclasses.field(default_factory=RecoveryConfig)
    sharpness_every: int | None = None


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training run; ``recover``: monitored with ``on_divergence="recover"``
    (the testbed's ``recovery`` settings) instead of stopping at a full divergence."""

    model: str
    method: str
    lr_multiplier: float = 1.0
    threshold: float | None = None
    seed: int = 0
    variant: str = "clean"
    recover: bool = False

    @property
    def name(self) -> str:
        parts = [
            self.variant,
            self.model.replace("+", "_"),
            self.method + ("-recover" if self.recover else ""),
            f"lr{self.lr_multiplier:g}x",
        ]
        if self.threshold is not None:
            parts.append(f"{THRESHOLD_NAMES.get(self.method, 't')}{self.threshold:g}")
        parts.append(f"seed{self.seed}")
        return "-".join(parts)

    @property
    def label(self) -> str:
        t = (
            f" {THRESHOLD_NAMES.get(self.method, 't')}={self.threshold:g}"
            if self.threshold is not None
            else ""
        )
        v = "" if self.variant == "clean" else f" [{self.variant}]"
        method = self.method + (" + recover" if self.recover else "")
        return f"{self.model} {method} {self.lr_multiplier:g}x{t} seed {self.seed}{v}"


@dataclasses.dataclass
class Outcome:
    """A finished run as stored in ``result.json``."""

    spec: RunSpec
    logdir: str
    diverged: bool
    final: dict[str, float]
    curve: list[dict[str, float]]
    events: list[dict]
    steps: int
    wall_s: float

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "spec": dataclasses.asdict(self.spec)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Outcome:
        return cls(**{**data, "spec": RunSpec(**data["spec"])})

    def recovery(self) -> Recovery | None:
        """What the recovery ladder did, read from the run record (None: run without it)."""
        return read_recovery(load_run(self.logdir))

    @property
    def auc_collapsed(self) -> bool:
        """Fully diverged by its evaluation AUC alone (reason ``auc_collapse``, no loss full)."""
        reasons = {e.get("reason") for e in self.events if e.get("kind") == "full"}
        return reasons == {AUC_COLLAPSE}

    @property
    def consistently_micro(self) -> bool:
        """Consistently micro-diverging (``episodes.repeated_micro``, paper 5.1.2)."""
        events = (Event.from_record(e) for e in self.events)
        return repeated_micro([e for e in events if e is not None]) is not None


def steps_lost(recovery: Recovery | None) -> int:
    """Steps whose batch left nothing in the final model: the skipped steps and the
    steps each rollback undid (``snapshot_step + 1 .. step``), each counted once."""
    if recovery is None:
        return 0
    lost = set(recovery.skipped_steps)
    for rollback in recovery.rollbacks:
        lost.update(range(rollback.snapshot_step + 1, rollback.step + 1))
    return len(lost)


_LOGS: dict[
    SyntheticConfig, SyntheticLog
] = {}  # the last log built, shared by the runs of an experiment


def log_for(testbed: Testbed, variant: str = "clean") -> DayLog:
    """The log a run trains on: one SyntheticLog per data config (the data is the
    same for every run; seeds change the model and the batches), with the views of Table 3."""
    if testbed.data not in _LOGS:
        _LOGS.clear()
        _LOGS[testbed.data] = SyntheticLog(testbed.data)
    log: DayLog = _LOGS[testbed.data]
    if variant == "fewer_features":
        return FeatureSubset(log, keep=0.5)
    if variant in REMOVED_TASKS:
        return TaskSubset(log, REMOVED_TASKS[variant])
    return log


def recorded_recovery(logdir: str | Path) -> dict | None:
    """The recovery settings a run was recorded with (None: without the ladder)."""
    return load_run(logdir).meta.get("recovery")


def recorded_sharpness_every(logdir: str | Path) -> int | None:
    """How often a run was recorded probing sharpness (None: not probed)."""
    return load_run(logdir).meta.get("sharpness_every")


def result_file(out: str | Path, spec: RunSpec) -> Path:
    """Where a finished run of ``spec`` is cached: ``<out>/runs/<name>/result.json``."""
    return Path(out) / "runs" / spec.name / "result.json"


def _model_for(spec: RunSpec, testbed: Testbed, log: DayLog) -> keras.Model:
    return build_model(
        spec.model,
        log.features,
        log.tasks,
        scale=testbed.scale,
        embedding_dim=testbed.embedding_dim,
        output_bias=output_biases(log),
    )


def _optimizer_for(spec: RunSpec, testbed: Testbed, method: str) -> Any:
    """``method`` at ``spec``'s learning-rate schedule (and threshold, for its own method)."""
    schedule = LinearWarmup(testbed.base_lr * spec.lr_multiplier, testbed.warmup_steps)
    return make_optimizer(method, schedule, spec.threshold if method == spec.method else None)


def replay_outcome(outcome: Outcome, testbed: Testbed, method: str, name: str) -> Path:
    """Replay ``outcome``'s full divergence (trained with ``keep_replay``) with ``method``
    on the same batches (``clippy_monitor.replay``); the replay's record."""
    from clippy_monitor.counterfactual import replay, replay_start

    spec, log = outcome.spec, log_for(testbed, outcome.spec.variant)
    batches = training_dataset(log, testbed.protocol, spec.seed).skip(replay_start(outcome.logdir))
    return replay(
        outcome.logdir,
        lambda: _model_for(spec, testbed, log),
        batches,
        _optimizer_for(spec, testbed, method),
        name=name,
        compile_kwargs=lambda model, optimizer: compile_model(model, log.tasks, optimizer),
    )


def run_one(
    spec: RunSpec,
    testbed: Testbed,
    out: str | Path,
    *,
    logdir: str | Path | None = None,
    stop_on_divergence: bool = True,
    reuse: bool = True,
    keep_replay: bool = False,
) -> Outcome:
    """Train one run (or load it from ``<logdir>/result.json``; ``logdir`` defaults to ``<out>/runs/<name>``).

    A cached run is trained again when it was recorded with other recovery
    settings than ``testbed.recovery`` (runs with recovery) or another
    ``sharpness_every`` than ``testbed.sharpness_every``.
    """
    logdir = Path(logdir) if logdir is not None else result_file(out, spec).parent
    cached = logdir / "result.json"
    if reuse and cached.exists():
        outcome = Outcome.from_json(json.loads(cached.read_text()))
        same_recovery = (
            not spec.recover or recorded_recovery(outcome.logdir) == testbed.recovery.to_dict()
        )
        if same_recovery and recorded_sharpness_every(outcome.logdir) == testbed.sharpness_every:
            return outcome
    if logdir.exists():  # an interrupted run: start it afresh
        for path in sorted(logdir.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
    log = log_for(testbed, spec.variant)
    keras.utils.set_random_seed(spec.seed)
    model = _model_for(spec, testbed, log)
    compile_model(model, log.tasks, _optimizer_for(spec, testbed, spec.method))
    result: RunResult = train_sequentially(
        model,
        log,
        testbed.protocol,
        logdir,
        seed=spec.seed,
        detector=testbed.detector,
        stop_on_divergence=stop_on_divergence,
        recovery=testbed.recovery if spec.recover else None,
        sharpness_every=testbed.sharpness_every,
        keep_replay=keep_replay,
    )
    outcome = Outcome(
        spec,
        str(logdir),
        result.diverged,
        result.final,
        result.curve,
        result.events,
        result.steps,
        result.wall_s,
    )
    cached.write_text(json.dumps(outcome.to_json(), default=float))
    return outcome


# --------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Plan:
    """Which runs an experiment makes.

    Attributes:
        models: Table 2's rows.
        methods: Table 2's columns.
        lr_multipliers: the learning rates tried (x ``base_lr``).
        grids: thresholds tried per method.
        repeat_seeds: seeds the best setting of each method is repeated over.
        table3_lr_multiplier: Table 3's learning rate (x ``base_lr``).  The paper took
            0.4x of its own rate, "at the edge of instability" for Large+DCN; on
            the quick testbed that edge is at 0.5x of ours (0.2x trains Large+DCN
            to AUC 0.9, 0.5x leaves it near 0.6; docs/RESULTS.md).
        table3_runs: runs per Table 3 variant (the paper: 5 for "Clean", 3 for the others).
        table3_variants: Table 3's rows (names of ``TABLE3_VARIANTS``).
    """

    models: tuple[str, ...] = ("Small", "Large", "Large+DCN")
    methods: tuple[str, ...] = METHODS
    lr_multipliers: tuple[float, ...] = (1.0, 2.0)
    grids: tuple[tuple[str, tuple[float | None, ...]], ...] = tuple(PAPER_GRIDS.items())
    repeat_seeds: tuple[int, ...] = (0, 1, 2)
    table3_lr_multiplier: float = 0.5
    table3_runs: tuple[tuple[str, int], ...] = (("clean", 5),) + tuple(
        (v, 3) for v, _, _ in TABLE3_VARIANTS[1:]
    )

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in ALL_METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; known: {', '.join(ALL_METHODS)}")
        missing = [m for m in self.methods if m not in dict(self.grids)]
        if missing:
            raise ValueError(f"no threshold grid for methods {missing}")

    def grid(self, method: str) -> tuple[float | None, ...]:
        return dict(self.grids)[method]

    def search(self) -> list[RunSpec]:
        """Stage 1: every (model, method, multiplier, threshold) on seed 0."""
        return [
            RunSpec(model, method, mult, threshold, self.repeat_seeds[0])
            for model in self.models
            for method in self.methods
            for mult in self.lr_multipliers
            for threshold in self.grid(method)
        ]

    def table3(self) -> list[RunSpec]:
        models = {v: m for v, _, m in TABLE3_VARIANTS}
        return [
            RunSpec(models[variant], "naive", self.table3_lr_multiplier, None, seed, variant)
            for variant, runs in self.table3_runs
            for seed in range(runs)
        ]


#: ``--quick``: what it drops, to finish within ~10 minutes on two CPU cores --
#: Table 2 on the Small model only (no Large, no Large+DCN), one threshold per
#: method (figure 4b's GC 1e-1 and AGC 1e-3, the paper's chosen LAMB mu 1e-3),
#: best settings repeated over 2 seeds instead of 3, and Table 3 reduced to one
#: run of "Clean" (Large+DCN) and one of "Remove DCN" (Large).
QUICK_PLAN = Plan(
    models=("Small",),
    grids=(
        ("naive", (None,)),
        ("GC", (1e-1,)),
        ("AGC", (1e-3,)),
        ("LAMB", (1e-3,)),
        ("Clippy", (None,)),
        ("GC-eq2", (1e-1,)),
        *((m, (1e-3,)) for m in FORM_METHODS if m.startswith("AGC")),
    ),
    repeat_seeds=(0, 1),
    table3_runs=(("clean", 1), ("no_dcn", 1)),
)
#: ... and runs a shorter log: 8 days of 2048 rows (shift on day 4), 40 steps of
#: 512 per day, a 160-step warm-up, one evaluation per day.
QUICK_TESTBED = Testbed(
    warmup_steps=160,
    data=SyntheticConfig(num_days=8, rows_per_day=2048, shift_days=(4,)),
    protocol=ProtocolConfig(batch_size=512, steps_per_day=40, evals_per_day=1, eval_rows=1024),
    # 120 steps follow the shift: full divergence = no recovery within 100 steps;
    # the recovery test is tighter (2 instead of 4 deviations) because the losses
    # before the shift come from a shorter, noisier training.
    detector=DetectorConfig(recovery_window=100, recovery_zscore=2.0),
)


def customised_plan(
    plan: Plan,
    methods: Sequence[str] | None = None,
    baseline_forms: bool = False,
    paper_grids: bool = False,
    repeat_seeds: Sequence[int] | None = None,
) -> Plan:
    """``plan`` with other ``methods`` (None: its own), the ``FORM_METHODS`` added
    (``baseline_forms``), section 5.1.3's full grids (``paper_grids``) and other
    ``repeat_seeds`` (the first is the search's).  Run names depend on the spec
    only, so cached runs of the same settings are reused."""
    chosen = tuple(methods) if methods else plan.methods
    if baseline_forms:
        chosen += tuple(m for m in FORM_METHODS if m not in chosen)
    grids = dict(plan.grids)
    if paper_grids:
        grids = {**grids, **PAPER_GRIDS}
    grids = {**{m: PAPER_GRIDS[m] for m in chosen if m in PAPER_GRIDS}, **grids}
    seeds = tuple(repeat_seeds) if repeat_seeds else plan.repeat_seeds
    return dataclasses.replace(plan, methods=chosen, grids=tuple(grids.items()), repeat_seeds=seeds)


# --------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------
class Progress:
    """A one-line progress bar: runs done, elapsed, estimated time left.

    Time left is estimated from the runs that trained in this process only, so
    runs loaded from an earlier, interrupted experiment do not make it look short.
    """

    def __init__(self, total: int, stream: Any = None, width: int = 24) -> None:
        self.total, self.done, self.width = total, 0, width
        self.trained, self.trained_seconds = 0, 0.0
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def line(self, label: str = "") -> str:
        elapsed = time.perf_counter() - self.start
        left = (
            self.trained_seconds / self.trained * (self.total - self.done)
            if self.trained
            else float("nan")
        )
        filled = int(self.width * self.done / max(1, self.total))
        bar = "#" * filled + "-" * (self.width - filled)
        return (
            f"[{bar}] {self.done}/{self.total} runs | {_duration(elapsed)} elapsed "
            f"| ~{_duration(left)} left | {label}"
        )

    def show(self, label: str = "") -> None:
        end = "\r" if self._tty else "\n"
        print(
            self.line(label).ljust(110 if self._tty else 0), end=end, file=self.stream, flush=True
        )

    def advance(self, label: str = "", seconds: float | None = None) -> None:
        """One more run done; ``seconds`` it trained, or None if it was loaded."""
        self.done += 1
        if seconds is not None:
            self.trained, self.trained_seconds = self.trained + 1, self.trained_seconds + seconds
        self.show(label)

    def close(self) -> None:
        if self._tty:
            print(file=self.stream)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(round(seconds), 60)
    return f"{m}m{s:02d}s"


# --------------------------------------------------------------------------
# Selection and tables
# --------------------------------------------------------------------------
def primary_metrics(testbed: Testbed) -> tuple[str, str]:
    """Table 2's two columns (5.2): the first binary task's AUC, the first regression task's RMSE."""
    tasks = testbed.data.tasks
    binary = next(t.name for t in tasks if t.kind == "binary")
    regression = next(t.name for t in tasks if t.kind == "regression")
    return f"auc/{binary}", f"rmse/{regression}"


def best_setting(outcomes: Sequence[Outcome], auc: str, rmse: str) -> Outcome | None:
    """The run with the best AUC (then RMSE) among those that did not fully diverge."""
    alive = [o for o in outcomes if not o.diverged and math.isfinite(o.final.get(auc, math.nan))]
    if not alive:
        return None
    return max(alive, key=lambda o: (round(o.final[auc], 4), -o.final.get(rmse, math.inf)))


def _mean_std(values: Sequence[float], fmt: str) -> str:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return "n/a"
    return f"{fmt.format(np.mean(values))} ± {fmt.format(np.std(values))}"


@dataclasses.dataclass
class ExperimentResult:
    """Everything an experiment produced (also written to ``<out>``)."""

    search: list[Outcome]
    best: dict[tuple[str, str], RunSpec | None]
    repeats: dict[tuple[str, str], list[Outcome]]
    table3: list[Outcome]
    table2_md: str
    table3_md: str
    figure: str
    wall_s: float


def table2_cells(
    method: str, spec: RunSpec | None, runs: Sequence[Outcome], auc: str, rmse: str
) -> tuple[str, str, str]:
    """(AUC %, RMSE, best learning rate and notes) of one method: mean ± std over
    the repeats that did not fully diverge; notes count full and micro-divergences (2.1)."""
    if spec is None:
        return ("diverged",) * 3
    alive = [o for o in runs if not o.diverged]
    note = table2_note(runs, alive)
    t = f", {THRESHOLD_NAMES[method]}={spec.threshold:g}" if spec.threshold is not None else ""
    return (
        _mean_std([100 * o.final[auc] for o in alive], "{:.2f}"),
        _mean_std([o.final[rmse] for o in alive], "{:.3f}"),
        f"{spec.lr_multiplier:g}x{t}{note}",
    )


def table2(plan: Plan, testbed: Testbed, best: dict, repeats: dict) -> str:
    """Table 2: mean ± std over the repeats of each method's best setting (``table2_cells``),
    the paper's methods as columns; then ``baseline_forms_table`` when the plan has
    methods beyond the paper's."""
    auc, rmse = primary_metrics(testbed)
    columns = [m for m in plan.methods if m in METHODS]
    lines = []
    if columns:
        lines = [
            "| Model | Metric | " + " | ".join(columns) + " |",
            "|" + "---|" * (len(columns) + 2),
        ]
    metrics = (
        f"AUC % ({auc.split('/')[1]}, higher is better)",
        f"RMSE ({rmse.split('/')[1]}, lower is better)",
        "Best learning rate (runs)",
    )
    for model in plan.models if columns else ():
        cells = [
            table2_cells(m, best.get((model, m)), repeats.get((model, m), []), auc, rmse)
            for m in columns
        ]
        for i, metric in enumerate(metrics):
            row = " | ".join(c[i] for c in cells)
            lines.append(f"| {model if i == 0 else ''} | {metric} | {row} |")
    forms = baseline_forms_table(plan, testbed, best, repeats)
    return "\n".join(lines) + ("\n\n" if lines and forms else "") + forms


def baseline_forms_table(plan: Plan, testbed: Testbed, best: dict, repeats: dict) -> str:
    """GC and AGC in every form the plan ran, one labelled row each (issue 17): eq. 5
    (the paper's unified form, Table 2's GC and AGC columns) against eq. 2, and
    whole-tensor AGC against unit-wise.  Empty unless the plan has ``FORM_METHODS``."""
    if not any(m in FORM_METHODS for m in plan.methods):
        return ""
    auc, rmse = primary_metrics(testbed)
    lines = [
        "GC and AGC as the paper ran them: Table 2's GC and AGC scale the step (eq. 5); "
        "eq. 2 clips the gradient before Adagrad's accumulator; unit-wise AGC clips per "
        "output unit (NFNets).",
        "",
        f"| Model | Method | Form | AUC % ({auc.split('/')[1]}) | RMSE ({rmse.split('/')[1]}) "
        "| Best learning rate (runs) |",
        "|---|---|---|---|---|---|",
    ]
    for model in plan.models:
        for method in (m for m in plan.methods if m in BASELINE_FORMS):
            spec, runs = best.get((model, method)), repeats.get((model, method), [])
            cells = " | ".join(table2_cells(method, spec, runs, auc, rmse))
            lines.append(f"| {model} | {method} | {BASELINE_FORMS[method].label} | {cells} |")
    return "\n".join(lines)


def table2_note(runs: Sequence[Outcome], alive: Sequence[Outcome]) -> str:
    """`` (1/3 diverged (1 by AUC collapse), 2/3 micro-diverged, 1/3 consistently)``: the
    full divergences (those found by the evaluation AUC alone counted apart), runs with a
    micro-divergence and runs consistently micro-diverging (``episodes.repeated_micro``)."""
    notes = []
    if len(alive) < len(runs):
        by_auc = sum(o.auc_collapsed for o in runs)
        auc = f" ({by_auc} by AUC collapse)" if by_auc else ""
        notes.append(f"{len(runs) - len(alive)}/{len(runs)} diverged{auc}")
    micro = sum(any(e["kind"] == "micro" for e in o.events) for o in alive)
    if micro:
        notes.append(f"{micro}/{len(runs)} micro-diverged")
    consistent = sum(o.consistently_micro for o in alive)
    if consistent:
        notes.append(f"{consistent}/{len(runs)} consistently micro-diverged")
    return f" ({', '.join(notes)})" if notes else ""


#: A run that ends with its last-day AUC (first binary task) below this is no
#: better than chance, where the paper's full divergences end (AUC 0.5).  Table 3
#: counts such runs beside the detector's full divergences, because on the
#: testbed a run can get there without a loss spike the detector would call full:
#: naive Large+DCN at 0.5x never learns its binary tasks, and after the sudden
#: shift its loss climbs gradually (the detector's baseline follows it) while its
#: ReLUs die; naive Large at 0.5x loses what it learned at the shift while its
#: loss returns to the pre-shift level (a "micro" event by the loss, though the
#: AUC stays at 0.5).
NEAR_CHANCE_AUC = 0.6


def ended_near_chance(outcome: Outcome, auc: str) -> bool:
    """No full divergence recorded, but the last-day AUC is below ``NEAR_CHANCE_AUC``."""
    return not outcome.diverged and outcome.final.get(auc, math.nan) < NEAR_CHANCE_AUC


def table3(outcomes: Sequence[Outcome], auc: str) -> str:
    """Table 3: the ratio of naive Adagrad runs that failed, per variant: fully
    diverged (a ``full`` event in the run record; those found by the AUC alone counted
    in brackets) or ended near chance (``ended_near_chance``).  Runs consistently
    micro-diverging (``Outcome.consistently_micro``) are counted apart, not as failures.
    Empty when there are no runs."""
    if not outcomes:
        return ""
    labels = {v: (label, model) for v, label, model in TABLE3_VARIANTS}
    lines = [
        "| Specific change | Model | #Fully diverged | #Ended near chance "
        "| #Consistently micro-diverging | #Tried | Failure ratio | Last-day AUC % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for variant, (label, model) in labels.items():
        runs = [o for o in outcomes if o.spec.variant == variant]
        if not runs:
            continue
        diverged = sum(o.diverged for o in runs)
        by_auc = sum(o.auc_collapsed for o in runs)
        dead = sum(ended_near_chance(o, auc) for o in runs)
        consistent = sum(o.consistently_micro for o in runs)
        aucs = ", ".join(f"{100 * o.final.get(auc, math.nan):.0f}" for o in runs)
        full = f"{diverged} ({by_auc} by AUC collapse)" if by_auc else f"{diverged}"
        lines.append(
            f"| {label} | {model} | {full} | {dead} | {consistent} | {len(runs)} "
            f"| {100 * (diverged + dead) / len(runs):.0f}% | {aucs} |"
        )
    return "\n".join(lines)


def figure5(
    plan: Plan, testbed: Testbed, best: dict, repeats: dict, search: Sequence[Outcome]
) -> Any:
    """Figure 5: evaluation AUC over training per method (best setting, first seed), one panel per model."""
    from plotly.subplots import make_subplots

    auc, _ = primary_metrics(testbed)
    colors = {
        "naive": "#7f7f7f",
        "GC": "#1f77b4",
        "AGC": "#ff7f0e",
        "LAMB": "#2ca02c",
        "Clippy": "#d62728",
        "GC-eq2": "#17becf",
        "AGC-eq2": "#bcbd22",
        "AGC-unitwise": "#8c564b",
        "AGC-unitwise-eq2": "#e377c2",
    }
    fig = make_subplots(
        rows=1, cols=len(plan.models), subplot_titles=list(plan.models), shared_yaxes=True
    )
    for col, model in enumerate(plan.models, start=1):
        for method in plan.methods:
            runs = repeats.get((model, method)) or [
                max(
                    (o for o in search if o.spec.model == model and o.spec.method == method),
                    key=lambda o: o.steps,
                    default=None,
                )
            ]
            run = runs[0] if runs and runs[0] is not None else None
            if run is None:
                continue
            steps = [p["step"] for p in run.curve]
            values = [100 * p[auc] for p in run.curve]
            name = f"{method} ({run.spec.lr_multiplier:g}x)" + (" diverged" if run.diverged else "")
            fig.add_scatter(
                x=steps,
                y=values,
                mode="lines+markers",
                name=name,
                legendgroup=method,
                showlegend=col == 1 or run.diverged,
                line={"color": colors.get(method), "dash": "dot" if run.diverged else "solid"},
                row=1,
                col=col,
            )
        fig.update_xaxes(title_text="training step", row=1, col=col)
    fig.update_yaxes(title_text=f"eval {auc} (%) on the last day", row=1, col=1)
    fig.update_layout(
        title="Evaluation AUC during sequential training (cf. paper Figure 5)",
        height=450,
        width=420 * len(plan.models),
    )
    return fig


# --------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------
Runner = Callable[[RunSpec, Testbed, Path], Outcome]


@dataclasses.dataclass
class RunWithProgress:
    """Runs (or loads, when cached) one spec and shows it on the progress bar, if any."""

    out: Path
    testbed: Testbed
    run: Runner
    bar: Progress | None

    def __call__(self, spec: RunSpec) -> Outcome:
        loaded = result_file(self.out, spec).exists()
        if self.bar is not None:
            self.bar.show(f"{'loading' if loaded else 'running'} {spec.label}")
        began = time.perf_counter()
        outcome = self.run(spec, self.testbed, self.out)
        if self.bar is not None:
            self.bar.advance(
                f"{spec.label}: {'DIVERGED' if outcome.diverged else 'ok'}",
                None if loaded else time.perf_counter() - began,
            )
        return outcome


def repeat_best(
    plan: Plan, search: list[Outcome], do: RunWithProgress, auc: str, rmse: str
) -> tuple[dict[tuple[str, str], RunSpec | None], dict[tuple[str, str], list[Outcome]]]:
    """Each (model, method)'s best search setting, repeated over the other seeds:
    ``(best spec or None, [winner, *repeats])`` keyed by ``(model, method)``."""
    best: dict[tuple[str, str], RunSpec | None] = {}
    repeats: dict[tuple[str, str], list[Outcome]] = {}
    for model in plan.models:
        for method in plan.methods:
            winner = best_setting(
                [o for o in search if o.spec.model == model and o.spec.method == method], auc, rmse
            )
            best[(model, method)] = winner.spec if winner else None
            if winner is None:
                if do.bar is not None:  # nothing to repeat: count the skipped runs as done
                    do.bar.total -= len(plan.repeat_seeds) - 1
                continue
            more = [do(dataclasses.replace(winner.spec, seed=s)) for s in plan.repeat_seeds[1:]]
            repeats[(model, method)] = [winner, *more]
    return best, repeats


def run_experiment(
    out: str | Path,
    plan: Plan = Plan(),
    testbed: Testbed = Testbed(),
    *,
    table3_enabled: bool = True,
    progress: bool = True,
    runner: Runner | None = None,
) -> ExperimentResult:
    """Run the search, the repeats and Table 3; write ``table2.md``, ``table3.md``,
    ``figure5.html``, ``results.json`` and ``RESULTS.md`` to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    auc, rmse = primary_metrics(testbed)
    search_specs = plan.search()
    t3_specs = plan.table3() if table3_enabled else []
    n_repeat = len(plan.models) * len(plan.methods) * (len(plan.repeat_seeds) - 1)
    bar = Progress(len(search_specs) + n_repeat + len(t3_specs)) if progress else None
    start = time.perf_counter()
    do = RunWithProgress(out, testbed, runner or (lambda spec, tb, o: run_one(spec, tb, o)), bar)
    search = [do(spec) for spec in search_specs]
    best, repeats = repeat_best(plan, search, do, auc, rmse)
    t3 = [do(spec) for spec in t3_specs]
    if bar is not None:
        bar.close()

    t2_md, t3_md = (table2(plan, testbed, best, repeats) if plan.models else ""), table3(t3, auc)
    figure_path = out / "figure5.html" if plan.models else None
    if figure_path is not None:
        figure5(plan, testbed, best, repeats, search).write_html(
            str(figure_path), include_plotlyjs=True
        )
    wall = time.perf_counter() - start
    result = ExperimentResult(search, best, repeats, t3, t2_md, t3_md, str(figure_path or ""), wall)
    _write(out, plan, testbed, result)
    return result


def _write(out: Path, plan: Plan, testbed: Testbed, result: ExperimentResult) -> None:
    if result.table2_md:
        (out / "table2.md").write_text(result.table2_md + "\n")
    (out / "table3.md").write_text(result.table3_md + "\n")
    all_runs = (
        result.search + [o for runs in result.repeats.values() for o in runs[1:]] + result.table3
    )
    summary = {
        "plan": dataclasses.asdict(plan),
        "testbed": json.loads(json.dumps(dataclasses.asdict(testbed), default=str)),
        "best": {
            f"{m}/{k}": dataclasses.asdict(s) if s else None for (m, k), s in result.best.items()
        },
        "runs": [
            {
                "name": o.spec.name,
                "diverged": o.diverged,
                "final": o.final,
                "steps": o.steps,
                "wall_s": o.wall_s,
                "events": o.events,
            }
            for o in all_runs
        ],
        "wall_s": result.wall_s,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1, default=float))
    search_lines = [
        "| Model | Method | LR | Threshold | Diverged | AUC % | RMSE |",
        "|---|---|---|---|---|---|---|",
    ]
    auc, rmse = primary_metrics(testbed)
    for o in result.search:
        t = "" if o.spec.threshold is None else f"{o.spec.threshold:g}"
        search_lines.append(
            f"| {o.spec.model} | {o.spec.method} | {o.spec.lr_multiplier:g}x | {t} | {'yes' if o.diverged else 'no'} "
            f"| {100 * o.final.get(auc, math.nan):.2f} | {o.final.get(rmse, math.nan):.3f} |"
        )
    (out / "RESULTS.md").write_text(
        "# Experiment results\n\n"
        f"base learning rate (1x) = {testbed.base_lr:g}, warm-up {testbed.warmup_steps} steps, "
        f"scale {testbed.scale:g}; "
        f"wall time {_duration(result.wall_s)}\n\n"
        "## Table 2\n\n" + (result.table2_md or "(not run)") + "\n\n"
        "## Table 3\n\n" + (result.table3_md or "(not run)") + "\n\n"
        "## Every search run (seed 0)\n\n" + "\n".join(search_lines) + "\n"
    )
