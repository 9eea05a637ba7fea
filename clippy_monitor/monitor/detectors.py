"""Loss-divergence detection (Tang et al., KDD 2023, sections 2.1, 3.1 and 4.1).

The paper tells two kinds of loss divergence apart (section 2.1, Figure 1):

* **micro-divergence** (model-a): a sudden jump of the training loss, or of one
  task's loss, that recovers to the pre-jump level as training continues;
* **full divergence** (model-b): the loss becomes very high within a few steps
  and never recovers; at the end the gradient norm of the top layers collapses
  to a small value (dying ReLU, section 4.1, Figure 4b).

Figure 4a names three moments: *step-a*, the last healthy step; *step-b*, the
onset, where the loss starts to rise; *step-c*, where the model is fully
diverged (footnote 2: the loss at its divergent level, the top layers' gradient
norm collapsed). The detector learns of each a little after it happened, so an
event also records when it knew: ``confirmed_at`` (the onset) and
``decided_at`` (the full divergence).

One implementation serves two places:

* :class:`DivergenceDetector` is a per-step state machine written in TensorFlow
  ops only (``tf.where``, no Python branches on tensors, static shapes,
  float32). It runs inside a compiled Keras train step -- ``tf.function``,
  ``jit_compile=True`` included -- with its whole state in one flat float32
  vector, so the caller keeps it in a single ``tf.Variable``, snapshots it with
  the run record and restores it on resume.
* :func:`detect_divergence` / :func:`detector_outputs`
  (:mod:`clippy_monitor.monitor.offline`, re-exported here) run the *same*
  ``DivergenceDetector.step`` offline over a NumPy loss series with ``tf.scan``
  inside an XLA-compiled ``tf.function`` on the CPU.

:class:`EventTracker` turns the per-step outputs into events on the host,
incrementally, so an episode may span two flushes of the training loop.

Detection rule (per series; series 0 is the total loss, series 1.. the tasks):

* baseline ``b`` = EMA of the loss over *healthy* steps, ``d`` = EMA of its
  absolute deviation ``|loss - b|`` (same decay; a plain running mean while
  fewer than ``1/(1-decay)`` steps have been seen, so the first steps do not
  bias it towards zero). Both are frozen during an episode and never see a
  non-finite value, so a spike or a NaN cannot poison them, and they keep
  adapting while healthy, so a day-boundary level shift that stays under the
  spike threshold is absorbed within ~``1/(1-decay)`` steps;
* a step *exceeds* when, after warm-up, some series has
  ``loss > max(b * spike_ratio, b + spike_zscore * d)``;
* ``confirm_steps`` consecutive exceeding steps confirm an onset (at
  ``confirmed_at``, the last of them); step_b is back-dated to where the
  excursion left the healthy band: the first of the consecutive steps, up to
  the confirmation, with the series that moved first (the task whose loss
  exceeded most at the first exceeding step) above its *recovery* threshold
  (below), at most ``onset_lookback`` steps before the first exceeding step and
  never during warm-up (a noisy step of another series does not move it);
  step_a = the step before it, the last one inside the band. The state's
  ``out_run`` slots count those steps per series, so training and the offline
  run share the one definition (the onset is reported retroactively: see ``step``);
* an episode recovers at the first step where every series is back at or below
  ``max(b * recovery_ratio, b + recovery_zscore * d)`` (hysteresis: this is
  lower than the spike threshold, so a diverged loss hovering around the spike
  threshold does not flicker between "recovered" and "abnormal");
* full divergence: a non-finite loss, grad norm or gradient (immediately, also
  from a healthy state and during warm-up); a gradient norm below
  ``grad_collapse_ratio`` times its healthy EMA while the loss is above its
  spike threshold; a dead layer (some layer's gradient, non-zero earlier in the
  run, is at least ``dead_layer_share`` exact zeros for ``dead_layer_steps``
  consecutive steps: every ReLU unit of it died, section 4.1); or no recovery
  within ``recovery_window`` steps of step_b. Full divergence is absorbing; the
  step it is declared is ``decided_at``.
* step_c: for ``no_recovery``, the first step from step_b on where the total
  loss is at its divergent level: within a noise band around its median over
  the last quarter of the episode before the decision
  (:func:`~clippy_monitor.episodes.divergence_step`, on the host:
  :class:`EventTracker` keeps the episode's loss rows); for
  ``non_finite``, ``grad_collapse`` and ``dead_layer`` the decision step itself
  (the non-finite step; the collapsed gradient norm, the paper's mark of step-c;
  the ``dead_layer_steps``-th consecutive dead step).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf

# The encoding of the status output, shared with the record's readers (re-exported).
from clippy_monitor.episodes import Event, divergence_step
from clippy_monitor.record.status import (
    ABNORMAL,
    DIVERGED,
    HEALTHY,
    REASON_DEAD_LAYER,
    REASON_GRAD_COLLAPSE,
    REASON_NO_RECOVERY,
    REASON_NON_FINITE,
    REASONS,
    decode_status,
)

__all__ = [
    "ABNORMAL",
    "DIVERGED",
    "HEALTHY",
    "REASONS",
    "STEP_PARAMS",
    "DetectorConfig",
    "DetectorState",
    "DivergenceDetector",
    "EventTracker",
    "dead_layer_signal",
    "decode_status",
    "detect_divergence",
    "detector_outputs",
    "step_params",
]


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DetectorConfig:
    """Thresholds of :class:`DivergenceDetector` (defaults tuned on the synthetic
    cases of ``tests/test_detectors.py``: lognormal minibatch noise with sigma up
    to 0.2, day-boundary level shifts of x0.75..x1.35, a steep start, and spikes
    of x3..x10).

    Attributes:
        warmup_steps: no detection until the baseline has formed (50 healthy
            steps; non-finite values are still caught during warm-up).
        baseline_decay: EMA decay of the healthy loss (per series), of its
            absolute deviation and of the healthy gradient norm; 0.98 = a ~50-step
            memory, short enough to absorb a day-boundary level shift within a
            few hundred steps, long enough to average minibatch noise.
        spike_ratio: a step exceeds when the loss is above ``baseline *
            spike_ratio`` ... 2.0: a benign level shift of up to ~x1.4 plus a
            3-sigma noise excursion (sigma 0.1) stays below it, a x3 spike does not.
        spike_zscore: ... and above ``baseline + spike_zscore * deviation``
            (deviation = EMA of |loss - baseline|, ~0.8 sigma of Gaussian noise);
            8.0 lifts the threshold above ~x2.3 when the noise is large (sigma 0.2),
            where the ratio test alone fires on noise.
        confirm_steps: consecutive exceeding steps needed to confirm an onset
            (``confirmed_at`` is the last of them; step_b is back-dated, see
            ``onset_lookback``). 2: a single-step noise outlier right
            after a level shift is the main false-positive source; requiring two
            squares its probability, while the paper's divergences last hundreds
            of steps. 1 = report on the exceeding step itself.
        recovery_ratio: the episode recovers at the first step where every loss
            is back at or below ``baseline * recovery_ratio`` ... 1.2: "recovers to
            normal" (Figure 1, model-a).
        recovery_zscore: ... or below ``baseline + recovery_zscore * deviation``,
            whichever is larger; 4.0 (half the spike z-score) keeps one noisy
            minibatch from delaying the recovery step when the noise is large.
        recovery_window: not recovered within this many steps of step_b => full
            divergence, decided at step_b + recovery_window (step_c, where the loss
            reached its divergent level, comes before). 200: the paper's model-b
            went from step-b to step-c in ~100 steps (198.8k -> 198.9k).
        grad_collapse_ratio: the global gradient norm below this fraction of its
            healthy EMA while some loss is above its spike threshold => full
            divergence ("grad_collapse", dying ReLU, section 4.1); 1e-3 is far
            below ordinary step-to-step variation of the norm.
        dead_layer_share, dead_layer_steps: a layer whose gradient was non-zero
            earlier in the run and now has at least this share of exactly-zero
            entries for this many consecutive steps => full divergence
            ("dead_layer": its ReLU units died, section 4.1). 0.99 and 20: replayed
            over 312 testbed runs, this flagged none of the 125 healthy ones, 13
            of the 91 that failed without a loss event (the loss climbed
            gradually, or never fell) and 11 of the 33 full divergences. 0 steps
            disables the test.
        onset_lookback: how far step_b may be back-dated before the first step
            above the spike threshold, to where the excursion left the band below
            the recovery threshold (at most ``recovery_window - confirm_steps``, so an
            onset is never confirmed past its window). 50: the baselines' memory
            (``1/(1-decay)``); 0 = step_b is the first exceeding step.
    """

    warmup_steps: int = 50
    baseline_decay: float = 0.98
    spike_ratio: float = 2.0
    spike_zscore: float = 8.0
    confirm_steps: int = 2
    recovery_ratio: float = 1.2
    recovery_zscore: float = 4.0
    recovery_window: int = 200
    grad_collapse_ratio: float = 1e-3
    dead_layer_share: float = 0.99
    dead_layer_steps: int = 20
    onset_lookback: int = 50

    def __post_init__(self) -> None:
        for name in (
            "warmup_steps",
            "confirm_steps",
            "recovery_window",
            "dead_layer_steps",
            "onset_lookback",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value:
                raise TypeError(f"DetectorConfig.{name} must be an int, got {value!r}")
            object.__setattr__(self, name, int(value))
        for field in dataclasses.fields(self):
            if field.type in ("float", float):
                object.__setattr__(self, field.name, float(getattr(self, field.name)))
        checks = {
            "warmup_steps": self.warmup_steps >= 1,
            "baseline_decay": 0.0 < self.baseline_decay < 1.0,
            "spike_ratio": self.spike_ratio > 1.0,
            "spike_zscore": self.spike_zscore >= 0.0,
            "confirm_steps": self.confirm_steps >= 1,
            "recovery_ratio": 1.0 <= self.recovery_ratio <= self.spike_ratio,
            "recovery_zscore": 0.0 <= self.recovery_zscore <= self.spike_zscore,
            "recovery_window": self.recovery_window >= self.confirm_steps,
            "grad_collapse_ratio": 0.0 <= self.grad_collapse_ratio < 1.0,
            "dead_layer_share": 0.0 < self.dead_layer_share <= 1.0,
            "dead_layer_steps": self.dead_layer_steps >= 0,
            "onset_lookback": self.onset_lookback >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"DetectorConfig.{name}={getattr(self, name)!r} is out of range")

    def to_dict(self) -> dict[str, Any]:
        """Plain ``{field: value}`` (JSON-serialisable)."""
        return dataclasses.asdict(self)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The threshold names (the fields), in declaration order."""
        return tuple(field.name for field in dataclasses.fields(cls))

    @classmethod
    def unknown(cls, names: Iterable[str]) -> list[str]:
        """The entries of ``names`` that are not thresholds, in order (the one check of
        threshold names)."""
        known = set(cls.names())
        return [name for name in names if name not in known]

    @classmethod
    def known(cls, values: Mapping[str, Any]) -> dict[str, Any]:
        """The items of ``values`` that are thresholds (e.g. of a record's saved config)."""
        unknown = set(cls.unknown(values))
        return {name: value for name, value in values.items() if name not in unknown}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DetectorConfig:
        """Inverse of :meth:`to_dict`; an unknown key raises ``TypeError`` naming it."""
        unknown = cls.unknown(data)
        if unknown:
            raise TypeError(
                f"unknown detector threshold(s) {', '.join(map(repr, unknown))}; "
                f"known: {', '.join(sorted(cls.names()))}"
            )
        return cls(**dict(data))


