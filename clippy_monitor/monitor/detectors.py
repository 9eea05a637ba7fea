"""Loss-divergence detection (Tang et al., KDD 2023, sections 2.1, 3.1 and 4.1).

The paper tells two kinds of loss divergence apart (section 2.1, Figure 1):

* **micro-divergence** (model-a): a sudden jump of the training loss, or of one
  task's loss, that recovers to the pre-jump level as training continues;
* **full divergence** (model-b): the loss becomes very high within a few steps
  and never recovers; at the end the gradient norm of the top layers collapses
  to a small value (dying ReLU, section 4.1, Figure 4b).

Figure 4a names three moments: *step-a*, the last healthy step; *step-b*, the
onset, where the loss starts to rise; *step-c*, where the loss is fully diverged.

One implementation serves two places:

* :class:`DivergenceDetector` is a per-step state machine written in TensorFlow
  ops only (``tf.where``, no Python branches on tensors, static shapes,
  float32). It runs inside a compiled Keras train step -- ``tf.function``,
  ``jit_compile=True`` included -- with its whole state in one flat float32
  vector, so the caller keeps it in a single ``tf.Variable``, snapshots it with
  the run record and restores it on resume.
* :func:`detect_divergence` / :func:`detector_outputs` run the *same*
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
* ``confirm_steps`` consecutive exceeding steps confirm an onset; step_b is the
  *first* of them (the onset is reported retroactively: see ``step``);
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
  within ``recovery_window`` steps of step_b. Full divergence is absorbing.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

# The encoding of the status output, shared with the record's readers (re-exported).
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
    "DetectorConfig",
    "DivergenceDetector",
    "EventTracker",
    "decode_status",
    "detect_divergence",
    "detector_outputs",
]

_log = logging.getLogger(__name__)

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
            (step_b is the first of them). 2: a single-step noise outlier right
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
            divergence, step_c = step_b + recovery_window. 200: the paper's
            model-b went from step-b to step-c in ~100 steps (198.8k -> 198.9k).
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

    def __post_init__(self) -> None:
        for name in ("warmup_steps", "confirm_steps", "recovery_window", "dead_layer_steps"):
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
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"DetectorConfig.{name}={getattr(self, name)!r} is out of range")

    def to_dict(self) -> dict[str, Any]:
        """Plain ``{field: value}`` (JSON-serialisable)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DetectorConfig:
        """Inverse of :meth:`to_dict`; an unknown key raises ``TypeError`` naming it."""
        _check_names(data)
        return cls(**dict(data))


def _check_names(names: Mapping[str, Any] | Sequence[str]) -> None:
    known = {f.name for f in dataclasses.fields(DetectorConfig)}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise TypeError(
            f"unknown detector threshold(s) {', '.join(map(repr, unknown))}; "
            f"known: {', '.join(sorted(known))}"
        )


# --------------------------------------------------------------------------
# The on-device state machine
# --------------------------------------------------------------------------
_PARAM_NAMES = (
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
    "count_cap",
)


def _param_values(config: DetectorConfig) -> dict[str, float]:
    values = {name: float(getattr(config, name)) for name in _PARAM_NAMES[:-1]}
    # Counters saturate at count_cap: beyond it the EMA rate is already
    # 1 - decay and warm-up is over, and float32 counting stays exact.
    values["count_cap"] = float(
        max(config.warmup_steps, math.ceil(1.0 / (1.0 - config.baseline_decay))) + 1
    )
    return values


_HEADER = (
    "status",  # 0 healthy, 1 abnormal, 2 diverged (exact integers)
    "since_onset",  # steps since step_b; -1 when healthy
    "task",  # series that moved first at onset; -1 when healthy
    "reason",  # 0, or REASON_* once diverged
    "count",  # healthy finite steps seen by the baselines (saturates)
    "grad_ema",  # EMA of the healthy global gradient norm
    "grad_count",  # healthy steps with a known grad norm (saturates)
    "candidate",  # consecutive exceeding (not yet confirmed) steps
    "candidate_task",  # task at the first of them; -1 when none
    "dead_run",  # consecutive steps with a dead layer
)
_H = len(_HEADER)


