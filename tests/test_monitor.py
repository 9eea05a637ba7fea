"""DivergenceMonitor under model.fit: recorded values against a NumPy replay,
one row per step (steps_per_execution, XLA, MirroredStrategy, mixed precision),
crash safety (kill -9), resume with BackupAndRestore, detector integration and
the clean-up of the hooks.

Every model here is tiny (a few units, < 100 steps) so the file stays fast on
two shared CPU cores.  Most monitors are made with ``xla=False``: compiling the
recorder with XLA costs ~3 s of CPU per fit.  The default (XLA) recorder is
covered by one case of the NumPy replay and by the jit_compile comparison.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import clippy_monitor
from clippy_monitor import ClippyAdagrad, DetectorConfig, DivergenceMonitor, load_run
from clippy_monitor.monitor import DivergenceDetector

BATCH = 8
NO_XLA = {"xla": False}  # monitor kwargs of the tests that are not about the XLA recorder

# Definitions of clipping.py's docstring, written out here on purpose (the test
# must not reuse the library's formulas).
EPS = 1e-3
GC_CLIPNORM = 0.1
AGC_CLIPPING = 1e-3
LAMBDA_REL = 0.5
LAMBDA_ABS = 1e-2


# --------------------------------------------------------------------------
# Models and data
# --------------------------------------------------------------------------
def _regression_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """x [n, 3], y [n, 1] = a linear function of x plus a little noise (float32)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3)).astype(np.float32)
    y = x @ np.array([[1.0], [-2.0], [0.5]], np.float32) + 0.1 * rng.standard_normal((n, 1)).astype(
        np.float32
    )
    return x, y


def _multitask_data(n: int, seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    x, rating = _regression_data(n, seed)
    click = (x[:, :1] + 0.3 * x[:, 1:2] > 0).astype(np.float32)
    return x, {"click": click, "rating": rating}


def _single_model(name: str = "net", float32_output: bool = False) -> keras.Model:
    """3 -> Dense(4, relu) -> Dense(1): four variables (kernels, zero biases).

    Fixed names, so that a rebuilt model has the same variable paths (resume).
    """
    inputs = keras.Input((3,), name=f"{name}_x")
    hidden = keras.layers.Dense(4, activation="relu", name=f"{name}_hidden")(inputs)
    out = keras.layers.Dense(1, name=f"{name}_out", dtype="float32" if float32_output else None)(
        hidden
    )
    return keras.Model(inputs, out, name=name)


def _multitask_model(name: str = "mt") -> keras.Model:
    """Shared Dense(4, relu), then a binary 'click' head and a regression 'rating' head."""
    inputs = keras.Input((3,), name=f"{name}_x")
    hidden = keras.layers.Dense(4, activation="relu", name=f"{name}_hidden")(inputs)
    click = keras.layers.Dense(1, activation="sigmoid", name="click")(hidden)
    rating = keras.layers.Dense(1, name="rating")(hidden)
    return keras.Model(inputs, {"click": click, "rating": rating}, name=name)


def _weights(model: keras.Model) -> list[np.ndarray]:
    return [np.array(v.numpy()) for v in model.trainable_variables]


def _set_weights(model: keras.Model, values: list[np.ndarray]) -> None:
    for v, value in zip(model.trainable_variables, values):
        v.assign(value)


def _fit(model, x, y, logdir, epochs=1, flush_every=4, callbacks=(), **monitor_kwargs):
    monitor = DivergenceMonitor(logdir, flush_every=flush_every, **{**NO_XLA, **monitor_kwargs})
    history = model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=[monitor, *callbacks],
    )
    return monitor, history, load_run(logdir)


# --------------------------------------------------------------------------
# NumPy reference
# --------------------------------------------------------------------------
def _reference_layer_stats(
    g: np.ndarray,
    w: np.ndarray,
    w_after: np.ndarray,
    lr: float,
    r: np.ndarray | None = None,
    applied: float = 1.0,
) -> dict[str, float]:
    """The per-layer metrics of one step, from clipping.py's definitions.

    ``r``: the optimizer's update before clipping (paper eq. 4); by default the
    step taken, ``(w - w_after) / lr``, for an optimizer that does not clip.
    """
    g, w, w_after = (np.asarray(a, np.float64) for a in (g, w, w_after))
    grad_norm = np.sqrt(np.sum(g**2))
    weight_norm = np.sqrt(np.sum(w**2))
    r = (w - w_after) / lr if r is None else np.asarray(r, np.float64)
    delta = lr * r  # the (unclipped) step
    threshold = LAMBDA_REL * np.abs(w) + LAMBDA_ABS
    return {
        "grad_norm": grad_norm,
        "weight_norm": weight_norm,
        "grad_weight_ratio": grad_norm / max(weight_norm, EPS),
        "update_weight_linf": np.max(np.abs(r) / np.maximum(np.abs(w), EPS)),
        "gc_factor": 1.0 if grad_norm == 0 else min(1.0, GC_CLIPNORM / grad_norm),
        "agc_factor": 1.0
        if grad_norm == 0
        else min(1.0, AGC_CLIPPING * max(weight_norm, EPS) / grad_norm),
        "clippy_factor": min(
            1.0, np.min(np.where(delta == 0, np.inf, threshold / np.maximum(np.abs(delta), 1e-300)))
        ),
        "applied_factor": applied,
        "nonfinite_count": float(np.sum(~np.isfinite(g))),
        "zero_grad_fraction": float(np.mean(g == 0)),
    }


def _clippy_sigma(delta: np.ndarray, w: np.ndarray) -> np.float32:
    """Algorithm 1, line 8: ``min(1, min_i (lambda_rel |w_i| + lambda_abs) / |delta_i|)``."""
    threshold = LAMBDA_REL * np.abs(w) + LAMBDA_ABS
    ratios = np.where(delta == 0, np.inf, threshold / np.maximum(np.abs(delta), 1e-30))
    return np.float32(min(1.0, ratios.min()))


