"""The clipping rules of Tang et al., KDD 2023 -- the one definition of each formula.

Every rule is written as a small pure function of `keras.ops`, so the
optimizers, the `DivergenceMonitor`, the post-mortem and the dashboards all call
the same code (on TF tensors inside a compiled step, or on NumPy arrays offline).

Notation (paper section 4, eq. 5), per variable ("layer": each trainable tensor,
kernel and bias separately):

* ``g``  gradient, ``w`` weight, ``eta`` learning rate,
* ``r``  the optimizer's update direction before the learning rate
  (Adagrad: ``r = g * G^{-1/2}``), so the step is ``w <- w - eta * sigma * r``,
* ``sigma`` the clipping factor in (0, 1] (LAMB's trust ratio may exceed 1).

Rules come in two halves so that they also work on many layers at once: a
*measurement* (a norm, or an element-wise ratio) and a *factor* computed from
measurements.  The monitor reduces the element-wise parts once per variable in
the train step and applies the factors to all buffered steps at once at a flush;
the optimizers do both per tensor.  The formulas stay here.

Zero conventions (documented once, used everywhere):

* ``||g||_2 = 0``: GC and AGC return 1 (nothing to clip).
* ``||w||_2 = 0`` (e.g. zero-initialised biases): AGC floors the weight norm at
  ``eps = 1e-3`` as NFNets does; ``grad_weight_ratio`` uses the same floor, so
  ``agc_factor == min(1, lambda / grad_weight_ratio)`` holds exactly.
* ``w_i = 0`` in ``||r/w||_inf``: ``|w_i|`` is floored at the same ``eps``, so the
  measurement stays finite and an update that is large next to a tiny weight
  still shows up as a large value.
* Clippy (TFRS conventions): coordinates with ``eta*r_i = 0`` never constrain
  sigma; a coordinate whose threshold is 0 while ``eta*r_i != 0`` forces sigma = 0
  (possible only with ``lambda_abs = 0``).
* LAMB: the trust ratio is 1 where ``||w||_2`` or ``||r||_2`` is 0.
"""

from __future__ import annotations

from typing import Any

from keras import ops

Tensor = Any

#: Floor of ``|w|`` and ``||w||_2`` in AGC and in the relative measurements (NFNets).
AGC_EPS = 1e-3

#: Paper section 5.1.3 defaults.
DEFAULT_LAMBDA_REL = 0.5
DEFAULT_LAMBDA_ABS = 1e-2
#: Thresholds that figure 4b used to contrast GC/AGC with Clippy.
DEFAULT_GC_CLIPNORM = 1e-1
DEFAULT_AGC_CLIPPING = 1e-3


# --------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------
def l2_norm(x: Tensor) -> Tensor:
    """``||x||_2`` over the whole tensor."""
    return ops.sqrt(ops.sum(ops.square(x)))


def unitwise_norm(x: Tensor) -> Tensor:
    """L2 norm per output unit, as NFNets' AGC: all axes but the last.

    Scalars and vectors (biases) are one unit; the result broadcasts to ``x``.
    """
    if len(x.shape) <= 1:
        return ops.sqrt(ops.sum(ops.square(x), keepdims=True))
    axes = tuple(range(len(x.shape) - 1))
    return ops.sqrt(ops.sum(ops.square(x), axis=axes, keepdims=True))


def grad_weight_ratio(grad_norm: Tensor, weight_norm: Tensor, eps: float = AGC_EPS) -> Tensor:
    """``||g||_2 / max(||w||_2, eps)``: the quantity AGC thresholds (paper eq. 3)."""
    return grad_norm / ops.maximum(weight_norm, eps)


def update_weight_ratio(update: Tensor, weight: Tensor, eps: float = AGC_EPS) -> Tensor:
    """Element-wise ``|r_i| / max(|w_i|, eps)``; its max is ``||r/w||_inf`` (paper eq. 4)."""
    return ops.abs(update) / ops.maximum(ops.abs(weight), eps)


def update_weight_linf(update: Tensor, weight: Tensor, eps: float = AGC_EPS) -> Tensor:
    """``||r/w||_inf`` (paper eq. 4), with ``|w_i|`` floored at ``eps``."""
    return ops.max(update_weight_ratio(update, weight, eps))


