"""How each clipping rule reacts at step-b with its threshold calibrated on the run's healthy steps.

Figure 4b of Tang et al. (KDD 2023) is about *sensitivity*: at step-b, how far
each rule's measurement -- ``||g||_2`` (GC, eq. 2), ``||g||_2/||w||_2`` (AGC,
eq. 3), ``||r/w||_inf`` (Clippy, eq. 4) -- moves relative to healthy training,
and so how hard each rule clips there when its threshold lets healthy training
through.  Comparing the factors at the paper's fixed thresholds instead mixes
that up with how well those thresholds suit the run.

Per rule and layer, :func:`calibrate` sets the what-if threshold to the
``quantile`` (0.99: 99% of healthy steps unclipped) of the measurement over the
healthy window (the ``window`` recorded steps up to and including step-a, or
before step-b without a step-a; all of them with ``window=None``), and reports

* the *jump ratio* of the measurement, its value at step-b over its healthy median;
* the factor the rule would apply at step-b with that threshold (:func:`rule_factor`).

The rule that *reacts most* clips hardest (smallest factor, on its
hardest-clipped layer); ties go to the largest jump.  NumPy only: no
TensorFlow, no Keras.  Reads a :class:`~clippy_monitor.record.Run` (or any
record view with ``steps``, ``layers``, ``layer_metrics`` and ``layer()``).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from clippy_monitor import catalog
from clippy_monitor.record import Run

#: Share of the healthy steps the calibrated threshold leaves unclipped.
DEFAULT_QUANTILE = 0.99
#: Fewer finite healthy values than this: no calibration (for the run, or for one layer).
MIN_HEALTHY = 20
#: The healthy window's length in recorded rows, ending at step-a: the steady state before
#: the event, not the optimizer's start-up transient (as the post-mortem's baseline, 200 rows).
DEFAULT_WINDOW = 200

#: The calibrated rule's form and the definitions it twins (``clippy_monitor.clipping``).
CALIBRATED_FORMS = {
    "gc": "gc_factor(||g||_2, clipnorm=t)",
    "agc": "agc_factor(||g||_2, ||w||_2, clipping=t)",
    "clippy": "clippy_sigma(||r/w||_inf / t): lambda_rel = eta t, lambda_abs = 0",
}


def rule_factor(measurement: np.ndarray | float, threshold: float) -> np.ndarray:
    """The factor a rule applies at ``threshold`` given its measurement ``m``: ``min(1, t / m)``, 1 for m = 0.

    The NumPy twin, written once, of ``clippy_monitor.clipping``'s factors
    expressed through their measurement: ``gc_factor(m, t)`` (eq. 2),
    ``agc_factor`` with ``m = grad_weight_ratio`` (eq. 3), and
    ``clippy_sigma(m / t)`` with a purely relative bound (eq. 4,
    ``lambda_abs = 0``, ``lambda_rel = eta t``).  ``tests/test_sensitivity.py``
    checks it against those functions.  NaN stays NaN; ``m = inf`` gives 0.
    """
    m = np.asarray(measurement, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        factor = np.minimum(1.0, threshold / np.where(m > 0, m, 1.0))
    return np.where(m > 0, factor, np.where(np.isnan(m), np.nan, 1.0))


@dataclasses.dataclass(frozen=True)
class LayerReaction:
    """One rule on one layer: its calibrated threshold, its measurement's jump, its factor at step-b.

    A None is a quantity that could not be computed; ``note`` says why.
    ``jump`` and ``value`` may be ``inf`` (a non-finite measurement at step-b).
    """

    layer: str
    rule: str
    threshold: float | None  # the healthy quantile of the measurement
    healthy_median: float | None
    value: float | None  # the measurement at step-b
    jump: float | None  # value / healthy_median
    factor: float | None  # rule_factor(value, threshold)
    note: str | None = None

    def to_report(self) -> dict:
        return {k: _json_number(v) for k, v in dataclasses.asdict(self).items()}


@dataclasses.dataclass(frozen=True)
class RuleReaction:
    """One rule over all layers: its hardest-clipped layer, and the layer its measurement jumped most."""

    rule: str
    label: str
    measurement: str
    measurement_label: str
    hardest: LayerReaction | None  # smallest factor (ties: largest jump); None: no layer calibrated
    largest_jump: LayerReaction | None

    @property
    def factor(self) -> float | None:
        return self.hardest.factor if self.hardest is not None else None

    def to_report(self) -> dict:
        return {
            "rule": self.rule,
            "label": self.label,
            "measurement": self.measurement,
            "measurement_label": self.measurement_label,
            "layer": self.hardest.layer if self.hardest else None,
            "factor": _json_number(self.factor),
            "jump": _json_number(self.hardest.jump if self.hardest else None),
            "threshold": _json_number(self.hardest.threshold if self.hardest else None),
            "largest_jump": _json_number(self.largest_jump.jump if self.largest_jump else None),
            "largest_jump_layer": self.largest_jump.layer if self.largest_jump else None,
        }


@dataclasses.dataclass(frozen=True)
class Sensitivity:
    """The calibrated comparison at one step-b (``note``: why there is none, else None)."""

    step_a: int | None
    step_b: int | None
    quantile: float
    healthy_steps: tuple[int, int] | None  # first and last step of the healthy window
    healthy_count: int
    rules: tuple[RuleReaction, ...] = ()
    layers: tuple[LayerReaction, ...] = ()  # every (layer, rule), layer-major
    reacts_most: str | None = None  # the rule that clips hardest
    largest_jump: str | None = None  # the rule whose measurement jumped most
    note: str | None = None

    @property
    def ok(self) -> bool:
        return self.reacts_most is not None

    def rule(self, name: str) -> RuleReaction | None:
        return next((r for r in self.rules if r.rule == name), None)

    def by_layer(self) -> dict[str, dict[str, LayerReaction]]:
        """``{layer: {rule: LayerReaction}}`` in record order."""
        out: dict[str, dict[str, LayerReaction]] = {}
        for x in self.layers:
            out.setdefault(x.layer, {})[x.rule] = x
        return out

    def to_report(self) -> dict:
        """Plain JSON (no NaN; ``inf`` as the string ``"inf"``); schema in docs/POSTMORTEM.md."""
        return {
            "step_a": self.step_a,
            "step_b": self.step_b,
            "quantile": self.quantile,
            "healthy_steps": list(self.healthy_steps) if self.healthy_steps else None,
            "healthy_count": self.healthy_count,
            "reacts_most": self.reacts_most,
            "largest_jump": self.largest_jump,
            "note": self.note,
            "text": summary_text(self),
            "rules": [r.to_report() for r in self.rules],
            "layers": {
                layer: {rule: x.to_report() for rule, x in rules.items()}
                for layer, rules in self.by_layer().items()
            },
        }


def _json_number(x: Any) -> Any:
    """``inf`` -> ``"inf"``, NaN -> None, everything else unchanged."""
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


def _float(x: Any) -> float | None:
    """A float (inf kept), None for NaN."""
    x = float(x)
    return None if math.isnan(x) else x


# --------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------
def healthy_rows(
    run: Run, step_a: int | None, step_b: int | None, window: int | None = DEFAULT_WINDOW
) -> slice | None:
    """Rows of the healthy window: the last ``window`` rows up to and including step-a (else
    before step-b; every such row with ``window=None``); None without step-b."""
    if step_b is None or not len(run):
        return None
    steps = np.asarray(run.steps)
    if step_a is not None:
        stop = int(np.searchsorted(steps, step_a, side="right"))
    else:
        stop = int(np.searchsorted(steps, step_b, side="left"))
    return slice(max(stop - window, 0) if window else 0, stop)


def _row_of(run: Run, step: int) -> int | None:
    i = int(np.searchsorted(run.steps, step))
    return i if i < len(run) and int(run.steps[i]) == step else None


def layer_reaction(
    layer: str, rule: str, healthy: np.ndarray, value: float, quantile: float
) -> LayerReaction:
    """Calibrate ``rule`` on one layer's ``healthy`` measurements and evaluate it at ``value``."""
    finite = healthy[np.isfinite(healthy)].astype(np.float64)
    at = _float(value)
    if finite.size < MIN_HEALTHY:
        note = f"{finite.size} finite healthy values ({MIN_HEALTHY} needed)"
        return LayerReaction(layer, rule, None, None, at, None, None, note)
    threshold, median = float(np.quantile(finite, quantile)), float(np.median(finite))
    if at is None:
        return LayerReaction(layer, rule, threshold, median, None, None, None, "NaN at step-b")
    if threshold <= 0:
        note = "the measurement was 0 on the healthy steps: no threshold to calibrate"
        return LayerReaction(layer, rule, None, median, at, None, None, note)
    jump = at / median if median > 0 else (math.inf if at > 0 else None)
    factor = float(rule_factor(at, threshold))
    note = "healthy median 0" if median <= 0 else None
    return LayerReaction(layer, rule, threshold, median, at, jump, factor, note)