class DivergenceDetector:
    """Per-step state machine in TensorFlow ops.

    State = ONE flat float32 vector of ``state_size = 10 + 2 * num_series``
    entries (see :meth:`state_layout`)::

        [0] status        0 healthy / 1 abnormal / 2 diverged
        [1] since_onset   steps since step_b, -1 when healthy
        [2] task          series index that moved first, -1 when healthy
        [3] reason        0, 1 no_recovery, 2 non_finite, 3 grad_collapse
        [4] count         healthy steps seen by the baselines (saturating)
        [5] grad_ema      EMA of the healthy global gradient norm
        [6] grad_count    healthy steps with a known gradient norm (saturating)
        [7] candidate     consecutive exceeding steps not yet confirmed
        [8] candidate_task series index at the first of them, -1 when none
        [9] dead_run      consecutive steps with a dead layer
        [10 : 10+N]       baseline: EMA of the healthy loss, per series
        [10+N : 10+2N]    deviation: EMA of |loss - baseline|, per series

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
        self.state_size = _H + 2 * self.num_series
        self._params = _param_values(config)

    def __repr__(self) -> str:
        return f"DivergenceDetector(num_series={self.num_series}, config={self.config!r})"

    def state_layout(self) -> dict[str, slice]:
        """Name -> slice of the state vector (for snapshots and dashboards)."""
        layout = {name: slice(i, i + 1) for i, name in enumerate(_HEADER)}
        n = self.num_series
        layout["baseline"] = slice(_H, _H + n)
        layout["deviation"] = slice(_H + n, _H + 2 * n)
        return layout

    def initial_state(self) -> tf.Tensor:
        """float32 ``[state_size]``: healthy, no baseline yet."""
        head = np.zeros(_H, np.float32)
        head[_HEADER.index("since_onset")] = -1.0
        head[_HEADER.index("task")] = -1.0
        head[_HEADER.index("candidate_task")] = -1.0
        state = np.concatenate([head, np.zeros(2 * self.num_series, np.float32)])
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
              healthy and the first abnormal row reads ``since_onset = k - 1``;
              step_b = that row's step - since_onset (what EventTracker does).
              A non-finite step or a gradient collapse during an unconfirmed
              run of exceeding steps takes its first step as step_b likewise;
              a dead layer takes the first of its dead steps.
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
        layer).  Rows where ``valid`` is False (padding to a fixed ``T``) leave
        the state as it is.  ``T`` >= 1.

        Returns ``(final_state, outputs [T, 3])``.
        """
        params = self._params if params is None else params
        valid = tf.ones_like(grad_norm, tf.bool) if valid is None else valid
        dead_layer = tf.zeros_like(grad_norm, tf.bool) if dead_layer is None else dead_layer

        def body(carry: tuple[tf.Tensor, tf.Tensor], x: tuple[tf.Tensor, ...]) -> tuple[tf.Tensor, tf.Tensor]:
            new_state, outputs = self._step(carry[0], x[0], x[1], x[2], x[4], params)
            return tf.where(x[3], new_state, carry[0]), outputs

        init = (tf.convert_to_tensor(state, tf.float32), tf.zeros([3], tf.float32))
        states, outputs = tf.scan(body, (losses, grad_norm, grads_finite, valid, dead_layer), initializer=init)
        return states[-1], outputs  # padding rows carry the last valid state

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
        n = self.num_series
        f32 = tf.float32
        state = tf.reshape(tf.cast(state, f32), [self.state_size])
        losses = tf.reshape(tf.cast(losses, f32), [n])
        grad_norm = tf.reshape(tf.cast(grad_norm, f32), [])
        grads_finite = tf.reshape(tf.cast(grads_finite, tf.bool), [])
        dead_layer = tf.reshape(tf.cast(dead_layer, tf.bool), [])

        status, since, task, reason = state[0], state[1], state[2], state[3]
        count, grad_ema, grad_count = state[4], state[5], state[6]
        cand, cand_task, dead_run = state[7], state[8], state[9]
        base = state[_H : _H + n]
        dev = state[_H + n : _H + 2 * n]

        was_healthy = status < 0.5
        was_abnormal = tf.logical_and(status > 0.5, status < 1.5)
        was_full = status > 1.5

        # ---- finiteness ---------------------------------------------------
        loss_finite = tf.math.is_finite(losses)
        grad_norm_finite = tf.math.is_finite(grad_norm)
        non_finite = tf.logical_not(
            tf.logical_and(tf.reduce_all(loss_finite), tf.logical_and(grads_finite, grad_norm_finite))
        )
        safe = tf.where(loss_finite, losses, base)  # NaN never enters arithmetic

        # ---- thresholds -----------------------------------------------------
        tiny = tf.constant(1e-12, f32)
        excess = safe - base
        hi_gap = tf.maximum(
            tf.maximum(base * (p["spike_ratio"] - 1.0), p["spike_zscore"] * dev), tiny
        )
        lo_gap = tf.maximum(base * (p["recovery_ratio"] - 1.0), p["recovery_zscore"] * dev)
        warm = count >= p["warmup_steps"]
        exceed = tf.logical_and(warm, excess > hi_gap)  # [n]
        any_exceed = tf.logical_and(tf.reduce_any(exceed), tf.logical_not(non_finite))
        below = tf.reduce_all(excess <= lo_gap)
        score = excess / hi_gap  # > 1 where exceeding

        minus_one = tf.constant(-1.0, f32)
        if n == 1:
            spike_task = tf.constant(0.0, f32)
            nf_task = tf.where(loss_finite[0], minus_one, 0.0)
        else:
            spike_task = tf.cast(tf.argmax(score[1:], output_type=tf.int32), f32) + 1.0
            task_nf = tf.logical_not(loss_finite[1:])
            first_nf = tf.cast(tf.argmax(tf.cast(task_nf, tf.int32), output_type=tf.int32), f32) + 1.0
            nf_task = tf.where(
                tf.reduce_any(task_nf), first_nf, tf.where(loss_finite[0], minus_one, 0.0)
            )

        # ---- gradient collapse ----------------------------------------------
        grad_known = tf.logical_and(grad_norm_finite, grad_norm >= 0.0)
        collapse = tf.logical_and(
            tf.logical_and(grad_known, grad_count > 0.5),
            grad_norm < p["grad_collapse_ratio"] * grad_ema,
        )
        loss_high = tf.logical_or(
            tf.logical_and(was_abnormal, tf.logical_not(below)),
            tf.logical_and(was_healthy, any_exceed),
        )

        # ---- transitions ----------------------------------------------------
        not_full = tf.logical_not(was_full)
        finite = tf.logical_not(non_finite)
        to_full_nf = tf.logical_and(not_full, non_finite)
        to_full_gc = tf.logical_and(
            tf.logical_and(not_full, finite), tf.logical_and(loss_high, collapse)
        )
        abnormal_on = tf.logical_and(
            tf.logical_and(was_abnormal, finite), tf.logical_not(below)
        )
        to_full_dl = tf.logical_and(
            tf.logical_and(tf.logical_and(not_full, finite), dead_layer),
            tf.logical_and(dead_run + 1.0 >= p["dead_layer_steps"], p["dead_layer_steps"] > 0.5),
        )
        to_full_nr = tf.logical_and(
            tf.logical_and(abnormal_on, tf.logical_not(collapse)),
            since + 1.0 >= p["recovery_window"],
        )
        confirmed = tf.logical_and(
            tf.logical_and(was_healthy, any_exceed), cand + 1.0 >= p["confirm_steps"]
        )
        becomes_full = tf.logical_or(tf.logical_or(to_full_nf, to_full_gc), tf.logical_or(to_full_dl, to_full_nr))
        new_status = tf.where(
            tf.logical_or(was_full, becomes_full),
            2.0,
            tf.where(tf.logical_or(abnormal_on, confirmed), 1.0, 0.0),
        )
        new_reason = tf.where(
            was_full,
            reason,
            tf.where(
                to_full_nf,
                float(REASON_NON_FINITE),
                tf.where(
                    to_full_gc,
                    float(REASON_GRAD_COLLAPSE),
                    tf.where(
                        to_full_dl,
                        float(REASON_DEAD_LAYER),
                        tf.where(to_full_nr, float(REASON_NO_RECOVERY), 0.0),
                    ),
                ),
            ),
        )
        is_healthy = new_status < 0.5
        # A new episode starts at the first step of the current run of exceeding
        # steps: `cand` steps ago.
        # A dead layer from a healthy state: the episode starts at its first dead step.
        dead_onset = tf.logical_and(
            tf.logical_and(was_healthy, to_full_dl), tf.logical_not(tf.logical_or(to_full_nf, to_full_gc))
        )
        onset_task = tf.where(
            dead_onset,
            minus_one,
            tf.where(cand > 0.5, cand_task, tf.where(non_finite, nf_task, spike_task)),
        )
        first_since = tf.where(dead_onset, dead_run, cand)
        new_since = tf.where(is_healthy, minus_one, tf.where(was_healthy, first_since, since + 1.0))
        new_task = tf.where(is_healthy, minus_one, tf.where(was_healthy, onset_task, task))

        pending = tf.logical_and(tf.logical_and(was_healthy, is_healthy), any_exceed)
        new_cand = tf.where(pending, cand + 1.0, 0.0)
        new_cand_task = tf.where(pending, tf.where(cand > 0.5, cand_task, spike_task), minus_one)

        # ---- baselines: healthy, finite, non-exceeding steps only ------------
        decay = p["baseline_decay"]
        cap = p["count_cap"]
        update = tf.logical_and(is_healthy, tf.logical_not(pending))
        rate = tf.maximum(1.0 - decay, 1.0 / (count + 1.0))
        dev_rate = tf.where(count > 0.5, tf.maximum(1.0 - decay, 1.0 / tf.maximum(count, 1.0)), 0.0)
        new_base = tf.where(update, base + rate * excess, base)
        new_dev = tf.where(update, dev + dev_rate * (tf.abs(excess) - dev), dev)
        new_count = tf.where(update, tf.minimum(count + 1.0, cap), count)

        grad_update = tf.logical_and(update, grad_known)
        grad_rate = tf.maximum(1.0 - decay, 1.0 / (grad_count + 1.0))
        safe_norm = tf.where(grad_known, grad_norm, grad_ema)
        new_grad_ema = tf.where(grad_update, grad_ema + grad_rate * (safe_norm - grad_ema), grad_ema)
        new_grad_count = tf.where(grad_update, tf.minimum(grad_count + 1.0, cap), grad_count)

        head = tf.stack(
            [
                new_status,
                new_since,
                new_task,
                new_reason,
                new_count,
                new_grad_ema,
                new_grad_count,
                new_cand,
                new_cand_task,
                tf.where(tf.logical_and(dead_layer, not_full), dead_run + 1.0, 0.0),
            ]
        )
        new_state = tf.concat([head, new_base, new_dev], axis=0)
        outputs = tf.stack([new_status + 0.1 * new_reason, new_since, new_task])
        return new_state, outputs


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
    valid = tf.ones(tf.shape(zero_share)[:1], tf.bool) if valid is None else tf.convert_to_tensor(valid, tf.bool)
    live = tf.logical_and(zero_share < share, valid[:, None])
    seen = tf.cumsum(tf.cast(live, tf.float32), axis=0, exclusive=True) > 0.5
    alive_before = tf.logical_or(alive[None, :], seen)
    dead = tf.reduce_any(tf.logical_and(alive_before, zero_share >= share), axis=1)
    return tf.logical_and(dead, valid), tf.logical_or(alive, tf.reduce_any(live, axis=0))