# --------------------------------------------------------------------------
# The on-device state machine
# --------------------------------------------------------------------------
#: The thresholds the step reads, in the order of the offline runner's parameter
#: vector; ``count_cap`` is derived (:func:`step_params`).
STEP_PARAMS = (
    "warmup_steps",
    "baseline_decay",
    "spike_ratio",
    "spike_zscore",
    "confirm_steps",
    "recovery_ratio",
    "recovery_zscore",
    "recovery_window",
    "grad_collapse_ratio",
    "dead_layer_steps",
    "onset_lookback",
    "count_cap",
)


def step_params(config: DetectorConfig) -> dict[str, float]:
    """The :data:`STEP_PARAMS` of ``config`` as Python floats."""
    values = {name: float(getattr(config, name)) for name in STEP_PARAMS[:-1]}
    # An onset is never back-dated so far that it is confirmed past its recovery window.
    values["onset_lookback"] = float(
        max(0, min(config.onset_lookback, config.recovery_window - config.confirm_steps))
    )
    # Counters saturate at count_cap: beyond it the EMA rate is already
    # 1 - decay and warm-up is over, and float32 counting stays exact.
    values["count_cap"] = float(
        max(config.warmup_steps, math.ceil(1.0 / (1.0 - config.baseline_decay))) + 1
    )
    return values


