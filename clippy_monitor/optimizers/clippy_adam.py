"""ClippyAdam: Adam whose bias-corrected step is clipped by Clippy's rule (paper 4.3.3)."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from clippy_monitor import clipping
from clippy_monitor.optimizers._base import ClippingOptimizer, check_non_negative


@keras.saving.register_keras_serializable(package="clippy_monitor")
class ClippyAdam(ClippingOptimizer):
    r"""Adam with Clippy (Tang et al., KDD 2023, section 4.3.3).

        m_t = beta_1 m_{t-1} + (1 - beta_1) g_t,   v_t = beta_2 v_{t-1} + (1 - beta_2) g_t^2
        r_t = m_hat_t / (sqrt(v_hat_t) + epsilon),  m_hat = m / (1 - beta_1^t), v_hat = v / (1 - beta_2^t)
        sigma_t = min(1, min_i (lambda_rel |w_i| + lambda_abs) / (eta_t |r_i|))
        w_{t+1} = w_t - eta_t sigma_t r_t

    Moments always receive the unclipped gradient.  Sparse gradients are densified:
    Adam decays the moments of every row at every step.
    """

    def __init__(
        self,
        learning_rate: Any = 0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        variable_relative_threshold: float = clipping.DEFAULT_LAMBDA_REL,
        absolute_threshold: float = clipping.DEFAULT_LAMBDA_ABS,
        name: str = "ClippyAdam",
        **kwargs: Any,
    ) -> None:
        check_non_negative(
            variable_relative_threshold=variable_relative_threshold,
            absolute_threshold=absolute_threshold,
        )
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.variable_relative_threshold = variable_relative_threshold
        self.absolute_threshold = absolute_threshold

    def build(self, var_list: Any) -> None:
        if self.built:
            return
        super().build(var_list)
        self._momentums, self._velocities = self.add_optimizer_variables(
            var_list, ["momentum", "velocity"]
        )

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        lr = ops.cast(learning_rate, variable.dtype)
        grad = ops.cast(ops.convert_to_tensor(gradient), variable.dtype)
        index = self._get_variable_index(variable)
        m, v = self._momentums[index], self._velocities[index]
        step = ops.cast(self.iterations + 1, variable.dtype)

        self.assign_add(m, (grad - m) * (1 - self.beta_1))
        self.assign_add(v, (ops.square(grad) - v) * (1 - self.beta_2))
        m_hat = m / (1 - ops.power(ops.cast(self.beta_1, variable.dtype), step))
        v_hat = v / (1 - ops.power(ops.cast(self.beta_2, variable.dtype), step))
        delta = lr * m_hat / (ops.sqrt(v_hat) + self.epsilon)

        if self._clips(variable):
            sigma = clipping.clippy_factor(
                delta, variable, self.variable_relative_threshold, self.absolute_threshold
            )
        else:
            sigma = ops.ones((), dtype=variable.dtype)
        self._export_factor(variable, sigma)
        self.assign_sub(variable, delta * sigma)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "epsilon": self.epsilon,
                "variable_relative_threshold": self.variable_relative_threshold,
                "absolute_threshold": self.absolute_threshold,
            }
        )
        return config