# --------------------------------------------------------------------------
# Host side: events
# --------------------------------------------------------------------------
class EventTracker:
    """Turns per-step detector outputs into events, incrementally across flushes.

    Feed every row the detector produced, in order (``update`` may be called
    with any chunking; an event can span two flushes). Events are dicts::

        {"kind": "micro" | "full", "step_a": int | None, "step_b": int,
         "step_c": int | None, "recovered": int | None, "task": str | None,
         "reason": "spike" | "no_recovery" | "non_finite" | "grad_collapse" | "dead_layer"}

    * micro: ``step_c`` None, ``recovered`` = first healthy step after the spike,
      reason "spike";
    * full: ``recovered`` None, ``step_c`` = first step with status 2, reason why;
      emitted once (status 2 is absorbing).
    * ``step_b`` = the onset (first abnormal step, possibly before the row that
      confirmed it -- see ``DivergenceDetector.step``), ``step_a`` = the step fed
      just before it (the last healthy one; ``step_b - 1`` for consecutive step
      numbers), None if step_b is the very first step fed.

    End of training: :meth:`finish` does NOT emit an abnormal episode that is
    still open -- it has neither recovered nor been declared fully diverged, so
    either kind would be a guess; :meth:`pending` reports it instead.

    Args:
        series_names: name of each detector series (index 0 = total loss), used
            for the ``task`` field.
    """

    _HISTORY = 256  # steps kept to map a retroactive step_b across flushes

    def __init__(self, series_names: Sequence[str]) -> None:
        self.series_names = [str(s) for s in series_names]
        self._history = np.zeros(0, np.int64)
        self._seen = 0  # rows fed so far
        self._status = HEALTHY
        self._since = -1
        self._last_step: int | None = None
        self._episode: dict[str, Any] | None = None
        self._finished = False

    # -- helpers ----------------------------------------------------------
    def _task_name(self, index: float) -> str | None:
        i = int(round(float(index)))
        if i < 0:
            return None
        return self.series_names[i] if i < len(self.series_names) else f"series_{i}"

    def _open(self, hist: np.ndarray, offset: int, row: int, step: int, since: int, task: float) -> None:
        j = offset + row - since  # index of step_b in hist
        if j >= 0:
            step_b = int(hist[j])
            if j >= 1:
                step_a: int | None = int(hist[j - 1])
            else:
                seen_before = self._seen - offset  # rows fed before hist[0]
                step_a = None if seen_before <= 0 else step_b - 1
        else:  # onset before anything fed or remembered: assume consecutive steps
            step_b = step - since
            step_a = step_b - 1
        self._episode = {"step_a": step_a, "step_b": step_b, "task": self._task_name(task)}

    # -- API ----------------------------------------------------------------
    def update(self, steps: np.ndarray, outputs: np.ndarray) -> list[dict]:
        """Consume the next rows; return the events COMPLETED in them."""
        steps = np.asarray(steps, np.int64).reshape(-1)
        outputs = np.asarray(outputs, np.float32).reshape(-1, 3)
        if len(steps) != len(outputs):
            raise ValueError(f"{len(steps)} steps but {len(outputs)} output rows")
        if len(steps) == 0:
            return []
        status = np.floor(outputs[:, 0] + 1e-3).astype(np.int64)
        prev = np.concatenate([[self._status], status[:-1]])
        hist = np.concatenate([self._history, steps])
        offset = len(self._history)
        events: list[dict] = []
        changes = np.flatnonzero(status != prev)
        # A tracker created mid-episode (e.g. on resume) sees its first row as a
        # 0 -> 1 change and takes step_b = step - since_onset.
        for i in changes:
            s, p = int(status[i]), int(prev[i])
            step = int(steps[i])
            since = int(round(float(outputs[i, 1])))
            if p == DIVERGED:  # the detector state was reset: start afresh
                self._episode = None
                p = HEALTHY
                if s == HEALTHY:
                    continue
            if s == ABNORMAL and p == HEALTHY:
                self._open(hist, offset, int(i), step, since, outputs[i, 2])
            elif s == HEALTHY and p == ABNORMAL:
                ep = self._episode or {"step_a": None, "step_b": step, "task": None}
                events.append(
                    {
                        "kind": "micro",
                        "step_a": ep["step_a"],
                        "step_b": ep["step_b"],
                        "step_c": None,
                        "recovered": step,
                        "task": ep["task"],
                        "reason": "spike",
                    }
                )
                self._episode = None
            elif s == DIVERGED:
                if p == HEALTHY or self._episode is None:
                    self._open(hist, offset, int(i), step, since, outputs[i, 2])
                ep = self._episode
                events.append(
                    {
                        "kind": "full",
                        "step_a": ep["step_a"],
                        "step_b": ep["step_b"],
                        "step_c": step,
                        "recovered": None,
                        "task": ep["task"],
                        "reason": decode_status(outputs[i, 0])[1],
                    }
                )
                self._episode = None
        self._status = int(status[-1])
        self._since = int(round(float(outputs[-1, 1])))
        self._last_step = int(steps[-1])
        self._seen += len(steps)
        self._history = hist[-self._HISTORY :].copy()
        return events

    def pending(self) -> dict | None:
        """The ongoing abnormal episode, or None.

        ``{"kind": "micro-in-progress", "step_a", "step_b", "step_c": None,
        "recovered": None, "task", "reason": "spike", "since_onset",
        "last_step"}``. None when healthy and after a full divergence (which was
        already emitted as an event).
        """
        if self._status != ABNORMAL or self._episode is None:
            return None
        ep = self._episode
        return {
            "kind": "micro-in-progress",
            "step_a": ep["step_a"],
            "step_b": ep["step_b"],
            "step_c": None,
            "recovered": None,
            "task": ep["task"],
            "reason": "spike",
            "since_onset": self._since,
            "last_step": self._last_step,
        }

    def finish(self) -> list[dict]:
        """End of training. Returns no event for an episode still open (see the
        class docstring; :meth:`pending` keeps reporting it). Always ``[]``:
        every completed event was already returned by :meth:`update`."""
        self._finished = True
        return []