class DetectorState(NamedTuple):
    """The detector's state, one float32 tensor per slot.

    :meth:`to_vector` lays the slots out in this order as ONE flat float32 vector
    of ``10 + 3 * num_series`` entries, the form the caller keeps in a
    ``tf.Variable`` and the run record saves; :meth:`from_vector` reads it back.
    """

    status: tf.Tensor  # 0 healthy, 1 abnormal, 2 diverged (exact integers)
    since_onset: tf.Tensor  # steps since step_b; -1 when healthy
    task: tf.Tensor  # series that moved first at onset; -1 when healthy
    reason: tf.Tensor  # 0, or REASON_* once diverged
    count: tf.Tensor  # healthy finite steps seen by the baselines (saturates)
    grad_ema: tf.Tensor  # EMA of the healthy global gradient norm
    grad_count: tf.Tensor  # healthy steps with a known grad norm (saturates)
    candidate: tf.Tensor  # consecutive exceeding (not yet confirmed) steps
    candidate_task: tf.Tensor  # task at the first of them; -1 when none
    dead_run: tf.Tensor  # consecutive steps with a dead layer
    baseline: tf.Tensor  # [num_series] EMA of the healthy loss
    deviation: tf.Tensor  # [num_series] EMA of |loss - baseline|
    out_run: tf.Tensor  # [num_series] consecutive healthy steps above the recovery band

    @classmethod
    def from_vector(cls, vector: tf.Tensor, num_series: int) -> DetectorState:
        """The slots of a flat float32 ``[10 + 3 * num_series]`` state vector."""
        n = num_series
        return cls(
            *tf.unstack(vector[:_H]),
            vector[_H : _H + n],
            vector[_H + n : _H + 2 * n],
            vector[_H + 2 * n : _H + 3 * n],
        )

    def to_vector(self) -> tf.Tensor:
        """The flat float32 state vector (inverse of :meth:`from_vector`)."""
        return tf.concat([tf.stack(self[:_H]), self.baseline, self.deviation, self.out_run], axis=0)


_HEADER = DetectorState._fields[:-3]  # the scalar slots, in order
_H = len(_HEADER)