def _replay(model, w0, x, y, steps, lr, optimizer, tasks):
    """Re-run ``steps`` training steps eagerly from weights ``w0``.

    Gradients come from tf.GradientTape on the same batches (shuffle=False);
    the optimizer update is NumPy (float32, like the variables): ``"sgd"``,
    ``"adagrad"``, ``"clippy"`` (ClippyAdagrad with the paper's thresholds) or
    ``"gc-eq2"`` (GCAdagrad, clipnorm 0.1, the clipped gradient fed to the accumulator).  Returns
    per-step ``(layer_stats [steps, metrics, layers], series dict)``.
    """
    losses = {"click": keras.losses.BinaryCrossentropy(), "rating": keras.losses.MeanSquaredError()}
    mse = keras.losses.MeanSquaredError()
    n_batches = len(x) // BATCH
    weights = [w.astype(np.float32).copy() for w in w0]
    accumulators = [np.full_like(w, 0.1) for w in weights]  # Adagrad's initial_accumulator_value
    layer_rows, series = (
        [],
        {"loss": [], "learning_rate": [], "grad_norm": [], **{f"loss/{t}": [] for t in tasks}},
    )
    lr32 = np.float32(lr)
    for step in range(steps):
        b = step % n_batches
        xb = x[b * BATCH : (b + 1) * BATCH]
        _set_weights(model, weights)
        with tf.GradientTape() as tape:
            pred = model(xb, training=True)
            if tasks:
                task_losses = {
                    t: losses[t](y[t][b * BATCH : (b + 1) * BATCH], pred[t]) for t in tasks
                }
                loss = tf.add_n(list(task_losses.values()))
            else:
                task_losses = {}
                loss = mse(y[b * BATCH : (b + 1) * BATCH], pred)
        grads = [g.numpy() for g in tape.gradient(loss, model.trainable_variables)]
        after, stats = [], []
        for i, (w, g) in enumerate(zip(weights, grads)):
            if optimizer == "sgd":
                after.append(w - lr32 * g)
                stats.append(_reference_layer_stats(g, w, after[-1], lr))
                continue
            if optimizer == "gc-eq2":  # paper eq. 2: G += (sigma g)^2, sigma = min(1, lambda/||g||)
                sigma = np.float32(
                    min(1.0, GC_CLIPNORM / np.sqrt(np.sum(np.square(g, dtype=np.float64))))
                )
                accumulators[i] = accumulators[i] + (sigma * g) ** 2
            else:
                accumulators[i] = accumulators[i] + g * g
            r = g / np.sqrt(accumulators[i] + np.float32(1e-7))  # Adagrad's update before clipping
            if optimizer == "clippy":
                sigma = _clippy_sigma(lr32 * r, w)
            elif optimizer != "gc-eq2":
                sigma = np.float32(1.0)
            after.append(w - lr32 * r * sigma)
            clipped = optimizer in ("clippy", "gc-eq2")
            stats.append(
                _reference_layer_stats(g, w, after[-1], lr, r if clipped else None, float(sigma))
            )
        layer_rows.append(stats)
        series["loss"].append(float(loss))
        for t, value in task_losses.items():
            series[f"loss/{t}"].append(float(value))
        series["learning_rate"].append(lr)
        series["grad_norm"].append(np.sqrt(sum(s["grad_norm"] ** 2 for s in stats)))
        weights = after
    metrics = list(clippy_monitor.record.LAYER_METRICS)
    table = np.array(
        [[[row[layer][m] for layer in range(len(row))] for m in metrics] for row in layer_rows]
    )
    return table, {k: np.array(v) for k, v in series.items()}


# --------------------------------------------------------------------------
# 1. Recorded statistics == NumPy recomputation
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "multitask, optimizer, xla",
    [
        (False, "sgd", False),
        (False, "adagrad", False),
        (True, "sgd", False),
        (True, "adagrad", True),
    ],
    ids=["single-sgd", "single-adagrad", "multitask-sgd", "multitask-adagrad-xla"],
)
def test_recorded_statistics_match_numpy_replay(tmp_path, optimizer, multitask, xla):
    lr = 0.05
    if multitask:
        model, (x, y), tasks = _multitask_model(), _multitask_data(24), ["click", "rating"]
        loss = {"click": "binary_crossentropy", "rating": "mse"}
    else:
        model, (x, y), tasks = _single_model(), _regression_data(24), []
        loss = "mse"
    # A dead ReLU unit: its gradients are exactly zero (zero_grad_fraction > 0).
    hidden = model.get_layer(f"{model.name}_hidden")
    hidden.bias.assign([-10.0, 0.0, 0.0, 0.0])
    opt = keras.optimizers.SGD(lr) if optimizer == "sgd" else keras.optimizers.Adagrad(lr)
    model.compile(optimizer=opt, loss=loss, steps_per_execution=1)
    w0 = _weights(model)
    steps = 6  # 2 epochs x 3 batches
    _, history, run = _fit(model, x, y, tmp_path / "run", epochs=2, flush_every=4, xla=xla)

    np.testing.assert_array_equal(run.steps, np.arange(steps))
    assert run.layers == [v.path for v in model.trainable_variables]
    assert run.meta["tasks"] == tasks
    assert run.series_names[: 3 + len(tasks)] == [
        "loss",
        *(f"loss/{t}" for t in tasks),
        "learning_rate",
        "grad_norm",
    ]

    expected_layers, expected_series = _replay(model, w0, x, y, steps, lr, optimizer, tasks)
    assert (
        expected_layers[:, run.layer_metrics.index("zero_grad_fraction")].max() > 0
    )  # ReLU zeros are exercised
    assert (
        expected_layers[:, run.layer_metrics.index("weight_norm")].min() == 0
    )  # so is the eps floor (zero bias)
    for m, metric in enumerate(run.layer_metrics):
        np.testing.assert_allclose(
            run.layer(metric), expected_layers[:, m], rtol=1e-4, atol=1e-7, err_msg=metric
        )
    for name, values in expected_series.items():
        np.testing.assert_allclose(run.series(name), values, rtol=1e-4, err_msg=name)
    # Keras' epoch loss is the mean of the recorded per-step losses.
    np.testing.assert_allclose(
        history.history["loss"], run.series("loss").reshape(2, 3).mean(axis=1), rtol=1e-5
    )


# --------------------------------------------------------------------------
# 2. ClippyAdagrad: applied_factor is the optimizer's factor
# --------------------------------------------------------------------------
class _FactorLog(keras.callbacks.Callback):
    """The optimizer's exported factors after every step (steps_per_execution=1)."""

    def __init__(self) -> None:
        super().__init__()
        self.factors: list[list[float]] = []

    def on_train_batch_end(self, batch, logs=None):
        self.factors.append([float(f.numpy()) for f in self.model.optimizer.clipping_factors])