# --------------------------------------------------------------------------
# Offline
# --------------------------------------------------------------------------
_OFFLINE_CACHE: dict[tuple[int, bool], Any] = {}
_XLA_OK = True


def _offline_fn(num_series: int, jit: bool) -> Any:
    """``run(losses, grad_norm, grads_finite, dead, params) -> outputs`` for one
    series count; the thresholds are an input, so configs share a compilation."""
    key = (num_series, jit)
    fn = _OFFLINE_CACHE.get(key)
    if fn is None:
        det = DivergenceDetector(num_series)

        def run(losses: tf.Tensor, grad_norm: tf.Tensor, grads_finite: tf.Tensor, dead: tf.Tensor, params: tf.Tensor) -> tf.Tensor:
            p = {name: params[i] for i, name in enumerate(_PARAM_NAMES)}
            return det.scan(det.initial_state(), losses, grad_norm, grads_finite, params=p, dead_layer=dead)[1]

        fn = tf.function(run, jit_compile=jit, reduce_retracing=True)
        _OFFLINE_CACHE[key] = fn
    return fn


def _bucket(n: int) -> int:
    """Padded length: a power of two >= 8192, so repeated calls reuse compilations
    (padding costs microseconds; a compilation, a second)."""
    return max(8192, 1 << max(0, (n - 1).bit_length()))