# --------------------------------------------------------------------------
# Clipping factors
# --------------------------------------------------------------------------
def gc_factor(grad_norm: Tensor, clipnorm: float = DEFAULT_GC_CLIPNORM) -> Tensor:
    """Gradient clipping (Pascanu et al.): ``sigma = min(1, lambda / ||g||_2)``; 1 when g = 0."""
    safe = ops.where(grad_norm > 0, grad_norm, ops.ones_like(grad_norm))
    return ops.where(grad_norm > 0, ops.minimum(1.0, clipnorm / safe), ops.ones_like(grad_norm))


def agc_factor(
    grad_norm: Tensor,
    weight_norm: Tensor,
    clipping: float = DEFAULT_AGC_CLIPPING,
    eps: float = AGC_EPS,
) -> Tensor:
    """Adaptive gradient clipping (Brock et al.): ``min(1, lambda * max(||w||, eps) / ||g||)``.

    Takes whole-tensor norms, or ``unitwise_norm`` values for NFNets' unit-wise AGC.
    """
    safe = ops.where(grad_norm > 0, grad_norm, ops.ones_like(grad_norm))
    factor = ops.minimum(1.0, clipping * ops.maximum(weight_norm, eps) / safe)
    return ops.where(grad_norm > 0, factor, ops.ones_like(factor))


def lamb_trust_ratio(weight_norm: Tensor, update_norm: Tensor) -> Tensor:
    """LAMB adapted to Adagrad (paper footnote 5, phi(x) = x): ``||w||_2 / ||r||_2``.

    The step becomes ``w <- w - eta * (||w|| / ||r||) * r``; 1 where either norm is 0.
    """
    both = ops.logical_and(weight_norm > 0, update_norm > 0)
    safe = ops.where(both, update_norm, ops.ones_like(update_norm))
    return ops.where(both, weight_norm / safe, ops.ones_like(weight_norm))


def clippy_threshold(
    weight: Tensor,
    lambda_rel: float = DEFAULT_LAMBDA_REL,
    lambda_abs: float = DEFAULT_LAMBDA_ABS,
    preconditioner: Tensor | None = None,
    lambda_acc: float = 0.0,
) -> Tensor:
    """The largest allowed ``|eta * sigma * r_i|``: ``lambda_rel|w_i| + lambda_acc p_i + lambda_abs``.

    ``p`` is Adagrad's preconditioner ``G^{-1/2}`` (TFRS's accumulator-relative term).
    The summation order follows TFRS so results agree to the last bit.
    """
    threshold = lambda_abs + ops.abs(weight) * lambda_rel
    if preconditioner is not None and lambda_acc != 0.0:
        threshold = threshold + ops.abs(preconditioner) * lambda_acc
    return threshold


def clippy_excess(delta: Tensor, threshold: Tensor, threshold_positive: bool = False) -> Tensor:
    """``max_i |delta_i| / threshold_i``: how far a step overshoots Clippy's bound (> 1 is clipped).

    ``delta = eta * r`` is the step.  Coordinates with ``delta_i = 0`` never count
    (TFRS's ``divide_no_nan``); ``delta_i != 0`` with ``threshold_i = 0`` gives inf.
    Positively homogeneous in ``delta``: the excess of ``delta / s`` is ``excess / s``.
    ``threshold_positive``: every ``threshold_i > 0`` (``lambda_abs > 0``), so there
    is no 0/0 to mask -- two passes over the tensor fewer, which matters without XLA.
    """
    ratio = ops.abs(delta) / threshold
    if not threshold_positive:
        ratio = ops.where(delta == 0, ops.zeros_like(ratio), ratio)
    return ops.max(ratio)


def clippy_sigma(excess: Tensor) -> Tensor:
    """Clippy's factor from the excess: ``sigma = min(1, 1 / excess)`` (1 for a zero step)."""
    return ops.minimum(1.0, 1.0 / excess)


def clippy_factor(
    delta: Tensor,
    weight: Tensor,
    lambda_rel: float = DEFAULT_LAMBDA_REL,
    lambda_abs: float = DEFAULT_LAMBDA_ABS,
    preconditioner: Tensor | None = None,
    lambda_acc: float = 0.0,
) -> Tensor:
    """Clippy (Algorithm 1, line 8): ``sigma = min(1, min_i threshold_i / |eta r_i|)``,
    computed as ``1 / max_i |eta r_i| / threshold_i`` (see ``clippy_excess``)."""
    threshold = clippy_threshold(weight, lambda_rel, lambda_abs, preconditioner, lambda_acc)
    return clippy_sigma(clippy_excess(delta, threshold, threshold_positive=lambda_abs > 0))