def test_applied_factor_is_clippy_adagrads_factor(tmp_path):
    model, (x, y) = _single_model(), _regression_data(32)
    opt = ClippyAdagrad(
        learning_rate=0.5, variable_relative_threshold=LAMBDA_REL, absolute_threshold=LAMBDA_ABS
    )
    model.compile(optimizer=opt, loss="mse", steps_per_execution=1)
    log = _FactorLog()
    _, _, run = _fit(model, x, y, tmp_path / "run", epochs=2, flush_every=3, callbacks=[log])

    applied = run.layer("applied_factor")
    assert applied.shape == (8, 4)
    np.testing.assert_allclose(applied, np.array(log.factors), rtol=1e-6)
    np.testing.assert_allclose(
        applied[-1], [float(f.numpy()) for f in opt.clipping_factors], rtol=1e-6
    )
    assert applied.min() < 0.5  # clipping was active, and strongly
    assert np.all(applied > 0) and np.all(applied <= 1)
    # The monitor's would-apply Clippy factor is computed on the unclipped step,
    # so with the optimizer's thresholds it is the factor the optimizer applied.
    np.testing.assert_allclose(run.layer("clippy_factor"), applied, rtol=1e-4)


def test_update_weight_linf_is_the_update_before_clipping(tmp_path):
    """Paper eq. 4: ||r/w||_inf is Adagrad's r before Clippy scales it by sigma."""
    lr, steps = 0.5, 6
    model, (x, y) = _single_model(), _regression_data(24)
    opt = ClippyAdagrad(
        learning_rate=lr, variable_relative_threshold=LAMBDA_REL, absolute_threshold=LAMBDA_ABS
    )
    model.compile(optimizer=opt, loss="mse", steps_per_execution=1)
    w0 = _weights(model)
    _, _, run = _fit(model, x, y, tmp_path / "run", epochs=2, flush_every=4)

    expected, _ = _replay(model, w0, x, y, steps, lr, "clippy", [])
    applied = expected[:, run.layer_metrics.index("applied_factor")]
    assert np.mean(applied < 1) > 0.5 and applied.min() < 0.1  # Clippy clips most steps, some hard
    for metric in ("update_weight_linf", "clippy_factor", "applied_factor"):
        m = run.layer_metrics.index(metric)
        np.testing.assert_allclose(run.layer(metric), expected[:, m], rtol=1e-4, err_msg=metric)


def test_applied_factor_and_update_are_right_for_gc_in_eq2_form(tmp_path):
    """GCAdagrad(clip_before_accumulator=True) takes the step eta * sigma * g * G'^-1/2
    with G' the accumulator of clipped gradients: applied_factor is sigma, and
    ||r/w||_inf is measured on r = g * G'^-1/2 (the step with sigma divided out)."""
    lr, steps = 0.5, 6
    model, (x, y) = _single_model(), _regression_data(24)
    opt = clippy_monitor.GCAdagrad(
        learning_rate=lr, clipnorm=GC_CLIPNORM, clip_before_accumulator=True
    )
    model.compile(optimizer=opt, loss="mse", steps_per_execution=1)
    w0 = _weights(model)
    _, _, run = _fit(model, x, y, tmp_path / "run", epochs=2, flush_every=4)

    expected, _ = _replay(model, w0, x, y, steps, lr, "gc-eq2", [])
    applied = expected[:, run.layer_metrics.index("applied_factor")]
    assert applied.min() < 0.5  # GC clipped, and hard
    for metric in ("applied_factor", "gc_factor", "update_weight_linf", "clippy_factor"):
        m = run.layer_metrics.index(metric)
        np.testing.assert_allclose(run.layer(metric), expected[:, m], rtol=1e-4, err_msg=metric)
    # the would-apply GC factor at the optimizer's threshold is the factor it applied
    np.testing.assert_allclose(run.layer("gc_factor"), run.layer("applied_factor"), rtol=1e-5)


# --------------------------------------------------------------------------
# 3. One record per step with steps_per_execution > 1
# --------------------------------------------------------------------------
def test_one_row_per_step_with_steps_per_execution(tmp_path):
    x, y = _regression_data(12 * BATCH)  # 12 steps per epoch: 4 divides it, 8 does not
    w0 = _weights(_single_model())
    runs = {}
    for spe in (1, 4, 8):
        model = _single_model()
        _set_weights(model, w0)
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse", steps_per_execution=spe)
        _, history, run = _fit(model, x, y, tmp_path / f"spe{spe}", epochs=5, flush_every=10)
        np.testing.assert_array_equal(
            run.steps, np.arange(60), err_msg=f"spe={spe}"
        )  # no gap, no duplicate
        assert not run.skipped
        np.testing.assert_allclose(
            history.history["loss"], run.series("loss").reshape(5, 12).mean(axis=1), rtol=1e-5
        )
        runs[spe] = run
    ref = runs[1]
    for spe in (4, 8):
        # Same steps, same values: each row is the step it claims to be.
        for name in ("loss", "grad_norm"):
            np.testing.assert_allclose(
                runs[spe].series(name), ref.series(name), rtol=1e-5, err_msg=f"{name} spe={spe}"
            )
        for metric in ("grad_norm", "weight_norm"):
            np.testing.assert_allclose(
                runs[spe].layer(metric), ref.layer(metric), rtol=1e-5, err_msg=f"{metric} spe={spe}"
            )


# --------------------------------------------------------------------------
# 4. XLA
# --------------------------------------------------------------------------
def test_jit_compile_records_the_same_values(tmp_path):
    x, y = _multitask_data(4 * BATCH)
    runs = {}
    for jit in (False, True):
        keras.utils.set_random_seed(7)
        model = _multitask_model()
        model.compile(
            optimizer=keras.optimizers.Adagrad(0.1),
            loss={"click": "binary_crossentropy", "rating": "mse"},
            jit_compile=jit,
        )
        # The jitted train step runs the default (XLA) recorder; the reference runs neither.
        _, _, runs[jit] = _fit(
            model, x, y, tmp_path / f"jit{jit}", epochs=2, flush_every=3, xla=jit
        )
    ref, xla = runs[False], runs[True]
    np.testing.assert_array_equal(xla.steps, np.arange(8))
    assert xla.series_names == ref.series_names
    for name in ref.series_names:
        np.testing.assert_allclose(
            xla.series(name), ref.series(name), rtol=1e-5, atol=1e-7, err_msg=name
        )
    for metric in ref.layer_metrics:
        np.testing.assert_allclose(
            xla.layer(metric), ref.layer(metric), rtol=1e-5, atol=1e-7, err_msg=metric
        )
    assert np.all(np.isfinite(xla.series("loss/click"))) and np.all(
        np.isfinite(xla.series("loss/rating"))
    )


