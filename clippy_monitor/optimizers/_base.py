"""What every bundled optimizer shares: per-variable clipping factors, exclusion
by name, and the optional non-finite guard.

Subclasses implement the math of one paper algorithm in ``update_step`` and call
``_clips(variable)`` and ``_export_factor(variable, sigma)``.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import keras
from keras import ops

from clippy_monitor.sparse import dense_values


def check_non_negative(**hyperparameters: float) -> None:
    """Raise ``ValueError`` naming the first negative hyperparameter."""
    for name, value in hyperparameters.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")


def all_finite(grads: Sequence[Any]) -> Any:
    """Scalar bool: no NaN or Inf in any gradient (``None`` gradients ignored)."""
    flags = [ops.all(ops.isfinite(dense_values(g))) for g in grads if g is not None]
    if not flags:
        return ops.convert_to_tensor(True)
    return ops.all(ops.stack(flags))


class ClippingOptimizer(keras.optimizers.Optimizer):
    """Base class of the bundled optimizers.

    Args:
        exclude_from_clipping: variable-name patterns (regular expressions matched
            with ``re.search`` against ``variable.path``) whose variables are never
            clipped; the paper clips only non-embedding parameters (5.1.3), e.g.
            ``exclude_from_clipping=["embedding"]``.
        export_clipping_factors: keep one scalar variable per model variable with
            the factor applied at the last step (``clipping_factors``); the
            ``DivergenceMonitor`` records it as ``applied_factor``.
        skip_non_finite: if True, a step whose gradients hold NaN or Inf leaves the
            weights and all optimizer state untouched (``iterations`` included) and
            increments ``non_finite_steps``, as Keras's ``LossScaleOptimizer`` does.
    """

    def __init__(
        self,
        learning_rate: Any,
        exclude_from_clipping: Sequence[str] | None = None,
        export_clipping_factors: bool = True,
        skip_non_finite: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(learning_rate=learning_rate, **kwargs)
        self.exclude_from_clipping = list(exclude_from_clipping or [])
        self.export_clipping_factors = export_clipping_factors
        self.skip_non_finite = skip_non_finite
        self._exclude_pattern = (
            re.compile("|".join(self.exclude_from_clipping)) if self.exclude_from_clipping else None
        )

    # ------------------------------------------------------------------ state
    def build(self, var_list: Sequence[keras.Variable]) -> None:
        if self.built:
            return
        super().build(var_list)
        self._clip_mask = [
            self._exclude_pattern is None or not self._exclude_pattern.search(v.path)
            for v in var_list
        ]
        self._factor_variables = []
        if self.export_clipping_factors:
            for v in var_list:
                self._factor_variables.append(
                    self.add_variable(
                        shape=(),
                        initializer="ones",
                        dtype="float32",
                        name=f"clipping_factor_{v.name}",
                    )
                )
        self.non_finite_steps = self.add_variable(
            shape=(), initializer="zeros", dtype="int64", name="non_finite_steps"
        )

    @property
    def clipping_factors(self) -> list[keras.Variable]:
        """Per model variable (in build order), the factor applied at the last step."""
        return list(getattr(self, "_factor_variables", []))

    def clipping_factors_by_path(self) -> dict[str, float]:
        """``{variable.path: factor}`` read from the device (one host transfer)."""
        return {
            v.path: float(f.numpy() if hasattr(f, "numpy") else f)
            for v, f in zip(self._trainable_variables, self.clipping_factors)
        }

    def _clips(self, variable: Any) -> bool:
        """Whether ``variable`` is clipped (not excluded by name)."""
        return self._clip_mask[self._get_variable_index(variable)]

    def _export_factor(self, variable: Any, sigma: Any) -> None:
        if self.export_clipping_factors:
            factor = self._factor_variables[self._get_variable_index(variable)]
            self.assign(factor, ops.cast(ops.min(sigma), "float32"))

    # ------------------------------------------------------------ the guard
    def apply(self, grads: Sequence[Any], trainable_variables: Sequence[Any] | None = None) -> None:
        if not self.skip_non_finite:
            return super().apply(grads, trainable_variables)
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
            self.built = True
        apply_fn = super().apply

        def count_skipped() -> None:
            self.non_finite_steps.assign_add(1)

        if keras.backend.backend() == "tensorflow":
            return self._tf_guarded_apply(apply_fn, count_skipped, grads, trainable_variables)
        ops.cond(all_finite(grads), lambda: apply_fn(grads, trainable_variables), count_skipped)

    def _tf_guarded_apply(self, apply_fn, count_skipped, grads, trainable_variables) -> None:
        """``cond(finite, apply, skip)`` that is legal under ``tf.distribute``.

        A cond whose branch does a merge call (the optimizer update) must run in
        cross-replica context, so, as ``LossScaleOptimizer`` does, we step out to it
        and AND the per-replica finiteness flags.
        """
        import tensorflow as tf

        if (
            tf.__internal__.distribute.strategy_supports_no_merge_call()
            or not tf.distribute.has_strategy()
        ):
            ops.cond(all_finite(grads), lambda: apply_fn(grads, trainable_variables), count_skipped)
            return

        def cross_replica(distribution, grads, trainable_variables):
            flags = distribution.extended.call_for_each_replica(all_finite, args=(grads,))
            finite = tf.reduce_all(tf.stack(distribution.experimental_local_results(flags)))

            def apply_all() -> None:
                distribution.extended.call_for_each_replica(
                    apply_fn, args=(grads, trainable_variables)
                )

            tf.cond(finite, apply_all, count_skipped)

        tf.distribute.get_replica_context().merge_call(
            cross_replica, args=(grads, trainable_variables)
        )

    # --------------------------------------------------------------- config
    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "exclude_from_clipping": self.exclude_from_clipping,
                "export_clipping_factors": self.export_clipping_factors,
                "skip_non_finite": self.skip_non_finite,
            }
        )
        return config
