"""The one vocabulary of clippy-monitor: per-layer metrics, clipping rules, moments, event kinds.

Every reader (the post-mortem, the Dash app, the TensorBoard tab) takes names, labels,
colours and heatmap reductions from here; the TensorBoard front end receives
:func:`to_json`.  The order of :data:`METRICS` is the order of ``LAYER_METRICS`` in a
record.  Imports nothing beyond the standard library.

Adding a per-layer metric: its formula in ``monitor/statistics.py`` and one row in
:data:`METRICS`.  Adding a clipping rule: its factor in ``clipping.py`` (and where the
monitor computes it, ``statistics.finish_statistics``) and one :class:`Rule` row in
:data:`RULES`; its factor's :class:`Metric` row is made from the rule.

Readers look rows up when they draw (:func:`metrics`, :func:`metric`, ...), so a row
added at run time shows everywhere; the tuples and dicts below are for imports.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TypeVar

KINDS = ("measurement", "norm", "factor", "count", "share")


@dataclass(frozen=True)
class Metric:
    """One per-layer statistic recorded at every step."""

    name: str
    label: str  # short notation, as in the paper's Figure 4b
    kind: str  # one of KINDS; "measurement": what a clipping rule compares to its threshold
    reduce: str  # what a heatmap keeps of a bucket of steps, "max" or "min": the alarming end
    unit: str = ""
    rule: str | None = None  # for a factor, the rule whose factor it is
    color: str | None = None
    description: str = ""
    title: str = ""  # heatmap title where it differs from the label
    shown: bool = True  # drawn by the per-layer views; False: only listed (TensorBoard chips)

    @property
    def heading(self) -> str:
        """The title of a plot of this metric."""
        return self.title or self.label

    @property
    def log_scale(self) -> bool:
        """Shares (0..1) are drawn on a linear scale, everything else on a log scale."""
        return self.kind != "share"

    @property
    def primary(self) -> bool:
        """A measurement or a factor: the quantities of the paper's Figure 4b."""
        return self.kind in ("measurement", "factor")


@dataclass(frozen=True)
class Rule:
    """A clipping rule: the factor it would apply and what it measures (paper section 3).

    Its factor is the per-layer metric ``<name>_factor`` (:meth:`factor_metric`).
    """

    name: str
    label: str
    measurement: str | None  # the Metric it compares to its threshold (None: the applied factor)
    color: str
    equation: str  # where the paper defines it
    figure_4b: bool  # drawn in the paper's Figure 4b (right)
    factor_description: str = ""
    factor_title: str = ""
    factor_shown: bool = True

    @property
    def factor(self) -> str:
        """The name of the Metric holding its factor."""
        return f"{self.name}_factor"

    def factor_metric(self) -> Metric:
        """The per-layer metric of its factor: a bucket of steps keeps its minimum (hardest clip)."""
        return Metric(
            self.factor,
            f"σ {self.label}",
            "factor",
            "min",
            rule=self.name,
            color=self.color,
            description=self.factor_description,
            title=self.factor_title,
            shown=self.factor_shown,
        )


@dataclass(frozen=True)
class Moment:
    """A marked step of a divergence episode (paper section 2.1)."""

    name: str
    label: str
    color: str


@dataclass(frozen=True)
class EventKind:
    """A kind of episode or verdict, and how it is shown."""

    name: str
    label: str
    color: str


# Figure 4b's colours: ‖g‖₂ / GC blue, ‖g‖₂/‖w‖₂ / AGC orange, ‖r/w‖∞ / Clippy green.
GC_BLUE, AGC_ORANGE, CLIPPY_GREEN, APPLIED_GREY = "#1f77b4", "#ff7f0e", "#2ca02c", "#6b7280"

_MEASURED: tuple[Metric, ...] = (
    Metric(
        "grad_norm",
        "‖g‖₂",
        "measurement",
        "max",
        color=GC_BLUE,
        description="L2 norm of the layer's gradient",
        title="‖g‖₂ (GC's measurement)",
    ),
    Metric(
        "weight_norm",
        "‖w‖₂",
        "norm",
        "max",
        description="L2 norm of the layer's weights",
        shown=False,
    ),
    Metric(
        "grad_weight_ratio",
        "‖g‖₂/‖w‖₂",
        "measurement",
        "max",
        color=AGC_ORANGE,
        description="gradient norm over weight norm",
        title="‖g‖₂ / ‖w‖₂ (AGC's measurement)",
    ),
    Metric(
        "update_weight_linf",
        "‖r/w‖∞",
        "measurement",
        "max",
        color=CLIPPY_GREEN,
        description="largest |update / weight| of the unclipped step",
        title="‖r/w‖∞ (Clippy's measurement)",
    ),
)
_COUNTED: tuple[Metric, ...] = (
    Metric(
        "nonfinite_count",
        "non-finite",
        "count",
        "max",
        description="NaN or infinite gradient entries",
        shown=False,
    ),
    Metric(
        "zero_grad_fraction",
        "zero-grad fraction",
        "share",
        "max",
        description="share of gradient entries that are zero",
        title="share of zero gradients (dead units)",
    ),
)

