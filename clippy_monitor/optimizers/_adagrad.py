"""Adagrad with a per-layer clipping factor (paper eq. 5), the shared core of
ClippyAdagrad and the GC / AGC / LAMB baselines.

    G_t     = G_{t-1} + g_t^2                 (accumulator; never clipped, eq. 5)
    p_t     = (G_t + epsilon)^{-1/2}          (preconditioner)
    r_t     = g_t * p_t                       (update direction)
    w_{t+1} = w_t - eta_t * sigma_t * r_t     (sigma_t from the subclass' rule)

Sparse gradients (``tf.IndexedSlices`` from embedding lookups) update only the
touched rows (repeated indices summed first), and sigma is computed over those rows
only.
"""

from __future__ import annotations

from typing import Any

from keras import initializers, ops

from clippy_monitor.optimizers._base import ClippingOptimizer, check_non_negative
from clippy_monitor.sparse import deduplicate, is_sparse


def _like(gradient: Any, values: Any) -> Any:
    """``values`` shaped like ``gradient``: IndexedSlices on the same rows, or dense."""
    if is_sparse(gradient):
        return type(gradient)(values, gradient.indices, gradient.dense_shape)
    return values


class ScaledAdagrad(ClippingOptimizer):
    """Adagrad whose step is rescaled by ``clipping_factor`` (override it)."""

    def __init__(
        self,
        learning_rate: Any = 0.001,
        initial_accumulator_value: float = 0.1,
        epsilon: float = 1e-7,
        **kwargs: Any,
    ) -> None:
        super().__init__(learning_rate=learning_rate, **kwargs)
        check_non_negative(initial_accumulator_value=initial_accumulator_value)
        self.initial_accumulator_value = initial_accumulator_value
        self.epsilon = epsilon

    # Subclasses override the two hooks below.
    accumulate_first = True  # standard Adagrad: G_t includes g_t^2 (Algorithm 1)

    def clipping_factor(
        self, grad: Any, weight: Any, delta: Any, learning_rate: Any, preconditioner: Any
    ) -> Any:
        """sigma for one variable from its gradient, weight and step ``delta = eta * r``."""
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

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        lr = ops.cast(learning_rate, variable.dtype)
        accumulator = self._accumulators[self._get_variable_index(variable)]
        sparse = is_sparse(gradient)
        if sparse:
            gradient = deduplicate(gradient)
        grad = ops.cast(gradient.values if sparse else gradient, variable.dtype)

        if self.accumulate_first:
            self.assign_add(accumulator, _like(gradient, ops.square(grad)))

        rows = (lambda t: ops.take(t, gradient.indices, axis=0)) if sparse else (lambda t: t)
        weight = rows(variable)
        preconditioner = ops.rsqrt(rows(accumulator) + self.epsilon)
        delta = lr * grad * preconditioner

        if self._clips(variable):
            sigma = self.clipping_factor(grad, weight, delta, lr, preconditioner)
        else:
            sigma = ops.ones((), dtype=variable.dtype)
        self._export_factor(variable, sigma)

        if not self.accumulate_first:
            self.assign_add(
                accumulator, _like(gradient, ops.square(self.accumulator_gradient(grad, sigma)))
            )
        self.assign_sub(variable, _like(gradient, delta * sigma))

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {"initial_accumulator_value": self.initial_accumulator_value, "epsilon": self.epsilon}
        )
        return config
