"""Evaluation metrics in a run record, and the AUC-collapse rule (paper 2.1, 5.1.2).

Tang et al., KDD 2023 judge a full divergence by its evaluation metrics as well as
its loss: "the binary classification AUC ... drops to 0.5 ... the model becomes
completely useless" (section 2.1, Figure 1; Figure 4a's step-c).  A run can get
there without a loss spike the loss detector calls full (a gradual climb its
baseline follows; docs/RESULTS.md).  The monitor therefore accepts evaluation
metrics (``DivergenceMonitor.record_evaluation``) and stores each evaluation as an
``"evaluation"`` event of the record (docs/RECORD_FORMAT.md); :func:`auc_collapse`
is the one rule that turns a sequence of evaluations into a full divergence with
reason :data:`AUC_COLLAPSE`.  Plain Python: no TensorFlow.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from clippy_monitor.episodes import AUC_COLLAPSE, EVALUATION_KIND, Event, Recorded

__all__ = ["AUC_COLLAPSE", "AucRule", "Evaluation", "auc_collapse", "evaluations_of"]


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """One evaluation: ``step`` is the last training step whose update the evaluated
    model includes; ``metrics`` maps names to values (NaN where the value was missing,
    non-finite or not a number)."""

    step: int
    metrics: Mapping[str, float]

    def to_record(self) -> dict:
        """The events-file entry; a non-finite value is written as ``null`` (valid JSON)."""
        values = {k: (v if math.isfinite(v) else None) for k, v in self.metrics.items()}
        return {"kind": EVALUATION_KIND, "step": self.step, "metrics": values}

    @classmethod
    def from_record(cls, record: Any) -> Evaluation | None:
        """The evaluation of an events-file entry; None if it is not one (or has no step)."""
        if not isinstance(record, Mapping) or record.get("kind") != EVALUATION_KIND:
            return None
        step, metrics = record.get("step"), record.get("metrics")
        if type(step) is not int or not isinstance(metrics, Mapping):
            return None
        return cls(step, {str(k): as_metric(v) for k, v in metrics.items()})


def as_metric(value: Any) -> float:
    """``value`` as a float; NaN for anything that is not a real number (None, text, bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:  # numpy and TensorFlow scalars
            value = float(value)
        except (TypeError, ValueError):
            return math.nan
    return float(value)


def is_auc(name: str) -> bool:
    """Whether metric ``name`` is an AUC: ``auc`` in its name (``auc/click``, ``val_auc``,
    ``val_click_auc_1``), case-insensitive."""
    return "auc" in name.lower()


def evaluations_of(run: Recorded) -> list[Evaluation]:
    """The evaluations recorded in ``run``'s events, by step (file order among equal steps)."""
    found = (Evaluation.from_record(e) for e in run.events)
    return sorted((e for e in found if e is not None), key=lambda e: e.step)


@dataclasses.dataclass(frozen=True)
class AucRule:
    """When an AUC has fallen to chance (a random ranker's AUC is 0.5).

    An AUC metric *collapses* at the ``consecutive``-th evaluation in a row at or
    below ``chance`` once it had reached ``learned`` at an earlier evaluation.
    ``learned`` 0.6 is the testbed's "no better than chance" line
    (``testbed.experiments.NEAR_CHANCE_AUC``): a model that never got there never
    learned the task and cannot lose it.  ``chance`` 0.55 leaves room for the noise
    of an AUC on a few thousand examples around 0.5.  ``consecutive`` 2: one bad
    evaluation (a transient micro-divergence caught mid-spike) is not a verdict;
    with two evaluations a day the verdict comes within a day.  A NaN value (no
    value, non-finite, not a number) neither counts nor breaks a streak; a value
    outside [0, 1] is not an AUC and is treated as NaN.
    """

    chance: float = 0.55
    learned: float = 0.6
    consecutive: int = 2

    def __post_init__(self) -> None:
        if not 0.0 <= self.chance < self.learned <= 1.0:
            raise ValueError(f"AucRule: need 0 <= chance < learned <= 1, got {self}")
        if isinstance(self.consecutive, bool) or int(self.consecutive) != self.consecutive:
            raise ValueError(f"AucRule: consecutive must be an integer, got {self.consecutive!r}")
        if self.consecutive < 1:
            raise ValueError(f"AucRule: consecutive must be >= 1, got {self.consecutive}")


def _auc_values(evaluations: Sequence[Evaluation], name: str) -> list[tuple[int, float]]:
    """``(step, value)`` of metric ``name`` where it is a finite AUC in [0, 1]."""
    pairs = ((e.step, as_metric(e.metrics.get(name))) for e in evaluations)
    return [(s, v) for s, v in pairs if math.isfinite(v) and 0.0 <= v <= 1.0]


def _collapse_of(values: list[tuple[int, float]], rule: AucRule) -> tuple[int, int, int] | None:
    """``(step_a, step_b, step_c)`` of the first collapse in one metric's values: the
    last evaluation above chance, the first of the streak at chance, the streak's
    ``consecutive``-th; None when the rule does not fire."""
    learned, streak, last_above = False, 0, None
    for i, (step, value) in enumerate(values):
        if learned and value <= rule.chance:
            streak += 1
            if streak == rule.consecutive:
                return last_above, values[i - streak + 1][0], step
            continue
        streak = 0
        learned = learned or value >= rule.learned
        last_above = step
    return None


def auc_collapse(evaluations: Iterable[Evaluation], rule: AucRule | None = None) -> Event | None:
    """The full divergence (reason :data:`AUC_COLLAPSE`) of the first AUC metric to
    collapse under ``rule`` (:class:`AucRule`), None if none does.

    step-a is the last evaluation above chance, step-b the first at chance, step-c
    the evaluation that made the streak (Figure 4a: "AUC dropped to 0.5" at step-c);
    ``series`` names the metric.  Metrics that are not AUCs (:func:`is_auc`) are ignored.
    Of several evaluations at one step the last counts (the testbed evaluates the final
    model again after the monitor's last flush), so one model is never counted twice.
    """
    rule = rule or AucRule()
    latest = {e.step: e for e in evaluations}  # a later evaluation at a step supersedes
    ordered = sorted(latest.values(), key=lambda e: e.step)
    names = sorted({n for e in ordered for n in e.metrics if is_auc(n)})
    found = []
    for name in names:
        moments = _collapse_of(_auc_values(ordered, name), rule)
        if moments is not None:
            found.append((moments[2], name, moments))
    if not found:
        return None
    _, name, (step_a, step_b, step_c) = min(found)
    return Event("full", step_b, step_a, step_c, series=name, reason=AUC_COLLAPSE)