RULES: tuple[Rule, ...] = (
    Rule(
        "gc", "GC", "grad_norm", GC_BLUE, "eq. 2", True,
        "factor gradient clipping would apply", "GC factor",
    ),
    Rule(
        "agc", "AGC", "grad_weight_ratio", AGC_ORANGE, "eq. 3", True,
        "factor adaptive gradient clipping would apply", "AGC factor",
    ),
    Rule(
        "clippy", "Clippy", "update_weight_linf", CLIPPY_GREEN, "eq. 4", True,
        "factor Clippy would apply", "Clippy factor (bright = clips hard)",
    ),
    Rule(
        "applied", "applied", None, APPLIED_GREY, "", False,
        "factor the optimizer applied", factor_shown=False,
    ),
)  # fmt: skip

#: Every per-layer metric, in record order: the measurements, each rule's factor, the counts.
METRICS: tuple[Metric, ...] = (*_MEASURED, *(r.factor_metric() for r in RULES), *_COUNTED)

MOMENTS: tuple[Moment, ...] = (
    Moment("step_a", "step-a", "#6b7280"),  # the last healthy step
    Moment("step_b", "step-b", "#d97706"),  # the loss starts rising
    Moment("step_c", "step-c", "#dc2626"),  # fully diverged
)
RECOVERED = Moment("recovered", "recovered", "#059669")  # a micro-divergence's end

EVENT_KINDS: tuple[EventKind, ...] = (
    EventKind("healthy", "healthy", "#15803d"),
    EventKind("micro", "micro-divergence", "#f59e0b"),
    EventKind("full", "full divergence", "#dc2626"),
    EventKind("abnormal", "abnormal", "#dc2626"),
    EventKind("no data", "no data", "#6b7280"),
    # The recovery ladder (clippy_monitor.recovered).
    EventKind("skipped", "skipped step", "#7c3aed"),
    EventKind("rollback", "rollback", "#2563eb"),
    EventKind("gave_up", "gave up", "#991b1b"),
)


# ------------------------------------------------------------------------------ lookups

Row = TypeVar("Row", Metric, Rule, Moment)


def metrics() -> tuple[Metric, ...]:
    """Every metric, in record order."""
    return METRICS


def _named(rows: tuple[Row, ...], name: str, what: str) -> Row:
    """The row called ``name``; KeyError if there is none."""
    for row in rows:
        if row.name == name:
            return row
    raise KeyError(f"unknown {what} {name!r}")


def metric(name: str) -> Metric:
    """The metric ``name``; KeyError if the catalog has none."""
    return _named(METRICS, name, "metric")


def rules() -> tuple[Rule, ...]:
    """Every clipping rule, the applied factor last."""
    return RULES


def rule(name: str) -> Rule:
    """The rule ``name``; KeyError if the catalog has none."""
    return _named(RULES, name, "rule")


def label(name: str) -> str:
    """The label of a metric, or its name if the catalog does not know it."""
    return next((m.label for m in METRICS if m.name == name), name)


def reduce_of(name: str) -> str:
    """How a heatmap bucket of the metric is reduced ("max" for unknown metrics)."""
    return next((m.reduce for m in METRICS if m.name == name), "max")


def measurements() -> tuple[str, ...]:
    """The metrics the rules measure, in record order (the left of Figure 4b)."""
    return tuple(m.name for m in METRICS if m.kind == "measurement")


def figure_4b_rules() -> tuple[str, ...]:
    """The rules drawn in Figure 4b (right): GC, AGC and Clippy."""
    return tuple(r.name for r in RULES if r.figure_4b)


def rule_of(name: str) -> Rule | None:
    """The rule whose factor or measurement metric ``name`` is, else None."""
    return next((r for r in RULES if name in (r.factor, r.measurement)), None)


def is_clippys(name: str) -> bool:
    """Whether metric ``name`` is Clippy's measurement or factor (the paper's subject)."""
    owner = rule_of(name)
    return owner is not None and owner.name == "clippy"


def moment(name: str) -> Moment:
    """step_a, step_b, step_c or recovered."""
    return _named((*MOMENTS, RECOVERED), name, "moment")


def to_json() -> dict:
    """The whole catalog as plain JSON, for front ends."""
    return {
        "metrics": [
            {
                **dataclasses.asdict(m),
                "heading": m.heading,
                "log_scale": m.log_scale,
                "primary": m.primary,
            }
            for m in METRICS
        ],
        "rules": [{**dataclasses.asdict(r), "factor": r.factor} for r in RULES],
        "moments": [dataclasses.asdict(m) for m in (*MOMENTS, RECOVERED)],
        "event_kinds": [dataclasses.asdict(k) for k in EVENT_KINDS],
    }


# ------------------------------------------------------------------ names for imports

LAYER_METRICS: tuple[str, ...] = tuple(m.name for m in METRICS)
METRIC_LABELS: dict[str, str] = {m.name: m.label for m in METRICS}
HEATMAP_REDUCE: dict[str, str] = {m.name: m.reduce for m in METRICS}
FACTOR_METRICS: dict[str, str] = {r.name: r.factor for r in RULES}
RULE_NAMES: tuple[str, ...] = tuple(r.name for r in RULES)
RULE_LABELS: dict[str, str] = {r.name: r.label for r in RULES}
RULE_COLORS: dict[str, str] = {r.name: r.color for r in RULES}
MOMENT_NAMES: tuple[str, ...] = tuple(m.name for m in MOMENTS)
MOMENT_LABELS: dict[str, str] = {m.name: m.label for m in MOMENTS}
MOMENT_COLORS: dict[str, str] = {m.name: m.color for m in MOMENTS}
KIND_COLORS: dict[str, str] = {k.name: k.color for k in EVENT_KINDS}