# --------------------------------------------------------------------------
# 10. async_safe, and a second fit() continues the numbering
# --------------------------------------------------------------------------
def test_async_safe_and_second_fit_continues_steps(tmp_path):
    assert DivergenceMonitor(tmp_path / "unused").async_safe is True
    model, (x, y) = _single_model(), _regression_data(4 * BATCH)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    monitor = DivergenceMonitor(tmp_path / "run", flush_every=3, **NO_XLA)
    model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0, callbacks=[monitor])
    assert len(load_run(tmp_path / "run")) == 8
    state_after_first = load_run(tmp_path / "run").detector_state
    history = model.fit(
        x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[monitor]
    )
    run = load_run(tmp_path / "run")
    np.testing.assert_array_equal(run.steps, np.arange(12))
    assert int(model.optimizer.iterations.numpy()) == 12
    np.testing.assert_allclose(history.history["loss"], [run.series("loss")[8:].mean()], rtol=1e-5)
    # The detector kept its state across the two fits: it has seen 12 healthy steps, not 4.
    count = DivergenceDetector(1).state_layout()["count"]
    assert state_after_first[count] == [8]
    assert run.detector_state[count] == [12]


# --------------------------------------------------------------------------
# 11. Hooks are removed after fit
# --------------------------------------------------------------------------
def test_hooks_removed_after_fit(tmp_path):
    model, (x, y) = _multitask_model(), _multitask_data(2 * BATCH)
    model.compile(
        optimizer=keras.optimizers.SGD(0.05), loss={"click": "binary_crossentropy", "rating": "mse"}
    )
    monitor, _, _ = _fit(model, x, y, tmp_path / "run", epochs=1, flush_every=2)
    assert "apply" not in vars(model.optimizer)
    assert "compute_loss" not in vars(model)
    compile_loss = model._compile_loss
    assert "build" not in vars(compile_loss)
    assert len(compile_loss._flat_losses) == 2
    assert not any(
        "task_loss" in getattr(e.loss, "__qualname__", "") for e in compile_loss._flat_losses
    )
    assert (
        model.train_function is not monitor._monitored_train_function
    )  # the user's train function is back
    # Training without the monitor records nothing more and still works.
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    assert len(load_run(tmp_path / "run")) == 2
    assert int(model.optimizer.iterations.numpy()) == 4


# --------------------------------------------------------------------------
# 5. MirroredStrategy: all-reduced gradients and losses
# --------------------------------------------------------------------------
def test_mirrored_strategy_record_equals_single_device(tmp_path, mirrored_strategy):
    x, y = _regression_data(64)
    runs = {}
    w0 = None
    for name, scope in [
        ("single", tf.distribute.get_strategy().scope()),
        ("mirrored", mirrored_strategy.scope()),
    ]:
        with scope:
            model = _single_model()
            if w0 is None:
                w0 = _weights(model)
            else:
                _set_weights(model, w0)
            model.compile(optimizer=keras.optimizers.Adagrad(0.1), loss="mse")
        monitor = DivergenceMonitor(tmp_path / name, flush_every=3, **NO_XLA)
        model.fit(
            x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[monitor]
        )  # global batch 16
        runs[name] = load_run(tmp_path / name)
    single, mirrored = runs["single"], runs["mirrored"]
    assert mirrored_strategy.num_replicas_in_sync == 2
    np.testing.assert_array_equal(mirrored.steps, np.arange(8))
    for name in ("loss", "grad_norm", "learning_rate"):
        np.testing.assert_allclose(
            mirrored.series(name), single.series(name), rtol=1e-5, err_msg=name
        )
    for metric in ("grad_norm", "weight_norm"):
        np.testing.assert_allclose(
            mirrored.layer(metric), single.layer(metric), rtol=1e-5, atol=1e-7, err_msg=metric
        )
    # Derived metrics, looser: the output bias's gradient is a small sum of
    # residuals whose summation order differs between one and two replicas.
    for metric in ("agc_factor", "grad_weight_ratio", "zero_grad_fraction"):
        np.testing.assert_allclose(
            mirrored.layer(metric), single.layer(metric), rtol=1e-4, err_msg=metric
        )


# --------------------------------------------------------------------------
# 6. Mixed precision: the recorded gradient norm is unscaled
# --------------------------------------------------------------------------
@pytest.fixture
def mixed_float16():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_mixed_float16_records_unscaled_gradient_norm(tmp_path, mixed_float16):
    x, y = _regression_data(4 * BATCH)
    x, y = (
        0.25 * x,
        0.25 * y,
    )  # small gradients: no float16 overflow at the initial loss scale 2**15
    model = _single_model(float32_output=True)
    assert model.get_layer("net_hidden").compute_dtype == "float16"
    w0 = _weights(model)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    _, _, mixed = _fit(model, x, y, tmp_path / "mixed", epochs=1, flush_every=2)
    # The scale stayed 2**15 (no step was skipped): a scaled norm would be 32768x too large.
    assert float(model.optimizer.dynamic_scale.numpy()) == 2.0**15

    keras.mixed_precision.set_global_policy("float32")
    ref_model = _single_model()
    _set_weights(ref_model, w0)
    ref_model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    _, _, ref = _fit(ref_model, x, y, tmp_path / "float32", epochs=1, flush_every=2)

    np.testing.assert_array_equal(mixed.steps, np.arange(4))
    assert np.all(np.isfinite(mixed.series("grad_norm")))
    np.testing.assert_allclose(mixed.series("grad_norm"), ref.series("grad_norm"), rtol=1e-2)
    np.testing.assert_allclose(
        mixed.layer("grad_norm"), ref.layer("grad_norm"), rtol=1e-2, atol=1e-4
    )
    np.testing.assert_allclose(mixed.series("loss"), ref.series("loss"), rtol=1e-2)
    np.testing.assert_allclose(mixed.layer("weight_norm"), ref.layer("weight_norm"), rtol=1e-2)
    assert not mixed.events


def test_mixed_float16_overflow_skips_are_not_a_divergence(tmp_path, mixed_float16):
    """LossScaleOptimizer skips a step whose scaled float16 gradients overflow and
    halves the scale: routine, so no full divergence (and no stop)."""
    x, y = _regression_data(4 * BATCH)
    model = _single_model(float32_output=True)
    optimizer = keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(0.05), initial_scale=2.0**24
    )
    model.compile(optimizer=optimizer, loss="mse")
    config = DetectorConfig(warmup_steps=2)
    _, history, run = _fit(
        model,
        x,
        y,
        tmp_path / "run",
        epochs=3,
        flush_every=2,
        detector=config,
        on_divergence="stop",
    )
    assert len(history.history["loss"]) == 3  # not stopped
    grad_norm = run.series("grad_norm")
    skipped = ~np.isfinite(grad_norm)
    assert (
        skipped[0] and skipped.sum() >= 2 and np.isfinite(grad_norm[-1])
    )  # overflows, then a usable scale
    np.testing.assert_array_equal(
        run.layer("update_weight_linf")[skipped], 0.0
    )  # the weights did not move
    assert np.all(
        run.layer("nonfinite_count")[skipped].sum(axis=1) > 0
    )  # the record still shows them
    assert np.all(run.series("detector/status") < 2)
    assert not [e for e in run.events if e["kind"] == "full"]
    assert np.all(np.isfinite(run.series("loss")))


