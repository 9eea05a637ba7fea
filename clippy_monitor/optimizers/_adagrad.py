"""Adagrad with a per-layer clipping factor, the shared core of ClippyAdagrad and
the GC / AGC / LAMB baselines.

By default the factor scales the step only (paper eq. 5, the unified form):

    G_t     = G_{t-1} + g_t^2                 (accumulator; never clipped)
    p_t     = (G_t + epsilon)^{-1/2}          (preconditioner)
    r_t     = g_t * p_t                       (update direction)
    w_{t+1} = w_t - eta_t * sigma_t * r_t     (sigma_t from the subclass' rule)

With ``clip_before_accumulator=True`` a rule that reads only the gradient and the
weight (GC, AGC: ``FACTOR_FROM_GRADIENT``) clips the gradient before Adagrad sees
it (paper eq. 2 and 3 followed by eq. 1):

    g'_t    = sigma_t * g_t                   (sigma_t from g_t and w_t)
    G_t     = G_{t-1} + g'_t^2                (accumulator of clipped gradients)
    w_{t+1} = w_t - eta_t * g'_t * (G_t + epsilon)^{-1/2}

The step is still ``eta * sigma * r`` with ``r = g (G_t + epsilon)^{-1/2}``, so the
exported factor is sigma in both forms.

Sparse gradients (``tf.IndexedSlices`` from embedding lookups) update only the
touched rows (repeated indices summed first), and sigma is computed over those rows
only.
"""

from __future__ import annotations

from typing import Any, ClassVar

from keras import initializers, ops

from clippy_monitor.optimizers._base import ClippingOptimizer, check_non_negative
from clippy_monitor.sparse import deduplicate, is_sparse


def _like(gradient: Any, values: Any) -> Any:
    """``values`` shaped like ``gradient``: IndexedSlices on the same rows, or dense."""
    if is_sparse(gradient):
        return type(gradient)(values, gradient.indices, gradient.dense_shape)
    return values


class ScaledAdagrad(ClippingOptimizer):
    """Adagrad whose step is rescaled by ``clipping_factor`` (override it).

    Args:
        clip_before_accumulator: clip the gradient before the accumulator (paper
            eq. 2) instead of scaling the step only (eq. 5, the default).  Only for
            rules with ``FACTOR_FROM_GRADIENT`` (GC, AGC); others raise ``ValueError``.
    """

    #: sigma is a function of the gradient and the weight alone (``gradient_factor``),
    #: so it can be computed before the accumulator is updated (eq. 2, 3).
    FACTOR_FROM_GRADIENT: ClassVar[bool] = False

    def __init__(
        self,
        learning_rate: Any = 0.001,
        initial_accumulator_value: float = 0.1,
        epsilon: float = 1e-7,
        clip_before_accumulator: bool = False,
        **kwargs: Any,
    ) -> None:
        if clip_before_accumulator and not self.FACTOR_FROM_GRADIENT:
            raise ValueError(
                f"clip_before_accumulator=True (paper eq. 2) needs a factor computed from the "
                f"gradient alone (GC, AGC); {type(self).__name__}'s factor depends on the update "
                f"r = g * G^(-1/2), which needs the accumulator the clipped gradient would feed"
            )
        super().__init__(learning_rate=learning_rate, **kwargs)
        check_non_negative(initial_accumulator_value=initial_accumulator_value)
        self.initial_accumulator_value = initial_accumulator_value
        self.epsilon = epsilon
        self.clip_before_accumulator = bool(clip_before_accumulator)

    # Subclasses override the hooks below.
    accumulate_first = True  # standard Adagrad: G_t includes g_t^2 (Algorithm 1)

    def clipping_factor(
        self, grad: Any, weight: Any, delta: Any, learning_rate: Any, preconditioner: Any
    ) -> Any:
        """sigma for one variable from its gradient, weight and step ``delta = eta * r``."""
        raise NotImplementedError

    def gradient_factor(self, grad: Any, weight: Any) -> Any:
        """sigma from the gradient and the weight only (rules with ``FACTOR_FROM_GRADIENT``)."""
        raise NotImplementedError

    def accumulator_gradient(self, grad: Any, sigma: Any) -> Any:
        """What a delayed accumulator update squares (ClippyAdagrad may clip it)."""
        return grad

    def build(self, var_list: Any) -> None:
        if self.built:
            return
        super().build(var_list)
        self._accumulators = self.add_optimizer_variables(
            var_list,
            "accumulator",
            initializer=initializers.Constant(self.initial_accumulator_value),
        )

    def _applied_factor(self, variable: Any, rule: Any) -> Any:
        """``rule()`` for a clipped variable, 1 for an excluded one; exported either way."""
        sigma = rule() if self._clips(variable) else ops.ones((), dtype=variable.dtype)
        self._export_factor(variable, sigma)
        return sigma

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        lr = ops.cast(learning_rate, variable.dtype)
        accumulator = self._accumulators[self._get_variable_index(variable)]
        sparse = is_sparse(gradient)
        if sparse:
            gradient = deduplicate(gradient)
        grad = ops.cast(gradient.values if sparse else gradient, variable.dtype)
        rows = (lambda t: ops.take(t, gradient.indices, axis=0)) if sparse else (lambda t: t)
        weight = rows(variable)

        if self.clip_before_accumulator:  # eq. 2: g' = sigma g feeds Adagrad (eq. 1)
            grad = grad * self._applied_factor(variable, lambda: self.gradient_factor(grad, weight))
            self.assign_add(accumulator, _like(gradient, ops.square(grad)))
            step = lr * grad * ops.rsqrt(rows(accumulator) + self.epsilon)
            self.assign_sub(variable, _like(gradient, step))
            return

        if self.accumulate_first:
            self.assign_add(accumulator, _like(gradient, ops.square(grad)))
        preconditioner = ops.rsqrt(rows(accumulator) + self.epsilon)
        delta = lr * grad * preconditioner
        sigma = self._applied_factor(
            variable, lambda: self.clipping_factor(grad, weight, delta, lr, preconditioner)
        )
        if not self.accumulate_first:
            self.assign_add(
                accumulator, _like(gradient, ops.square(self.accumulator_gradient(grad, sigma)))
            )
        self.assign_sub(variable, _like(gradient, delta * sigma))

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "initial_accumulator_value": self.initial_accumulator_value,
                "epsilon": self.epsilon,
                "clip_before_accumulator": self.clip_before_accumulator,
            }
        )
        return config
