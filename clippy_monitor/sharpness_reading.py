"""Preconditioned sharpness against step-b: the one reading of it off a run record.

``DivergenceMonitor(..., sharpness_every=N)`` records two per-step series, NaN on
the steps it did not probe: ``sharpness`` (the top eigenvalue of the loss Hessian
on a training batch) and ``preconditioned_sharpness`` (of ``P^1/2 H P^1/2``, ``P``
the optimizer's per-coordinate step; ``clippy_monitor.sharpness``).  On a quadratic
the optimizer is stable while the preconditioned sharpness stays below 2 (Tang et
al., KDD 2023, section 3.2; Cohen et al. 2021).  :func:`first_crossing` says
whether and when it first went above 2, relative to step-b; the post-mortem, the
Dash app and the TensorBoard tab all call it.  Plain Python and NumPy: no TensorFlow.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from clippy_monitor.episodes import Recorded

#: The recorded series (``DivergenceMonitor(..., sharpness_every=N)``), in record order.
SHARPNESS, PRECONDITIONED = "sharpness", "preconditioned_sharpness"
SERIES = (SHARPNESS, PRECONDITIONED)
#: The stability threshold of the preconditioned sharpness (eta * lambda < 2 on a quadratic).
THRESHOLD = 2.0
#: How every reader draws the two series (the post-mortem, Dash, TensorBoard).
COLORS = {PRECONDITIONED: "#c62828", SHARPNESS: "#1565c0"}


@dataclasses.dataclass(frozen=True)
class Crossing:
    """When the preconditioned sharpness first went above ``threshold``.

    ``probes``: steps with a recorded value, not NaN (0: not probed).  ``step`` and
    ``value``: the first such step whose value exceeds ``threshold`` (None if none
    did).  ``step_b``: the onset it is read against (None for a run without one).
    ``window_probes`` and ``peak``: the probes up to step-b (the whole run without one)
    and their largest value (None if not finite).
    """

    probes: int
    step: int | None
    value: float | None
    step_b: int | None
    window_probes: int
    peak: float | None
    threshold: float = THRESHOLD

    @property
    def status(self) -> str:
        """``not_probed``, ``not_crossed``, ``crossed`` (no step-b), ``before`` (at or before
        step-b) or ``after`` (first above the threshold after step-b)."""
        if not self.probes:
            return "not_probed"
        if self.step is None:
            return "not_crossed"
        if self.step_b is None:
            return "crossed"
        return "before" if self.step <= self.step_b else "after"

    @property
    def lead(self) -> int | None:
        """Steps from the crossing to step-b (negative when it came after); None without both."""
        if self.step is None or self.step_b is None:
            return None
        return self.step_b - self.step

    def describe(self) -> str:
        """One sentence: ``crossed 2 at step S, K steps before step-b (B)`` and its kin."""
        limit = f"{self.threshold:g}"
        n = self.window_probes
        peak = f"{n} probe{'s' if n != 1 else ''}, max {_fmt(self.peak)}"
        status = self.status
        if status == "not_probed":
            return "not probed"
        if status == "crossed":
            return f"crossed {limit} at step {self.step} ({_fmt(self.value)}; {peak}; no step-b)"
        if status == "not_crossed" and self.step_b is None:
            return f"stayed below {limit} ({peak})"
        if status == "before":
            return (
                f"crossed {limit} at step {self.step} ({_fmt(self.value)}), {self.lead} steps "
                f"before step-b ({self.step_b}; {peak} up to it)"
            )
        after = (
            f"; first above it at step {self.step}, {-self.lead} steps after"
            if self.step is not None
            else ""
        )
        return f"did not cross {limit} before step-b ({self.step_b}; {peak} up to it){after}"

    def to_report(self) -> dict:
        """The post-mortem's ``sharpness`` object (docs/POSTMORTEM.md)."""
        return {
            "series": PRECONDITIONED,
            "threshold": self.threshold,
            "status": self.status,
            "probes": self.probes,
            "probes_to_step_b": self.window_probes if self.step_b is not None else None,
            "step": self.step,
            "value": self.value,
            "step_b": self.step_b,
            "steps_before_step_b": self.lead,
            "peak": self.peak,
            "text": self.describe(),
        }


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def first_crossing(
    steps: np.ndarray, values: np.ndarray, step_b: int | None, threshold: float = THRESHOLD
) -> Crossing:
    """The first step whose ``values`` entry exceeds ``threshold``, read against
    ``step_b`` (None: a run without an onset); NaN entries are steps not probed."""
    values = np.asarray(values, np.float64)
    probed = ~np.isnan(values)
    above = np.flatnonzero(probed & (values > threshold))
    window = probed if step_b is None else probed & (np.asarray(steps) <= step_b)
    peak = float(values[window].max()) if window.any() else None
    first = int(above[0]) if above.size else None
    return Crossing(
        probes=int(probed.sum()),
        step=None if first is None else int(steps[first]),
        value=None if first is None else float(values[first]),
        step_b=step_b,
        window_probes=int(window.sum()),
        peak=peak if peak is None or math.isfinite(peak) else None,
        threshold=threshold,
    )


def read_crossing(run: Recorded, step_b: int | None) -> Crossing:
    """:func:`first_crossing` of the run's ``preconditioned_sharpness`` (not probed when absent)."""
    if PRECONDITIONED not in run.series_names:
        return Crossing(probes=0, step=None, value=None, step_b=step_b, window_probes=0, peak=None)
    return first_crossing(run.steps, run.series(PRECONDITIONED), step_b)
