"""What the values of a run record's ``detector/status`` series mean.

The divergence detector (:mod:`clippy_monitor.monitor.detectors`) outputs one
status per training step; the monitor records it as the ``detector/status``
series, and the readers (post-mortem, Dash app) decode it with
:func:`decode_status`.  Plain Python, so the readers need no TensorFlow.

* 0: healthy; 1: abnormal (in a loss spike, not yet recovered);
* ``2 + code / 10``: fully diverged (absorbing), ``code`` a key of
  :data:`REASONS`: 2.1 no_recovery, 2.2 non_finite, 2.3 grad_collapse,
  2.4 dead_layer.
"""

from __future__ import annotations

import math

HEALTHY, ABNORMAL, DIVERGED = 0, 1, 2
#: Every status the detector outputs lies in ``[HEALTHY, STATUS_END)``; no other value is a status.
STATUS_END = DIVERGED + 1

#: Reason codes of a full divergence; the status of a diverged step is
#: ``2 + code / 10`` (2.1 ... 2.4) so that the host can name the reason.
REASON_NO_RECOVERY, REASON_NON_FINITE, REASON_GRAD_COLLAPSE, REASON_DEAD_LAYER = 1, 2, 3, 4
REASONS: dict[int, str] = {
    REASON_NO_RECOVERY: "no_recovery",
    REASON_NON_FINITE: "non_finite",
    REASON_GRAD_COLLAPSE: "grad_collapse",
    REASON_DEAD_LAYER: "dead_layer",
}


def decode_status(value: float) -> tuple[int, str | None]:
    """``(status, reason)`` of one ``detector/status`` value.

    ``status`` is 0 (healthy), 1 (abnormal) or 2 (fully diverged); ``reason`` is
    ``"no_recovery"``, ``"non_finite"``, ``"grad_collapse"`` or ``"dead_layer"`` for status 2 and
    ``None`` otherwise.  A value that is not a status (non-finite, negative, or
    ``STATUS_END`` or more) reads as healthy.  Test ``value >= 2`` (not ``== 2``)
    for "diverged".
    """
    value = float(value)
    if not math.isfinite(value) or value >= STATUS_END:
        return HEALTHY, None
    status = math.floor(value + 1e-3)
    if status < DIVERGED:
        return max(status, HEALTHY), None
    return DIVERGED, REASONS.get(round((value - DIVERGED) * 10.0), "no_recovery")