def _prepare(
    loss: np.ndarray, grad_norm: np.ndarray | None, zero_grad_fraction: np.ndarray | None, config: DetectorConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    loss = np.asarray(loss, dtype=np.float64)
    if loss.ndim == 1:
        series = loss[:, None]
    elif loss.ndim == 2:
        if loss.shape[1] < 1:
            raise ValueError("a 2-D loss needs at least one task column")
        series = np.concatenate([loss.sum(axis=1, keepdims=True), loss], axis=1)
    else:
        raise ValueError(f"loss must be 1-D or 2-D [steps, tasks], got shape {loss.shape}")
    n = series.shape[0]
    if grad_norm is None:
        gn = np.full(n, -1.0, np.float32)  # "not measured": no collapse test
        gf = np.ones(n, bool)
    else:
        gn = np.asarray(grad_norm, np.float32).reshape(-1)
        if gn.shape[0] != n:
            raise ValueError(f"grad_norm has {gn.shape[0]} steps, loss has {n}")
        gf = np.isfinite(gn)
    if zero_grad_fraction is None:
        dead = np.zeros(n, bool)
    else:
        zero = np.asarray(zero_grad_fraction, np.float32)
        zero = zero[:, None] if zero.ndim == 1 else zero
        if zero.ndim != 2 or zero.shape[0] != n:
            raise ValueError(f"zero_grad_fraction must be [steps, layers] with {n} steps, got shape {zero.shape}")
        dead = dead_layer_signal(zero, np.zeros(zero.shape[1], bool), config.dead_layer_share)[0].numpy()
    return series.astype(np.float32), gn, gf, dead


def _run_offline(series: np.ndarray, gn: np.ndarray, gf: np.ndarray, dead: np.ndarray, config: DetectorConfig) -> np.ndarray:
    global _XLA_OK
    n, k = series.shape
    if n == 0:
        return np.zeros((0, 3), np.float32)
    if k > 1:
        # Zero task columns are inert (never exceed, never block a recovery, never
        # win the argmax at an onset), so multitask widths share a compilation.
        kp = max(4, 1 << (k - 1).bit_length())
        if kp > k:
            series = np.concatenate([series, np.zeros((n, kp - k), np.float32)], axis=1)
            k = kp
    m = _bucket(n)
    pad = m - n
    if pad:  # padding comes after the data, so it cannot change earlier outputs
        series = np.concatenate([series, np.zeros((pad, k), np.float32)])
        gn = np.concatenate([gn, np.full(pad, -1.0, np.float32)])
        gf = np.concatenate([gf, np.ones(pad, bool)])
        dead = np.concatenate([dead, np.zeros(pad, bool)])
    params = _param_values(config)
    args = (
        tf.constant(series),
        tf.constant(gn),
        tf.constant(gf),
        tf.constant(dead),
        tf.constant([params[name] for name in _PARAM_NAMES], tf.float32),
    )
    with tf.device("/CPU:0"):  # a sequential loop: a device would only add launch latency
        if _XLA_OK:
            try:
                out = _offline_fn(k, True)(*args)
            except (tf.errors.UnimplementedError, tf.errors.InvalidArgumentError, tf.errors.InternalError) as err:
                _log.warning("XLA unavailable for the offline detector (%s); using the graph executor", err)
                _XLA_OK = False
        if not _XLA_OK:
            out = _offline_fn(k, False)(*args)
    return out.numpy()[:n]


def _config(thresholds: Mapping[str, Any]) -> DetectorConfig:
    _check_names(thresholds)
    return DetectorConfig(**dict(thresholds))


def detector_outputs(
    loss: np.ndarray, grad_norm: np.ndarray | None = None, zero_grad_fraction: np.ndarray | None = None, **thresholds: Any
) -> np.ndarray:
    """Per-step detector outputs ``[n, 3]`` (``OUTPUT_NAMES``) of an offline series.

    ``loss``/``grad_norm``/``zero_grad_fraction``/``thresholds`` as in
    :func:`detect_divergence`; the series are ``[total, task_0, ...]`` for a 2-D loss.
    """
    config = _config(thresholds)
    return _run_offline(*_prepare(loss, grad_norm, zero_grad_fraction, config), config)


def detect_divergence(
    loss: np.ndarray,
    grad_norm: np.ndarray | None = None,
    *,
    zero_grad_fraction: np.ndarray | None = None,
    steps: np.ndarray | None = None,
    series_names: Sequence[str] | None = None,
    **thresholds: Any,
) -> list[dict]:
    """Find micro and full divergences in a recorded loss series.

    Runs the same state machine as training does (``DivergenceDetector.step``'s
    body, ``tf.scan`` in an XLA-compiled ``tf.function`` on the CPU, thresholds
    fed as tensors), then :class:`EventTracker`. 100k steps take ~20 ms once
    compiled; a compilation (~0.5-1 s) is needed per padded length (a power of
    two >= 8192) and series width (1, or a power of two >= 4 for multitask).

    Args:
        loss: 1-D total loss, or 2-D ``[steps, num_tasks]`` per-task losses (the
            total is then their sum, series 0).
        grad_norm: optional 1-D global gradient norm per step; NaN/Inf there is a
            non-finite step; None disables the gradient-collapse test.
        zero_grad_fraction: optional ``[steps, layers]`` share of exactly-zero
            gradient entries per layer (``load_run(path).layer("zero_grad_fraction")``);
            None disables the dead-layer test.
        steps: the step number of each row (default ``0..n-1``).
        series_names: names of the task columns of a 2-D loss (default
            ``task_0, ...``; a list one longer also names the total), or of the
            single series of a 1-D loss (default ``total``).
        **thresholds: :class:`DetectorConfig` fields; an unknown name raises
            ``TypeError``.

    Returns:
        The completed events (see :class:`EventTracker`); an episode still open
        at the end of the series is not reported.
    """
    config = _config(thresholds)
    series, gn, gf, dead = _prepare(loss, grad_norm, zero_grad_fraction, config)
    n, k = series.shape
    if steps is None:
        steps_arr = np.arange(n, dtype=np.int64)
    else:
        steps_arr = np.asarray(steps, np.int64).reshape(-1)
        if steps_arr.shape[0] != n:
            raise ValueError(f"steps has {steps_arr.shape[0]} entries, loss has {n}")
    names = _series_names(np.asarray(loss).ndim, k, series_names)
    outputs = _run_offline(series, gn, gf, dead, config)
    tracker = EventTracker(names)
    return tracker.update(steps_arr, outputs) + tracker.finish()


def _series_names(ndim: int, k: int, names: Sequence[str] | None) -> list[str]:
    if ndim == 1:
        if names is None:
            return ["total"]
        names = list(names)
        if len(names) != 1:
            raise ValueError(f"a 1-D loss has one series, got {len(names)} names")
        return names
    if names is None:
        return ["total"] + [f"task_{i}" for i in range(k - 1)]
    names = list(names)
    if len(names) == k - 1:
        return ["total"] + names
    if len(names) == k:
        return names
    raise ValueError(f"{k - 1} task columns but {len(names)} series_names")