# --------------------------------------------------------------------------
# 7. kill -9 mid-training leaves a readable record
# --------------------------------------------------------------------------
_ENDLESS_TRAINING = """
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np, keras
from clippy_monitor import DivergenceMonitor

keras.utils.set_random_seed(0)
x = np.random.default_rng(0).standard_normal((80, 3)).astype("float32")
y = x.sum(axis=1, keepdims=True)
model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(1)])
model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
model.fit(x, y, batch_size=8, epochs=100_000, shuffle=False, verbose=0,  # 10 steps per epoch
          callbacks=[DivergenceMonitor(sys.argv[1], flush_every=5, tensorboard=False, xla=False)])
"""


def test_kill_9_mid_training_leaves_a_readable_record(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(_ENDLESS_TRAINING)
    logdir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(logdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 90
        n = 0
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                n = len(load_run(logdir))
            except clippy_monitor.RecordError:
                n = 0
            if n >= 15:  # at least three chunks on disk, and training goes on
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the training subprocess ended on its own"
        assert n >= 15, "no flushes within 90 s"
        time.sleep(0.013)  # land anywhere in a step or a write
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    run = load_run(logdir)
    assert len(run) >= n
    np.testing.assert_array_equal(run.steps, np.arange(len(run)))  # contiguous from 0
    assert len(run) % 5 == 0  # whole flushes only
    assert all(c.n_steps == 5 for c in run.chunks)
    assert np.all(np.isfinite(run.series("loss")))
    assert np.all(run.layer("weight_norm")[:, ::2] > 0)  # real rows, not zero padding


# --------------------------------------------------------------------------
# 8. Resume after a crash with BackupAndRestore
# --------------------------------------------------------------------------
class _Crash(keras.callbacks.Callback):
    """Raise in epoch ``epoch`` after batch ``batch`` (a simulated crash)."""

    def __init__(self, epoch: int, batch: int) -> None:
        super().__init__()
        self.crash_epoch, self.crash_batch, self._epoch = epoch, batch, -1

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self._epoch == self.crash_epoch and batch == self.crash_batch:
            raise RuntimeError("simulated crash")


@pytest.mark.parametrize("monitor_first", [False, True], ids=["backup-first", "monitor-first"])
def test_resume_with_backup_and_restore(tmp_path, monitor_first):
    x, y = _regression_data(6 * BATCH)  # 6 steps per epoch, 4 epochs
    w0 = _weights(_single_model())
    monitors = []

    def train(logdir, callbacks, backup=None):
        model = _single_model()  # same names: the record's layers must match on resume
        _set_weights(model, w0)
        model.compile(optimizer=keras.optimizers.Adagrad(0.05), loss="mse")
        monitor = DivergenceMonitor(logdir, flush_every=4, **NO_XLA)
        monitors.append(monitor)
        cbs = [keras.callbacks.BackupAndRestore(str(backup))] if backup else []
        cbs = [monitor, *cbs] if monitor_first else [*cbs, monitor]
        model.fit(
            x, y, batch_size=BATCH, epochs=4, shuffle=False, verbose=0, callbacks=cbs + callbacks
        )
        return model, monitor

    # Reference: the same training without a crash.
    train(tmp_path / "reference", [])
    reference = load_run(tmp_path / "reference")

    logdir, backup = tmp_path / "run", tmp_path / "backup"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(logdir, [_Crash(epoch=2, batch=4)], backup)
    monitors[-1].close()  # what the end of the crashed process does (it releases the record's lock)
    crashed = load_run(logdir)
    # Epochs 0-1 (steps 0..11, backed up) and a flush inside epoch 2 (steps 12..15)
    # were written; step 16 ran but was not flushed.
    np.testing.assert_array_equal(crashed.steps, np.arange(16))
    model, _ = train(logdir, [], backup)  # a new model and monitor continue from the backup

    run = load_run(logdir)
    assert int(model.optimizer.iterations.numpy()) == 24
    np.testing.assert_array_equal(run.steps, np.arange(4 * 6))  # no gap, no duplicate
    assert len(run.series("detector/status")) == 24
    # Steps 12..15 were recorded twice (before the crash and after the restore);
    # the record keeps the re-run, which equals the uninterrupted reference.
    for name in ("loss", "grad_norm", "detector/status", "detector/since_onset"):
        np.testing.assert_allclose(
            run.series(name), reference.series(name), rtol=1e-5, err_msg=name
        )
    np.testing.assert_allclose(run.layer("weight_norm"), reference.layer("weight_norm"), rtol=1e-5)
    # The detector continued from its state at the restored step, not from scratch.
    np.testing.assert_allclose(run.detector_state, reference.detector_state, rtol=1e-5)
    assert run.detector_state[DivergenceDetector(1).state_layout()["count"]] == [24]


def _embedding_model(vocab: int) -> keras.Model:
    ids = keras.Input((3,), dtype="int32")
    h = keras.layers.Flatten()(keras.layers.Embedding(vocab, 2, name="ids_embedding")(ids))
    return keras.Model(ids, keras.layers.Dense(1, name="out")(h))


def _id_data(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 12, size=(n, 3)).astype(np.int32), rng.normal(size=(n, 1)).astype(
        np.float32
    )


class _Snapshots(keras.callbacks.Callback):
    """The embedding table before and after every step (steps_per_execution=1)."""

    def __init__(self) -> None:
        super().__init__()
        self.before, self.after = [], []

    def on_train_batch_begin(self, batch, logs=None):
        self.before.append(self.model.get_layer("ids_embedding").embeddings.numpy().copy())

    def on_train_batch_end(self, batch, logs=None):
        self.after.append(self.model.get_layer("ids_embedding").embeddings.numpy().copy())


@pytest.mark.parametrize("xla", [False, True], ids=["graph", "xla"])
def test_embedding_statistics_cover_the_touched_rows(tmp_path, xla):
    """A sparse (embedding) gradient: the weight metrics are those of the rows the
    batch looked up, not of the whole table, so the cost follows the batch."""
    vocab, lr = 50, 0.5
    model = _embedding_model(vocab)
    model.compile(optimizer=keras.optimizers.Adagrad(lr), loss="mse")
    x, y = _id_data(4 * BATCH)  # rows 12.. are never looked up
    table = model.get_layer("ids_embedding").embeddings
    table.assign(np.concatenate([table.numpy()[:12], np.full((vocab - 12, 2), 10.0, np.float32)]))
    snapshots = _Snapshots()
    _, _, run = _fit(model, x, y, tmp_path / "run", flush_every=3, xla=xla, callbacks=[snapshots])

    column = run.layers.index(model.get_layer("ids_embedding").embeddings.path)
    for step in range(4):
        rows = np.unique(x[step * BATCH : (step + 1) * BATCH])
        w, w_after = snapshots.before[step][rows], snapshots.after[step][rows]
        np.testing.assert_array_equal(
            np.delete(snapshots.after[step], rows, axis=0),
            np.delete(snapshots.before[step], rows, axis=0),
        )
        np.testing.assert_allclose(
            run.layer("weight_norm")[step, column], np.linalg.norm(w), rtol=1e-5
        )
        ratio = np.abs(w - w_after) / lr / np.maximum(np.abs(w), EPS)
        np.testing.assert_allclose(
            run.layer("update_weight_linf")[step, column], ratio.max(), rtol=1e-4
        )
        assert (
            run.layer("weight_norm")[step, column] < 2.0 < np.linalg.norm(snapshots.before[step])
        )  # not the table's norm


def test_mirrored_embedding_statistics_equal_single_device(tmp_path, mirrored_strategy):
    """Each replica looks up other rows; the touched rows are those of the all-reduced gradient."""
    x, y = _id_data(64)
    runs, w0 = {}, None
    for name, scope in [
        ("single", tf.distribute.get_strategy().scope()),
        ("mirrored", mirrored_strategy.scope()),
    ]:
        with scope:
            model = _embedding_model(50)
            w0 = _weights(model) if w0 is None else w0
            _set_weights(model, w0)
            model.compile(optimizer=keras.optimizers.Adagrad(0.5), loss="mse")
        monitor = DivergenceMonitor(tmp_path / name, flush_every=3, **NO_XLA)
        model.fit(
            x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[monitor]
        )  # global batch 16
        runs[name] = load_run(tmp_path / name)
    column = runs["single"].layers.index("ids_embedding/embeddings")
    for metric in (
        "grad_norm",
        "weight_norm",
        "update_weight_linf",
        "clippy_factor",
        "zero_grad_fraction",
    ):
        np.testing.assert_allclose(
            runs["mirrored"].layer(metric)[:, column],
            runs["single"].layer(metric)[:, column],
            rtol=1e-4,
            err_msg=metric,
        )


# --------------------------------------------------------------------------
# 9. Detector integration
# --------------------------------------------------------------------------
FAST_DETECTOR = DetectorConfig(warmup_steps=20, baseline_decay=0.9, recovery_window=15)


def test_loss_spike_is_a_micro_divergence_at_the_injected_step(tmp_path):
    x, y = _multitask_data(60 * BATCH)
    spike = 40  # after a healthy warm-up longer than FAST_DETECTOR.warmup_steps
    y["rating"][spike * BATCH : (spike + 2) * BATCH] *= 30  # two batches of huge labels
    model = _multitask_model()
    model.compile(
        optimizer=keras.optimizers.SGD(0.01), loss={"click": "binary_crossentropy", "rating": "mse"}
    )
    monitor, history, run = _fit(
        model, x, y, tmp_path / "run", epochs=1, flush_every=10, detector=FAST_DETECTOR
    )

    assert run.meta["detector"] == FAST_DETECTOR.to_dict()
    micro = [e for e in run.events if e["kind"] == "micro"]
    assert len(micro) == 1 and not [e for e in run.events if e["kind"] == "full"]
    event = micro[0]
    assert event["step_b"] == spike and event["step_a"] == spike - 1
    assert event["task"] == "loss/rating"  # the task whose loss moved, not the click task
    assert spike < event["recovered"] < 60
    assert monitor.events == run.events
    status = run.series("detector/status")
    assert (
        np.all(status[:spike] == 0)
        and status[event["recovered"] - 1] == 1
        and np.all(status[event["recovered"] :] == 0)
    )
    assert run.series("loss/rating")[spike] > 100 * np.median(run.series("loss/rating")[:spike])


def test_live_and_offline_detection_give_the_same_moments_on_a_climbing_loss(tmp_path):
    x, y = _regression_data(80 * BATCH)
    climb = 40  # labels grow over 10 steps to 6x (the loss to ~36x) and stay there
    scale = np.clip(1.0 + 0.5 * (np.arange(80) - climb + 1), 1.0, 6.0).astype(np.float32)
    y = y * np.repeat(scale, BATCH)[:, None]
    model = _single_model()
    model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse")
    monitor, _, run = _fit(model, x, y, tmp_path / "run", flush_every=7, detector=FAST_DETECTOR)

    (full,) = [e for e in run.events if e["kind"] == "full"]
    assert full["reason"] == "no_recovery"
    assert climb <= full["step_b"] < full["confirmed_at"]  # back-dated from the confirmation
    assert full["step_b"] <= full["step_c"] < full["decided_at"]
    assert full["decided_at"] == full["step_b"] + FAST_DETECTOR.recovery_window
    replayed = clippy_monitor.detect_divergence(
        run.series("loss"),
        run.series("grad_norm"),
        series_names=["loss"],
        **FAST_DETECTOR.to_dict(),
    )
    assert replayed == run.events == monitor.events


@pytest.mark.parametrize("on_divergence", [None, "stop"])
def test_nan_labels_are_a_full_divergence(tmp_path, on_divergence):
    x, y = _regression_data(60 * BATCH)
    bad = 25
    y[bad * BATCH + 3] = np.nan  # one NaN label in the batch of step `bad`
    model = _single_model()
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    monitor = DivergenceMonitor(
        tmp_path / "run",
        flush_every=10,
        detector=FAST_DETECTOR,
        on_divergence=on_divergence,
        **NO_XLA,
    )
    # 6 epochs of 10 steps over one pass of the data: step k is batch k.
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    history = model.fit(
        dataset, steps_per_epoch=10, epochs=6, shuffle=False, verbose=0, callbacks=[monitor]
    )
    run = load_run(tmp_path / "run")

    full = [e for e in run.events if e["kind"] == "full"]
    assert len(full) == 1
    assert (
        full[0]["step_b"] == bad and full[0]["step_c"] == bad and full[0]["reason"] == "non_finite"
    )
    status = run.series("detector/status")
    assert np.all(status[:bad] < 1) and np.all(status[bad:] >= 2)
    assert np.isnan(run.series("loss")[bad])
    if on_divergence == "stop":
        # Stopped at the first flush after the divergence: the end of epoch 2 (step 29).
        assert len(history.history["loss"]) == 3
        np.testing.assert_array_equal(run.steps, np.arange(30))
    else:
        assert len(history.history["loss"]) == 6
        np.testing.assert_array_equal(run.steps, np.arange(60))


def test_xla_auto_uses_xla_only_on_accelerators(tmp_path, monkeypatch):
    assert DivergenceMonitor(tmp_path)._use_xla() is False  # this CPU: TF kernels win
    assert DivergenceMonitor(tmp_path, xla=True)._use_xla() is True
    gpu = tf.config.LogicalDevice("/device:GPU:0", "GPU")
    monkeypatch.setattr(tf.config, "list_logical_devices", lambda *args: [gpu])
    assert DivergenceMonitor(tmp_path)._use_xla() is True


# --------------------------------------------------------------------------
# Task losses keep their names whatever the order of the loss dict
# --------------------------------------------------------------------------
def test_task_losses_named_right_with_unsorted_loss_dict(tmp_path):
    """Keras sorts ``output_names`` but evaluates losses in the loss dict's order."""
    x, y = _multitask_data(4 * BATCH)
    y = {"zeta": 100.0 * y["rating"], "alpha": y["click"]}  # zeta's loss is ~10^4 larger
    inputs = keras.Input((3,))
    hidden = keras.layers.Dense(4, activation="relu")(inputs)
    outputs = {
        "zeta": keras.layers.Dense(1, name="zeta")(hidden),
        "alpha": keras.layers.Dense(1, activation="sigmoid", name="alpha")(hidden),
    }
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.SGD(1e-4), loss={"zeta": "mse", "alpha": "binary_crossentropy"}
    )
    _, history, run = _fit(model, x, y, tmp_path / "run", epochs=1)
    assert run.meta["tasks"] == ["alpha", "zeta"]
    for task in ("zeta", "alpha"):
        np.testing.assert_allclose(
            run.series(f"loss/{task}").mean(), history.history[f"{task}_loss"][0], rtol=1e-5
        )
    np.testing.assert_allclose(
        run.series("loss/zeta") + run.series("loss/alpha"), run.series("loss"), rtol=1e-5
    )


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_entry_counts_exact_on_finite_and_non_finite_steps(bad):
    """Non-zero counts come from ||sign(g)||^2 on a finite step and entry by entry
    once any gradient holds NaN/inf (sign(NaN) is NaN); both must give the same counts."""
    from clippy_monitor.monitor.statistics import Thresholds, step_statistics
    from clippy_monitor.record.format import LAYER_METRICS

    healthy = np.array([[0.0, 1.5], [-2.0, 0.0], [0.0, 0.0]], np.float32)  # 2 of 6 non-zero
    broken = np.array([bad, 0.0, 3.0, 0.0], np.float32)  # 1 non-finite, 2 zeros
    w = [np.ones_like(healthy), np.ones_like(broken)]

    def counts(grads):
        stats = step_statistics(
            [tf.constant(g) for g in grads],
            [tf.constant(x) for x in w],
            [tf.constant(x * 0.9) for x in w],
            tf.constant(0.1),
            [tf.ones(())] * len(grads),
            Thresholds(),
        ).numpy()
        return stats[LAYER_METRICS.index("nonfinite_count")], stats[
            LAYER_METRICS.index("zero_grad_fraction")
        ]

    nonfinite, zeros = counts(
        [healthy, np.nan_to_num(broken, nan=5.0, posinf=5.0)]
    )  # a finite step
    np.testing.assert_array_equal(nonfinite, [0.0, 0.0])
    np.testing.assert_allclose(zeros, [4 / 6, 2 / 4])
    nonfinite, zeros = counts(
        [healthy, broken]
    )  # one non-finite entry: exact counts in every layer
    np.testing.assert_array_equal(nonfinite, [0.0, 1.0])
    np.testing.assert_allclose(zeros, [4 / 6, 2 / 4])


class _KillHiddenLayer(keras.callbacks.Callback):
    """After step ``at - 1``, push the shared ReLU layer's bias so far down that every unit dies."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at

    def on_train_batch_end(self, batch, logs=None):
        if batch == self.at - 1:
            self.model.get_layer(f"{self.model.name}_hidden").bias.assign(
                np.full(4, -1e3, np.float32)
            )


def test_a_layer_whose_units_all_die_is_a_full_divergence(tmp_path):
    x, y = _multitask_data(80 * BATCH)
    dead_from = 40
    model = _multitask_model()
    model.compile(
        optimizer=keras.optimizers.SGD(0.01), loss={"click": "binary_crossentropy", "rating": "mse"}
    )
    config = dataclasses.replace(FAST_DETECTOR, dead_layer_steps=15)
    _, _, run = _fit(
        model,
        x,
        y,
        tmp_path / "run",
        flush_every=7,
        detector=config,
        callbacks=[_KillHiddenLayer(dead_from)],
    )

    zero = run.layer("zero_grad_fraction")
    hidden_kernel = run.layers.index(model.get_layer("mt_hidden").kernel.path)
    assert zero[:dead_from, hidden_kernel].max() < 0.99 and np.all(
        zero[dead_from:, hidden_kernel] == 1.0
    )
    full = [e for e in run.events if e["kind"] == "full"]
    assert [(e["reason"], e["step_a"], e["step_b"], e["step_c"]) for e in full] == [
        ("dead_layer", dead_from - 1, dead_from, dead_from + config.dead_layer_steps - 1)
    ]
    # The post-mortem's offline replay of the same record finds the same event.
    replayed = clippy_monitor.detect_divergence(
        run.series("loss"), run.series("grad_norm"), zero_grad_fraction=zero, **config.to_dict()
    )
    assert [(e["reason"], e["step_b"], e["step_c"]) for e in replayed if e["kind"] == "full"] == [
        ("dead_layer", dead_from, dead_from + config.dead_layer_steps - 1)
    ]
    from clippy_monitor.postmortem import build_report

    verdict = build_report(run)["verdict"]
    assert (
        verdict.startswith(f"full divergence: the run turned abnormal at step {dead_from}")
        and "every unit of a layer died" in verdict
    )


def test_a_resumed_run_remembers_which_layers_were_alive(tmp_path):
    """The run restarts (a new monitor on the same record) after the layer died at
    step 40 but before the dead-layer test fires: the layer was alive before the
    restart, so the resumed run still flags it at step 54, as an uninterrupted one does."""
    x, y = _multitask_data(80 * BATCH)
    dead_from, restart = 40, 45
    model = _multitask_model()
    model.compile(
        optimizer=keras.optimizers.SGD(0.01), loss={"click": "binary_crossentropy", "rating": "mse"}
    )
    config = dataclasses.replace(FAST_DETECTOR, dead_layer_steps=15)

    def part(a: int, b: int) -> tuple:
        return x[a * BATCH : b * BATCH], {k: v[a * BATCH : b * BATCH] for k, v in y.items()}

    first = DivergenceMonitor(tmp_path / "run", flush_every=5, detector=config, **NO_XLA)
    model.fit(
        *part(0, restart),
        batch_size=BATCH,
        shuffle=False,
        verbose=0,
        callbacks=[first, _KillHiddenLayer(dead_from)],
    )
    first.close()
    before = load_run(tmp_path / "run")
    assert before.events == [] and len(before.detector_state) == first.recorder.state_size
    hidden = [i for i, name in enumerate(before.layers) if name.startswith("mt_hidden/")]
    np.testing.assert_array_equal(
        before.detector_state[-len(before.layers) :][hidden], [1.0, 1.0]
    )  # saved alive

    _, _, run = _fit(model, *part(restart, 80), tmp_path / "run", flush_every=5, detector=config)
    np.testing.assert_array_equal(run.steps, np.arange(80))
    assert [(e["reason"], e["step_b"], e["step_c"]) for e in run.events if e["kind"] == "full"] == [
        ("dead_layer", dead_from, dead_from + config.dead_layer_steps - 1)
    ]


# --------------------------------------------------------------------------
# 10. A train step whose loss the monitor does not see (issue 13, item 5)
# --------------------------------------------------------------------------
class HandLossModel(keras.Model):
    """A custom train_step that computes its MSE by hand: no compute_loss, no record_loss."""

    def __init__(self, returns: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(4, activation="relu", name="hand_hidden")
        self.out = keras.layers.Dense(1, name="hand_out")
        self.returns = returns

    def call(self, x):
        return self.out(self.hidden(x))

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(self(x, training=True) - y))
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply(grads, self.trainable_variables)
        return {self.returns: loss}


class _BatchLosses(keras.callbacks.Callback):
    def __init__(self, key: str) -> None:
        super().__init__()
        self.key, self.values = key, []

    def on_train_batch_end(self, batch, logs=None):
        self.values.append(float(logs[self.key]))


@pytest.mark.parametrize("returns", ["loss", "mae"])
def test_a_loss_the_monitor_cannot_see_is_never_a_divergence(tmp_path, returns, caplog):
    x, y = _regression_data(40 * BATCH)
    model = HandLossModel(returns)
    model(x[:1])
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    log = _BatchLosses(returns)
    with caplog.at_level("WARNING", logger="clippy_monitor.monitor.callback"):
        _, _, run = _fit(
            model, x, y, tmp_path / "run", flush_every=10, detector=FAST_DETECTOR, callbacks=[log]
        )

    assert run.events == []
    np.testing.assert_array_equal(run.series("detector/status"), 0.0)
    warnings = [r.getMessage() for r in caplog.records if "loss-based detection" in r.getMessage()]
    if returns == "loss":  # the loss the train step returns is recorded and watched
        np.testing.assert_allclose(run.series("loss"), log.values, rtol=1e-6)
        assert warnings == []
    else:  # no loss anywhere: said once, and recorded as not measured (NaN)
        assert np.all(np.isnan(run.series("loss")))
        assert len(warnings) == 1 and "'loss' is not measured" in warnings[0]


def test_without_a_loss_non_finite_gradients_are_still_a_full_divergence(tmp_path):
    x, y = _regression_data(40 * BATCH)
    bad = 25
    x[bad * BATCH + 1, 0] = np.nan
    model = HandLossModel("mae")
    model(x[:1])
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    _, _, run = _fit(model, x, y, tmp_path / "run", flush_every=10, detector=FAST_DETECTOR)

    assert [(e["kind"], e["reason"], e["step_b"]) for e in run.events] == [
        ("full", "non_finite", bad)
    ]


def test_an_unbuilt_model_is_refused_with_one_clear_error(tmp_path):
    x, y = _regression_data(4 * BATCH)
    model = HandLossModel("loss")
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    with pytest.raises(ValueError, match="no trainable variables when training begins"):
        _fit(model, x, y, tmp_path / "run")


def test_a_record_held_by_another_writer_refuses_fit_and_a_later_fit_records(tmp_path):
    """Issue 13, item 1: the loser fails loudly at on_train_begin, naming the logdir;
    once the record is free, the same monitor records the next fit."""
    import fcntl

    from clippy_monitor.record import RecordLocked
    from clippy_monitor.record.format import WRITER_FILE

    x, y = _regression_data(4 * BATCH)
    model = _single_model()
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    logdir = tmp_path / "run"
    logdir.mkdir()
    monitor = DivergenceMonitor(logdir, flush_every=2, **NO_XLA)
    with open(logdir / WRITER_FILE, "a+b") as other:  # another writer's lock (its own open file)
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RecordLocked, match=str(logdir)):
            model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[monitor])
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[monitor])
    np.testing.assert_array_equal(load_run(logdir).steps, np.arange(4))


def test_the_keras_hooks_support_the_keras_range_pyproject_allows():
    """keras_hooks.SUPPORTED_KERAS is the one place that says which Keras the hooks were written for."""
    import re
    import tomllib
    from pathlib import Path

    from clippy_monitor.monitor import keras_hooks

    config = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    (pin,) = [d for d in config["project"]["dependencies"] if d.startswith("keras")]
    low, high = (
        tuple(int(x) for x in v.split("."))
        for v in re.fullmatch(r"keras>=([\d.]+),<([\d.]+)", pin).groups()
    )
    assert keras_hooks.SUPPORTED_KERAS == (low, high + (0,) * (2 - len(high)))
    assert keras_hooks.keras_supported(keras.__version__)
    assert not keras_hooks.keras_supported("3.7.0") and not keras_hooks.keras_supported("4.0.0")