def _jump_key(x: LayerReaction) -> float:
    return x.jump if x.jump is not None else -math.inf


def rule_reaction(rule: catalog.Rule, reactions: list[LayerReaction]) -> RuleReaction:
    """Summarise one rule's per-layer reactions: its hardest-clipped layer and its largest jump."""
    scored = [x for x in reactions if x.factor is not None]
    hardest = min(scored, key=lambda x: (x.factor, -_jump_key(x))) if scored else None
    jumped = [x for x in reactions if x.jump is not None]
    largest = max(jumped, key=_jump_key) if jumped else None
    label = catalog.label(rule.measurement or "")
    return RuleReaction(rule.name, rule.label, rule.measurement or "", label, hardest, largest)


def calibrate(
    run: Run,
    step_a: int | None,
    step_b: int | None,
    quantile: float = DEFAULT_QUANTILE,
    window: int | None = DEFAULT_WINDOW,
    min_healthy: int = MIN_HEALTHY,
) -> Sensitivity:
    """The calibrated comparison of GC, AGC and Clippy (``catalog.figure_4b_rules``) at ``step_b``."""
    rows = healthy_rows(run, step_a, step_b, window)
    b = _row_of(run, step_b) if step_b is not None else None
    count = rows.stop - rows.start if rows else 0
    span = (int(run.steps[rows.start]), int(run.steps[rows.stop - 1])) if count else None
    empty = Sensitivity(step_a, step_b, quantile, span, count)
    if rows is None or b is None:
        return dataclasses.replace(empty, note="no recorded step-b: nothing to compare")
    if count < min_healthy:
        note = f"only {count} healthy steps before step-b ({min_healthy} needed to calibrate)"
        return dataclasses.replace(empty, note=note)
    rules, layers = _reactions(run, rows, b, quantile)
    if not any(r.hardest for r in rules):
        return dataclasses.replace(
            empty, rules=rules, layers=layers, note="no layer could be calibrated"
        )
    scored = [r for r in rules if r.hardest is not None]
    most = min(scored, key=lambda r: (r.factor, -_jump_key(r.hardest)))
    jumped = [r for r in rules if r.largest_jump is not None]
    top = max(jumped, key=lambda r: _jump_key(r.largest_jump)) if jumped else None
    return dataclasses.replace(
        empty, rules=rules, layers=layers, reacts_most=most.rule, largest_jump=top and top.rule
    )