class DivergenceDetector:
    """Per-step state machine in TensorFlow ops.

    State = ONE flat float32 vector of ``state_size = 10 + 3 * num_series``
    entries, the slots of :class:`DetectorState` in order (see
    :meth:`state_layout`)::

        [0] status        0 healthy / 1 abnormal / 2 diverged
        [1] since_onset   steps since step_b, -1 when healthy
        [2] task          series index that moved first, -1 when healthy
        [3] reason        0, 1 no_recovery, 2 non_finite, 3 grad_collapse, 4 dead_layer
        [4] count         healthy steps seen by the baselines (saturating)
        [5] grad_ema      EMA of the healthy global gradient norm
        [6] grad_count    healthy steps with a known gradient norm (saturating)
        [7] candidate     consecutive exceeding steps not yet confirmed
        [8] candidate_task series index at the first of them, -1 when none
        [9] dead_run      consecutive steps with a dead layer
        [10 : 10+N]       baseline: EMA of the healthy loss, per series
        [10+N : 10+2N]    deviation: EMA of |loss - baseline|, per series
        [10+2N : 10+3N]   out_run: per series, consecutive healthy steps up to the
                          last one above its recovery threshold (after warm-up;
                          saturates at the onset look-back): how far step_b is
                          back-dated when an onset is confirmed

    Args:
        num_series: 1 (total loss) + number of tasks; column 0 is the total loss.
        config: thresholds; baked into the traced graph as constants.
    """

    OUTPUT_NAMES = ("detector/status", "detector/since_onset", "detector/task")

    def __init__(self, num_series: int, config: DetectorConfig = DetectorConfig()) -> None:
        if isinstance(num_series, bool) or int(num_series) != num_series or num_series < 1:
            raise ValueError(f"num_series must be a positive int, got {num_series!r}")
        if not isinstance(config, DetectorConfig):
            raise TypeError(f"config must be a DetectorConfig, got {type(config).__name__}")
        self.num_series = int(num_series)
        self.config = config
        self.state_size = _H + 3 * self.num_series
        self._params = step_params(config)

    def __repr__(self) -> str:
        return f"DivergenceDetector(num_series={self.num_series}, config={self.config!r})"

    def state_layout(self) -> dict[str, slice]:
        """Name -> slice of the state vector (for snapshots and dashboards)."""
        layout = {name: slice(i, i + 1) for i, name in enumerate(_HEADER)}
        n = self.num_series
        layout["baseline"] = slice(_H, _H + n)
        layout["deviation"] = slice(_H + n, _H + 2 * n)
        layout["out_run"] = slice(_H + 2 * n, _H + 3 * n)
        return layout

    def initial_state(self) -> tf.Tensor:
        """float32 ``[state_size]``: healthy, no baseline yet."""
        head = np.zeros(_H, np.float32)
        head[_HEADER.index("since_onset")] = -1.0
        head[_HEADER.index("task")] = -1.0
        head[_HEADER.index("candidate_task")] = -1.0
        state = np.concatenate([head, np.zeros(3 * self.num_series, np.float32)])
        return tf.constant(state, tf.float32)

    def step(
        self,
        state: tf.Tensor,
        losses: tf.Tensor,
        grad_norm: tf.Tensor,
        grads_finite: tf.Tensor,
        dead_layer: tf.Tensor | bool = False,
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """Advance one training step.

        Args:
            state: float32 ``[state_size]``.
            losses: float32 ``[num_series]`` (column 0 = total loss); may hold NaN/Inf.
            grad_norm: float32 scalar, global L2 norm of all gradients; NaN/Inf
                count as non-finite; a negative value means "not measured"
                (disables the gradient-collapse test).
            grads_finite: bool scalar, False if any gradient holds NaN/Inf.
            dead_layer: bool scalar, True if some layer is dead at this step
                (:func:`dead_layer_signal`).

        Returns:
            ``(new_state, outputs)``, outputs float32 ``[3]`` =
            ``[status, since_onset, first_task]``:

            * status: 0 healthy, 1 abnormal (in a spike, not yet recovered),
              ``2 + reason/10`` fully diverged (2.1 no_recovery, 2.2 non_finite,
              2.3 grad_collapse, 2.4 dead_layer; absorbing). Use ``status >= 2`` or
              :func:`decode_status`.
            * since_onset: steps since step_b (0 at step_b), -1 when healthy.
              Outputs are causal: with ``confirm_steps = k`` the onset is known
              only at the k-th exceeding step, so step_b itself is output as
              healthy and the first abnormal row reads ``since_onset = k - 1``
              plus the steps above the recovery threshold before the first
              exceeding one (``out_run``, at most ``onset_lookback``); step_b =
              that row's step - since_onset (what EventTracker does). A
              non-finite step or a gradient collapse from a healthy state
              back-dates step_b likewise; a dead layer takes the first of its
              dead steps.
            * first_task: the series that moved first at onset, -1 when healthy.
              With tasks (num_series > 1) it is always a task column >= 1: the
              task whose loss exceeded its own spike threshold by the largest
              factor ``(loss - baseline) / (threshold - baseline)`` at step_b,
              or the first task with a non-finite loss; with a single series, 0;
              -1 for a non-finite onset where no loss is non-finite (gradients
              only).
        """
        return self._step(state, losses, grad_norm, grads_finite, dead_layer, self._params)

    def scan(
        self,
        state: tf.Tensor,
        losses: tf.Tensor,
        grad_norm: tf.Tensor,
        grads_finite: tf.Tensor,
        valid: tf.Tensor | None = None,
        params: Mapping[str, Any] | None = None,
        dead_layer: tf.Tensor | None = None,
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """:meth:`step` over ``T`` steps in order: ``losses`` ``[T, num_series]``,
        ``grad_norm``, ``grads_finite`` and ``dead_layer`` ``[T]`` (None: no dead
        layer).  Rows where ``valid`` is False (padding to a fixed ``T``, a skipped
        step) leave the state as it is and repeat the previous outputs.  ``T`` >= 1.

        Returns ``(final_state, outputs [T, 3])``.
        """
        params = self._params if params is None else params
        valid = tf.ones_like(grad_norm, tf.bool) if valid is None else valid
        dead_layer = tf.zeros_like(grad_norm, tf.bool) if dead_layer is None else dead_layer

        def body(
            carry: tuple[tf.Tensor, tf.Tensor], x: tuple[tf.Tensor, ...]
        ) -> tuple[tf.Tensor, tf.Tensor]:
            new_state, outputs = self._step(carry[0], x[0], x[1], x[2], x[4], params)
            return tf.where(x[3], new_state, carry[0]), tf.where(
                x[3], outputs, self._outputs_of(carry[0])
            )

        init = (tf.convert_to_tensor(state, tf.float32), tf.zeros([3], tf.float32))
        states, outputs = tf.scan(
            body, (losses, grad_norm, grads_finite, valid, dead_layer), initializer=init
        )
        return states[-1], outputs  # padding rows carry the last valid state

    def _outputs_of(self, state: tf.Tensor) -> tf.Tensor:
        """The outputs ``[status + 0.1 reason, since_onset, task]`` that ``state`` holds."""
        s = DetectorState.from_vector(tf.reshape(state, [self.state_size]), self.num_series)
        return tf.stack([s.status + 0.1 * s.reason, s.since_onset, s.task])

    def _step(
        self,
        state: tf.Tensor,
        losses: tf.Tensor,
        grad_norm: tf.Tensor,
        grads_finite: tf.Tensor,
        dead_layer: tf.Tensor | bool,
        p: Mapping[str, Any],
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """The body of :meth:`step`, with the thresholds ``p`` as Python floats
        (baked into the graph: the training path) or as float32 scalar tensors
        (graph inputs: the offline path, so one compilation serves every
        config)."""
        f32 = tf.float32
        s = DetectorState.from_vector(
            tf.reshape(tf.cast(state, f32), [self.state_size]), self.num_series
        )
        losses = tf.reshape(tf.cast(losses, f32), [self.num_series])
        grad_norm = tf.reshape(tf.cast(grad_norm, f32), [])
        grads_finite = tf.reshape(tf.cast(grads_finite, tf.bool), [])
        dead_layer = tf.reshape(tf.cast(dead_layer, tf.bool), [])

        was = _Phase.of(s.status)
        sig = _signals(s, losses, grad_norm, grads_finite, p)
        moves = _transitions(s, was, sig, dead_layer, p)
        status, reason = _status_and_reason(s, was, moves)
        healthy = status < 0.5
        since, task = _onset(s, was, moves, sig, healthy, p)
        pending = was.healthy & healthy & sig.any_exceed  # exceeding, not yet confirmed
        candidate, candidate_task = _candidate(s, pending, sig.spike_task)
        # The baselines see healthy, finite, non-exceeding steps only.
        baselines = _baselines(s, sig, grad_norm, healthy & ~pending, p)
        new = DetectorState(
            status=status,
            since_onset=since,
            task=task,
            reason=reason,
            candidate=candidate,
            candidate_task=candidate_task,
            dead_run=tf.where(dead_layer & ~was.full, s.dead_run + 1.0, 0.0),
            out_run=_out_run(s, sig, healthy, p),
            **baselines._asdict(),
        )
        return new.to_vector(), tf.stack([status + 0.1 * reason, since, task])


# --------------------------------------------------------------------------
# The step's parts (``p``: the STEP_PARAMS, Python floats or float32 scalars)
# --------------------------------------------------------------------------
class _Phase(NamedTuple):
    """The status a step starts from."""

    healthy: tf.Tensor
    abnormal: tf.Tensor
    full: tf.Tensor

    @classmethod
    def of(cls, status: tf.Tensor) -> _Phase:
        return cls(status < 0.5, (status > 0.5) & (status < 1.5), status > 1.5)


class _Signals(NamedTuple):
    """What one step's inputs say against the state, before any transition."""

    non_finite: tf.Tensor  # a loss, the gradient norm or a gradient is NaN/Inf
    excess: tf.Tensor  # [n] loss - baseline (0 where the loss is not finite)
    any_exceed: tf.Tensor  # a finite step, after warm-up, with a series above its spike threshold
    below: tf.Tensor  # every series at or below its recovery threshold
    above_band: tf.Tensor  # [n] the series is above its recovery threshold
    spike_task: tf.Tensor  # the series that exceeds by the largest factor
    non_finite_task: tf.Tensor  # the first series with a non-finite loss, -1 if none
    grad_known: tf.Tensor  # the gradient norm is measured and finite
    collapse: tf.Tensor  # the gradient norm is below grad_collapse_ratio x its healthy EMA


def _signals(
    s: DetectorState,
    losses: tf.Tensor,
    grad_norm: tf.Tensor,
    grads_finite: tf.Tensor,
    p: Mapping[str, Any],
) -> _Signals:
    """The step's :class:`_Signals` (finiteness, thresholds, onset tasks, gradient collapse)."""
    loss_finite = tf.math.is_finite(losses)
    non_finite = ~(tf.reduce_all(loss_finite) & (grads_finite & tf.math.is_finite(grad_norm)))
    safe = tf.where(loss_finite, losses, s.baseline)  # NaN never enters arithmetic
    excess = safe - s.baseline
    any_exceed, above_band, score = _exceedance(s, excess, non_finite, p)
    spike_task, non_finite_task = _onset_tasks(loss_finite, score)
    grad_known, collapse = _grad_collapse(s, grad_norm, p)
    return _Signals(
        non_finite,
        excess,
        any_exceed,
        ~tf.reduce_any(above_band),
        above_band,
        spike_task,
        non_finite_task,
        grad_known,
        collapse,
    )


_TINY = 1e-12  # the spike gap's floor: keeps ``score`` finite while the baseline is 0


def _exceedance(
    s: DetectorState, excess: tf.Tensor, non_finite: tf.Tensor, p: Mapping[str, Any]
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """``(any_exceed, above_band, score)`` against the spike threshold
    ``max(b * spike_ratio, b + spike_zscore * d)`` and (per series) the recovery
    threshold ``max(b * recovery_ratio, b + recovery_zscore * d)``; ``score`` =
    ``excess / (spike threshold - b)``, above 1 where a series exceeds."""
    b, d = s.baseline, s.deviation
    hi_gap = tf.maximum(tf.maximum(b * (p["spike_ratio"] - 1.0), p["spike_zscore"] * d), _TINY)
    lo_gap = tf.maximum(b * (p["recovery_ratio"] - 1.0), p["recovery_zscore"] * d)
    exceed = (s.count >= p["warmup_steps"]) & (excess > hi_gap)  # [n]
    any_exceed = tf.reduce_any(exceed) & ~non_finite
    return any_exceed, excess > lo_gap, excess / hi_gap


def _onset_tasks(loss_finite: tf.Tensor, score: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """``(spike_task, non_finite_task)``: with tasks, always a task column >= 1
    (the highest ``score``; the first non-finite task), else series 0."""
    total_non_finite = tf.where(loss_finite[0], -1.0, 0.0)
    if loss_finite.shape[0] == 1:
        return tf.constant(0.0), total_non_finite
    spike_task = tf.cast(tf.argmax(score[1:], output_type=tf.int32), tf.float32) + 1.0
    task_nf = ~loss_finite[1:]
    first_nf = (
        tf.cast(tf.argmax(tf.cast(task_nf, tf.int32), output_type=tf.int32), tf.float32) + 1.0
    )
    return spike_task, tf.where(tf.reduce_any(task_nf), first_nf, total_non_finite)


def _grad_collapse(
    s: DetectorState, grad_norm: tf.Tensor, p: Mapping[str, Any]
) -> tuple[tf.Tensor, tf.Tensor]:
    """``(grad_known, collapse)``: a measured norm below ``grad_collapse_ratio`` times
    its healthy EMA (dying ReLU, section 4.1)."""
    grad_known = tf.math.is_finite(grad_norm) & (grad_norm >= 0.0)
    collapse = (
        grad_known & (s.grad_count > 0.5) & (grad_norm < p["grad_collapse_ratio"] * s.grad_ema)
    )
    return grad_known, collapse


class _Transitions(NamedTuple):
    """This step's moves: into full divergence, one field per reason (named as in
    :data:`_REASON_PRIORITY`), and within or into an abnormal episode."""

    non_finite: tf.Tensor
    grad_collapse: tf.Tensor
    dead_layer: tf.Tensor
    no_recovery: tf.Tensor
    stays_abnormal: tf.Tensor  # abnormal, finite and not yet back below the recovery threshold
    confirmed: tf.Tensor  # healthy, and the confirm_steps-th exceeding step in a row


#: Why a step diverges fully, in priority order: the first transition that holds names it.
_REASON_PRIORITY = (
    ("non_finite", REASON_NON_FINITE),
    ("grad_collapse", REASON_GRAD_COLLAPSE),
    ("dead_layer", REASON_DEAD_LAYER),
    ("no_recovery", REASON_NO_RECOVERY),
)


def _transitions(
    s: DetectorState, was: _Phase, sig: _Signals, dead_layer: tf.Tensor, p: Mapping[str, Any]
) -> _Transitions:
    """Every transition allowed from ``was`` (full divergence is absorbing)."""
    live, finite = ~was.full, ~sig.non_finite
    loss_high = (was.abnormal & ~sig.below) | (was.healthy & sig.any_exceed)
    stays_abnormal = was.abnormal & finite & ~sig.below
    dead_steps = p["dead_layer_steps"]  # 0 disables the dead-layer test
    dead_long = (s.dead_run + 1.0 >= dead_steps) & (dead_steps > 0.5)
    return _Transitions(
        non_finite=live & sig.non_finite,
        grad_collapse=live & finite & loss_high & sig.collapse,
        dead_layer=live & finite & dead_layer & dead_long,
        no_recovery=stays_abnormal & ~sig.collapse & (s.since_onset + 1.0 >= p["recovery_window"]),
        stays_abnormal=stays_abnormal,
        confirmed=was.healthy & sig.any_exceed & (s.candidate + 1.0 >= p["confirm_steps"]),
    )


def _status_and_reason(
    s: DetectorState, was: _Phase, moves: _Transitions
) -> tuple[tf.Tensor, tf.Tensor]:
    """The new status, and the reason: kept once diverged, else the first of
    :data:`_REASON_PRIORITY` that holds (0 if none)."""
    becomes_full = functools.reduce(
        tf.logical_or, [getattr(moves, name) for name, _ in _REASON_PRIORITY]
    )
    status = tf.where(
        was.full | becomes_full, 2.0, tf.where(moves.stays_abnormal | moves.confirmed, 1.0, 0.0)
    )
    reason = 0.0
    for name, code in reversed(_REASON_PRIORITY):  # the highest priority applied last
        reason = tf.where(getattr(moves, name), float(code), reason)
    return status, tf.where(was.full, s.reason, reason)


def _onset(
    s: DetectorState,
    was: _Phase,
    moves: _Transitions,
    sig: _Signals,
    healthy: tf.Tensor,
    p: Mapping[str, Any],
) -> tuple[tf.Tensor, tf.Tensor]:
    """``(since_onset, task)`` after the step.  A new episode starts where the
    series that moved first left its healthy band: the first of its steps above
    its recovery threshold that run into this one (``out_run`` steps ago, at most
    ``onset_lookback``; never later than the first exceeding step, ``candidate``
    steps ago), or, for a dead layer from a healthy state, at its first dead step
    (``dead_run`` ago)."""
    dead_onset = was.healthy & moves.dead_layer & ~(moves.non_finite | moves.grad_collapse)
    new_task = tf.where(sig.non_finite, sig.non_finite_task, sig.spike_task)
    onset_task = tf.where(dead_onset, -1.0, tf.where(s.candidate > 0.5, s.candidate_task, new_task))
    # The series that moved first (every series' longest run when none is named).
    runs = tf.where(
        onset_task >= 0.0,
        tf.gather(s.out_run, tf.cast(tf.maximum(onset_task, 0.0), tf.int32)),
        tf.reduce_max(s.out_run),
    )
    back_dated = tf.maximum(s.candidate, tf.minimum(runs, p["onset_lookback"]))
    first_since = tf.where(dead_onset, s.dead_run, back_dated)
    since = tf.where(healthy, -1.0, tf.where(was.healthy, first_since, s.since_onset + 1.0))
    task = tf.where(healthy, -1.0, tf.where(was.healthy, onset_task, s.task))
    return since, task


def _out_run(
    s: DetectorState, sig: _Signals, healthy: tf.Tensor, p: Mapping[str, Any]
) -> tf.Tensor:
    """Per series, consecutive healthy, finite steps after warm-up, up to this one, with
    the series above its recovery threshold (saturating at ``onset_lookback``); else 0."""
    out = sig.above_band & (healthy & ~sig.non_finite & (s.count >= p["warmup_steps"]))
    return tf.where(out, tf.minimum(s.out_run + 1.0, p["onset_lookback"]), 0.0)


def _candidate(
    s: DetectorState, pending: tf.Tensor, spike_task: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """``(candidate, candidate_task)``: the run of unconfirmed exceeding steps and
    the task at its first step."""
    candidate = tf.where(pending, s.candidate + 1.0, 0.0)
    first_task = tf.where(s.candidate > 0.5, s.candidate_task, spike_task)
    return candidate, tf.where(pending, first_task, -1.0)


class _Baselines(NamedTuple):
    """The slots of :class:`DetectorState` that hold the healthy baselines."""

    count: tf.Tensor
    grad_ema: tf.Tensor
    grad_count: tf.Tensor
    baseline: tf.Tensor
    deviation: tf.Tensor


def _baselines(
    s: DetectorState, sig: _Signals, grad_norm: tf.Tensor, update: tf.Tensor, p: Mapping[str, Any]
) -> _Baselines:
    """The loss EMA and its deviation (per series) and the gradient-norm EMA, moved
    where ``update``; never fed a non-finite value."""
    baseline, count = _ema_step(s.baseline, sig.excess, s.count, update, p)
    grad_update = update & sig.grad_known
    safe_norm = tf.where(sig.grad_known, grad_norm, s.grad_ema)
    grad_delta = safe_norm - s.grad_ema
    grad_ema, grad_count = _ema_step(s.grad_ema, grad_delta, s.grad_count, grad_update, p)
    deviation = _deviation_step(s, sig.excess, update, p)
    return _Baselines(count, grad_ema, grad_count, baseline, deviation)


def _ema_step(
    ema: tf.Tensor, delta: tf.Tensor, count: tf.Tensor, update: tf.Tensor, p: Mapping[str, Any]
) -> tuple[tf.Tensor, tf.Tensor]:
    """``(ema + rate * delta, count + 1)`` where ``update``; ``rate`` =
    ``max(1 - decay, 1 / (count + 1))``: a running mean until ``1/(1-decay)`` steps
    were seen, so the first steps do not bias it towards zero."""
    rate = tf.maximum(1.0 - p["baseline_decay"], 1.0 / (count + 1.0))
    new_count = tf.where(update, tf.minimum(count + 1.0, p["count_cap"]), count)
    return tf.where(update, ema + rate * delta, ema), new_count


def _deviation_step(
    s: DetectorState, excess: tf.Tensor, update: tf.Tensor, p: Mapping[str, Any]
) -> tf.Tensor:
    """The EMA of ``|loss - baseline|`` (against the baseline before this step)."""
    count = s.count
    rate = tf.where(
        count > 0.5, tf.maximum(1.0 - p["baseline_decay"], 1.0 / tf.maximum(count, 1.0)), 0.0
    )
    return tf.where(update, s.deviation + rate * (tf.abs(excess) - s.deviation), s.deviation)


def dead_layer_signal(
    zero_share: tf.Tensor, alive: tf.Tensor, share: float, valid: tf.Tensor | None = None
) -> tuple[tf.Tensor, tf.Tensor]:
    """Which steps have a dead layer: ``(dead [T], alive [L])``.

    ``zero_share`` ``[T, L]`` is each layer's share of exactly-zero gradient
    entries (the record's ``zero_grad_fraction``), ``alive`` ``[L]`` which layers
    had a step below ``share`` before these rows.  A layer is dead at a step
    when its share is ``>= share`` after it was once below it, so a variable
    that never gets a gradient (always zeros) never counts.  Rows where
    ``valid`` is False count for nothing.  Returns the per-step signal and the
    ``alive`` mask after the rows (carried to the next chunk).
    """
    zero_share = tf.convert_to_tensor(zero_share, tf.float32)
    alive = tf.convert_to_tensor(alive, tf.bool)
    valid = (
        tf.ones(tf.shape(zero_share)[:1], tf.bool)
        if valid is None
        else tf.convert_to_tensor(valid, tf.bool)
    )
    live = tf.logical_and(zero_share < share, valid[:, None])
    seen = tf.cumsum(tf.cast(live, tf.float32), axis=0, exclusive=True) > 0.5
    alive_before = tf.logical_or(alive[None, :], seen)
    dead = tf.reduce_any(tf.logical_and(alive_before, zero_share >= share), axis=1)
    return tf.logical_and(dead, valid), tf.logical_or(alive, tf.reduce_any(live, axis=0))


# --------------------------------------------------------------------------
# Host side: events
# --------------------------------------------------------------------------
class _Rows(NamedTuple):
    """The rows an :class:`EventTracker` update sees: the remembered ones, then the new."""

    steps: np.ndarray  # int64 [m]
    loss: np.ndarray  # float64 [m]: the total loss (NaN where not given)
    offset: int  # index of the first new row


class EventTracker:
    """Turns per-step detector outputs into events, incrementally across flushes.

    Feed every row the detector produced, in order (``update`` may be called
    with any chunking; an event can span two flushes), with the total loss the
    detector saw (series 0), which step-c needs. :meth:`update_events` returns
    :class:`~clippy_monitor.episodes.Event` s; :meth:`update` the same as the
    record stores them::

        {"kind": "micro" | "full", "step_a": int | None, "step_b": int,
         "step_c": int | None, "recovered": int | None, "confirmed_at": int,
         "decided_at": int | None, "task": str | None,
         "reason": "spike" | "no_recovery" | "non_finite" | "grad_collapse" | "dead_layer"}

    * ``step_b`` = the onset (back-dated by the detector to where the excursion
      left the healthy band -- see ``DivergenceDetector.step``), ``step_a`` = the
      step fed just before it (the last healthy one; ``step_b - 1`` for
      consecutive step numbers), None if step_b is the very first step fed;
      ``confirmed_at`` = the first step the detector output as abnormal or diverged
      (when it knew of the onset);
    * micro: ``step_c`` and ``decided_at`` None, ``recovered`` = first healthy
      step after the spike, reason "spike";
    * full: ``recovered`` None, ``decided_at`` = first step with status 2,
      emitted once (status 2 is absorbing), reason why; ``step_c`` = the step
      the model had fully diverged: for ``no_recovery``
      :func:`~clippy_monitor.episodes.divergence_step` over the total loss (the
      decision step when no loss was fed), else the decision step itself (the
      non-finite step; the gradient collapse; a dead layer's
      ``dead_layer_steps``-th dead step).

    End of training: :meth:`finish` does NOT emit an abnormal episode that is
    still open -- it has neither recovered nor been declared fully diverged, so
    either kind would be a guess; :meth:`pending` reports it instead.

    Args:
        series_names: name of each detector series (index 0 = total loss), used
            for the ``task`` field.
    """

    # Rows kept to map a retroactive step_b across flushes; while an episode is
    # open, also every row from its step_a (at most onset_lookback + recovery_window).
    _HISTORY = 256

    def __init__(self, series_names: Sequence[str]) -> None:
        self.series_names = [str(s) for s in series_names]
        self._history = np.zeros(0, np.int64)
        self._loss_history = np.zeros(0, np.float64)
        self._seen = 0  # rows fed so far
        self._status = HEALTHY
        self._since = -1
        self._last_step: int | None = None
        self._episode: Event | None = None  # the open episode (kind "open")

    # -- helpers ----------------------------------------------------------
    def _task_name(self, index: float) -> str | None:
        i = int(round(float(index)))
        if i < 0:
            return None
        return self.series_names[i] if i < len(self.series_names) else f"series_{i}"

    def _open(self, rows: _Rows, row: int, step: int, since: int, task: float) -> None:
        j = rows.offset + row - since  # index of step_b in rows
        if j >= 0:
            step_b = int(rows.steps[j])
            if j >= 1:
                step_a: int | None = int(rows.steps[j - 1])
            else:
                seen_before = self._seen - rows.offset  # rows fed before rows[0]
                step_a = None if seen_before <= 0 else step_b - 1
        else:  # onset before anything fed or remembered: assume consecutive steps
            step_b = step - since
            step_a = step_b - 1
        self._episode = Event(
            "open",
            step_b,
            step_a=step_a,
            series=self._task_name(task),
            reason="spike",
            confirmed_at=step,
        )

    # -- API ----------------------------------------------------------------
    def update(
        self, steps: np.ndarray, outputs: np.ndarray, loss: np.ndarray | None = None
    ) -> list[dict]:
        """Consume the next rows; return the events COMPLETED in them, as record entries."""
        return [event.to_record() for event in self.update_events(steps, outputs, loss)]

    def update_events(
        self, steps: np.ndarray, outputs: np.ndarray, loss: np.ndarray | None = None
    ) -> list[Event]:
        """Consume the next rows (``loss``: the total loss of each, the detector's series
        0; None: unknown); return the :class:`~clippy_monitor.episodes.Event` s COMPLETED in them."""
        steps = np.asarray(steps, np.int64).reshape(-1)
        outputs = np.asarray(outputs, np.float32).reshape(-1, 3)
        loss = np.full(len(steps), np.nan) if loss is None else np.asarray(loss, np.float64)
        loss = loss.reshape(-1)
        if len(steps) != len(outputs) or len(steps) != len(loss):
            raise ValueError(
                f"{len(steps)} steps but {len(outputs)} output rows and {len(loss)} losses"
            )
        if len(steps) == 0:
            return []
        status = np.floor(outputs[:, 0] + 1e-3).astype(np.int64)
        prev = np.concatenate([[self._status], status[:-1]])
        rows = _Rows(
            np.concatenate([self._history, steps]),
            np.concatenate([self._loss_history, loss]),
            len(self._history),
        )
        events = [
            event
            for i in np.flatnonzero(status != prev)
            if (event := self._change(rows, int(i), outputs[i], int(status[i]), int(prev[i])))
        ]
        self._status = int(status[-1])
        self._since = int(round(float(outputs[-1, 1])))
        self._last_step = int(steps[-1])
        self._seen += len(steps)
        self._remember(rows)
        return events

    def _remember(self, rows: _Rows) -> None:
        """Keep the last ``_HISTORY`` rows, and every row from the open episode's step_a."""
        keep = max(0, len(rows.steps) - self._HISTORY)
        if self._episode is not None and self._episode.step_b is not None:
            start = int(np.searchsorted(rows.steps, self._episode.step_b)) - 1
            keep = min(keep, max(start, 0))
        self._history = rows.steps[keep:].copy()
        self._loss_history = rows.loss[keep:].copy()

    def _change(self, rows: _Rows, row: int, output: np.ndarray, s: int, p: int) -> Event | None:
        """The status went from ``p`` to ``s`` at ``row``: open, close or complete an episode.

        A tracker created mid-episode (e.g. on resume) sees its first row as a
        0 -> 1 change and takes step_b = step - since_onset.
        """
        since = int(round(float(output[1])))
        step = int(rows.steps[rows.offset + row])
        if p == DIVERGED:  # the detector state was reset: start afresh
            self._episode, p = None, HEALTHY
            if s == HEALTHY:
                return None
        if s == ABNORMAL and p == HEALTHY:
            self._open(rows, row, step, since, output[2])
            return None
        if s == HEALTHY and p == ABNORMAL:
            episode = self._episode or Event("open", step, reason="spike")
            self._episode = None
            return dataclasses.replace(episode, kind="micro", recovered=step)
        if s == DIVERGED:
            if p == HEALTHY or self._episode is None:
                self._open(rows, row, step, since, output[2])
            episode, self._episode = self._episode, None
            reason = decode_status(output[0])[1]
            end = rows.offset + row + 1
            step_c = (
                divergence_step(rows.steps[:end], rows.loss[:end], episode.step_b)
                if reason == REASONS[REASON_NO_RECOVERY] and episode.step_b is not None
                else step
            )
            return dataclasses.replace(
                episode, kind="full", step_c=step_c, decided_at=step, reason=reason
            )
        return None

    def pending(self) -> dict | None:
        """The ongoing abnormal episode, or None.

        ``{"kind": "micro-in-progress", "step_a", "step_b", "step_c": None,
        "recovered": None, "task", "reason": "spike", "since_onset",
        "last_step"}``. None when healthy and after a full divergence (which was
        already emitted as an event).
        """
        episode = self.pending_event()
        if episode is None:
            return None
        return {
            **episode.to_record(),
            "kind": "micro-in-progress",
            "since_onset": self._since,
            "last_step": self._last_step,
        }

    def pending_event(self) -> Event | None:
        """The ongoing abnormal episode as an :class:`~clippy_monitor.episodes.Event` (kind ``"open"``), or None."""
        return self._episode if self._status == ABNORMAL else None

    def finish(self) -> list[dict]:
        """End of training: always ``[]`` -- every completed event was already
        returned by :meth:`update`, and an episode still open is no event (see the
        class docstring; :meth:`pending` keeps reporting it)."""
        return []


# The offline runner lives in its own module, which imports this one (so this comes last);
# its entry points stay importable from here.
from clippy_monitor.monitor.offline import detect_divergence, detector_outputs  # noqa: E402
