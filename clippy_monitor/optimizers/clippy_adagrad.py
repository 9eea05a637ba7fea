"""ClippyAdagrad: Adagrad with Clippy's adaptive update clipping (paper Algorithm 1)."""

from __future__ import annotations

from typing import Any

import keras

from clippy_monitor import clipping
from clippy_monitor.optimizers._adagrad import ScaledAdagrad
from clippy_monitor.optimizers._base import check_non_negative


@keras.saving.register_keras_serializable(package="clippy_monitor")
class ClippyAdagrad(ScaledAdagrad):
    r"""Adagrad whose step never moves a coordinate by more than a bound.

    Algorithm 1 of Tang et al. (KDD 2023), with TFRS's generalisation:

        G_t     = G_{t-1} + g_t^2
        p_t     = (G_t + epsilon)^{-1/2},   r_t = g_t p_t
        sigma_t = min(1, min_i (lambda_rel|w_i| + lambda_acc p_i + lambda_abs) / (eta_t |r_i|))
        w_{t+1} = w_t - eta_t sigma_t r_t

    Argument names follow ``tensorflow_recommenders.experimental.optimizers.ClippyAdagrad``
    (TFRS 0.7.7) so models migrate unchanged; given TFRS's arguments the trajectory
    matches TFRS to float32 round-off.  Defaults follow the paper instead of TFRS:
    ``variable_relative_threshold=0.5``, ``absolute_threshold=1e-2`` (5.1.3) and the
    accumulator updated before the step (``use_standard_accumulator_update=True``,
    Algorithm 1 line 5).  TFRS's defaults are 0.1, 1e-7 and False.

    Args:
        learning_rate: float or ``keras.optimizers.schedules.LearningRateSchedule``.
        initial_accumulator_value: starting value of ``G``.
        variable_relative_threshold: lambda_rel.
        accumulator_relative_threshold: lambda_acc, weight of ``p_i`` in the bound.
        absolute_threshold: lambda_abs.
        epsilon: added to ``G`` inside the inverse square root.
        export_clipping_factors: keep the applied sigma per variable in
            ``clipping_factors`` (on by default: one scalar per variable).
        clip_accumulator_update: with the delayed accumulator update, add
            ``(sigma g)^2`` instead of ``g^2``.  Requires
            ``use_standard_accumulator_update=False``.
        use_standard_accumulator_update: add ``g_t^2`` to ``G`` before computing the
            step (Adagrad, Algorithm 1); if False, after it, so ``G_{t-1}`` is used.
        exclude_from_clipping, skip_non_finite: see ``ClippingOptimizer``.

    ``clip_before_accumulator=True`` (GC/AGC's eq. 2 form, ``ScaledAdagrad``) raises
    ``ValueError``: Clippy's factor depends on the update, hence on the accumulator.
    """

    def __init__(
        self,
        learning_rate: Any = 0.001,
        initial_accumulator_value: float = 0.1,
        variable_relative_threshold: float = clipping.DEFAULT_LAMBDA_REL,
        accumulator_relative_threshold: float = 0.0,
        absolute_threshold: float = clipping.DEFAULT_LAMBDA_ABS,
        epsilon: float = 1e-7,
        export_clipping_factors: bool = True,
        clip_accumulator_update: bool = False,
        use_standard_accumulator_update: bool = True,
        name: str = "ClippyAdagrad",
        **kwargs: Any,
    ) -> None:
        if clip_accumulator_update and use_standard_accumulator_update:
            raise ValueError(
                "clip_accumulator_update=True needs use_standard_accumulator_update=False "
                "(the accumulator can only receive the clipped gradient when it is updated after the step)"
            )
        check_non_negative(
            variable_relative_threshold=variable_relative_threshold,
            accumulator_relative_threshold=accumulator_relative_threshold,
            absolute_threshold=absolute_threshold,
        )
        super().__init__(
            learning_rate=learning_rate,
            initial_accumulator_value=initial_accumulator_value,
            epsilon=epsilon,
            export_clipping_factors=export_clipping_factors,
            name=name,
            **kwargs,
        )
        self.variable_relative_threshold = variable_relative_threshold
        self.accumulator_relative_threshold = accumulator_relative_threshold
        self.absolute_threshold = absolute_threshold
        self.clip_accumulator_update = clip_accumulator_update
        self.use_standard_accumulator_update = use_standard_accumulator_update

    @property
    def accumulate_first(self) -> bool:  # type: ignore[override]
        return self.use_standard_accumulator_update

    def clipping_factor(self, grad, weight, delta, learning_rate, preconditioner):
        return clipping.clippy_factor(
            delta,
            weight,
            lambda_rel=self.variable_relative_threshold,
            lambda_abs=self.absolute_threshold,
            preconditioner=preconditioner,
            lambda_acc=self.accumulator_relative_threshold,
        )

    def accumulator_gradient(self, grad, sigma):
        return grad * sigma if self.clip_accumulator_update else grad

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "variable_relative_threshold": self.variable_relative_threshold,
                "accumulator_relative_threshold": self.accumulator_relative_threshold,
                "absolute_threshold": self.absolute_threshold,
                "clip_accumulator_update": self.clip_accumulator_update,
                "use_standard_accumulator_update": self.use_standard_accumulator_update,
            }
        )
        return config
