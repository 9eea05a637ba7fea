"""The paper's baselines (section 5.1.3): Adagrad with layer-wise GC, AGC or LAMB scaling.

By default all three follow eq. 5, the paper's unified form: the accumulator
receives the unclipped gradient and only the step ``eta * r`` is rescaled by sigma,
so they differ from ClippyAdagrad only in the rule (table in 4.3.1), taken from
``clippy_monitor.clipping``.

GC and AGC also run as the paper first states them (eq. 2 and 3):
``clip_before_accumulator=True`` clips the gradient, ``g' = sigma g``, before
Adagrad's accumulator, so ``G += g'^2`` and the step is ``eta g' G^{-1/2}``
(see ``ScaledAdagrad``).  LAMB has no such form: its trust ratio
``||w|| / ||r||`` depends on the update ``r = g G^{-1/2}``, which depends on the
accumulator the clipped gradient would feed (and it rescales the step up as well
as down; it normalises the update, it does not clip the gradient), so
``LAMBAdagrad(clip_before_accumulator=True)`` raises ``ValueError``.
"""

from __future__ import annotations

from typing import Any

import keras

from clippy_monitor import clipping
from clippy_monitor.optimizers._adagrad import ScaledAdagrad
from clippy_monitor.optimizers._base import check_non_negative


@keras.saving.register_keras_serializable(package="clippy_monitor")
class GCAdagrad(ScaledAdagrad):
    """Adagrad with layer-wise gradient clipping: ``sigma = min(1, clipnorm / ||g||_2)``.

    The paper searched ``clipnorm`` in {1e-1, 1e-2, 1e-3}.  ``clip_before_accumulator``:
    eq. 2 (the clipped gradient feeds the accumulator) instead of eq. 5.
    """

    FACTOR_FROM_GRADIENT = True

    def __init__(
        self,
        learning_rate: Any = 0.001,
        clipnorm: float = clipping.DEFAULT_GC_CLIPNORM,
        name: str = "GCAdagrad",
        **kwargs: Any,
    ) -> None:
        check_non_negative(clipnorm=clipnorm)
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.gc_clipnorm = clipnorm  # Keras reserves `self.clipnorm` for its own global clipping.

    def gradient_factor(self, grad, weight):
        return clipping.gc_factor(clipping.l2_norm(grad), self.gc_clipnorm)

    def clipping_factor(self, grad, weight, delta, learning_rate, preconditioner):
        return self.gradient_factor(grad, weight)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["clipnorm"] = self.gc_clipnorm
        return config


@keras.saving.register_keras_serializable(package="clippy_monitor")
class AGCAdagrad(ScaledAdagrad):
    """Adagrad with adaptive gradient clipping: ``min(1, clipping * max(||w||, eps) / ||g||)``.

    Whole-tensor norms by default (the paper's layer-wise AGC); ``unitwise=True`` uses
    NFNets' per-output-unit norms.  The paper searched ``clipping`` in {1e-2, 1e-3, 1e-4}.
    ``clip_before_accumulator``: eq. 3 then eq. 1 (the clipped gradient feeds the
    accumulator, as NFNets' ``agc`` placed before Adagrad does) instead of eq. 5.
    """

    FACTOR_FROM_GRADIENT = True

    def __init__(
        self,
        learning_rate: Any = 0.001,
        clipping: float = clipping.DEFAULT_AGC_CLIPPING,
        eps: float = clipping.AGC_EPS,
        unitwise: bool = False,
        name: str = "AGCAdagrad",
        **kwargs: Any,
    ) -> None:
        check_non_negative(clipping=clipping)
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.clipping = clipping
        self.eps = eps
        self.unitwise = unitwise

    def gradient_factor(self, grad, weight):
        norm = clipping.unitwise_norm if self.unitwise else clipping.l2_norm
        return clipping.agc_factor(norm(grad), norm(weight), self.clipping, self.eps)

    def clipping_factor(self, grad, weight, delta, learning_rate, preconditioner):
        return self.gradient_factor(grad, weight)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"clipping": self.clipping, "eps": self.eps, "unitwise": self.unitwise})
        return config


@keras.saving.register_keras_serializable(package="clippy_monitor")
class LAMBAdagrad(ScaledAdagrad):
    """Adagrad with LAMB's layer-wise trust ratio (paper footnote 5, phi(x) = x).

    ``w <- w - eta * (||w||_2 / ||r||_2) * r``: only the direction of ``r`` is kept,
    so the step is about ``eta * ||w||``; pass the learning rate already scaled by the
    paper's ``mu`` (searched in {1e-1, 1e-2, 1e-3}).  Eq. 5 only: the trust ratio needs
    the update, so ``clip_before_accumulator=True`` raises ``ValueError``.
    """

    def __init__(
        self, learning_rate: Any = 0.001, name: str = "LAMBAdagrad", **kwargs: Any
    ) -> None:
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)

    def clipping_factor(self, grad, weight, delta, learning_rate, preconditioner):
        return clipping.lamb_trust_ratio(
            clipping.l2_norm(weight), clipping.l2_norm(grad * preconditioner)
        )