def _reactions(
    run: Run, rows: slice, b: int, quantile: float
) -> tuple[tuple[RuleReaction, ...], tuple[LayerReaction, ...]]:
    """Every (layer, rule) reaction and each rule's summary; a rule whose measurement was not recorded is left out."""
    per_rule: dict[str, list[LayerReaction]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for rule in map(catalog.rule, catalog.figure_4b_rules()):
            if rule.measurement not in run.layer_metrics:
                continue
            values = np.asarray(run.layer(rule.measurement), np.float64)
            per_rule[rule.name] = [
                layer_reaction(layer, rule.name, values[rows, j], values[b, j], quantile)
                for j, layer in enumerate(run.layers)
            ]
    rules = tuple(rule_reaction(catalog.rule(name), xs) for name, xs in per_rule.items())
    layers = tuple(per_rule[r][j] for j in range(len(run.layers)) for r in per_rule)
    return rules, layers


def event_sensitivity(
    run: Run,
    event: Mapping[str, Any] | None,
    quantile: float = DEFAULT_QUANTILE,
    window: int | None = DEFAULT_WINDOW,
) -> Sensitivity:
    """:func:`calibrate` at an event's step-a and step-b (a report event or a record event)."""
    event = event or {}
    return calibrate(run, event.get("step_a"), event.get("step_b"), quantile, window)


# --------------------------------------------------------------------------
# Words
# --------------------------------------------------------------------------
def _fmt(x: float | None) -> str:
    if x is None:
        return "n/a"
    return "inf" if math.isinf(x) else f"{x:.3g}"


def rule_phrase(r: RuleReaction) -> str:
    """``σ GC 0.0412 on b/kernel (‖g‖₂ 30.1x its healthy median)``."""
    if r.hardest is None:
        return f"σ {r.label} n/a"
    return (
        f"σ {r.label} {_fmt(r.factor)} on {r.hardest.layer} "
        f"({r.measurement_label} {_fmt(r.hardest.jump)}x its healthy median)"
    )


def summary_text(s: Sensitivity) -> str:
    """One sentence: which rule reacts most at step-b, each rule's factor and jump; or why there is none."""
    if not s.ok:
        return f"no calibrated comparison: {s.note}"
    most = s.rule(s.reacts_most)
    first, last = s.healthy_steps or (None, None)
    calibrated = f"with thresholds calibrated on the healthy steps {first}..{last} ({s.quantile:.0%} unclipped)"
    if most.factor is not None and most.factor >= 1.0:
        top = s.rule(s.largest_jump) or most
        jump = top.largest_jump
        return (
            f"{calibrated}, no rule would clip at step-b (every measurement within its healthy "
            f"{s.quantile:.0%} quantile); the largest jump is {top.label}'s: "
            f"{top.measurement_label} {_fmt(jump.jump if jump else None)}x its healthy median "
            f"on {jump.layer if jump else 'n/a'}"
        )
    others = [rule_phrase(r) for r in s.rules if r.rule != s.reacts_most]
    return (
        f"{calibrated}, {most.label} reacts most at step-b: "
        f"{rule_phrase(most)}, against {' and '.join(others) or 'no other rule'}"
    )
