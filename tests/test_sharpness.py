"""The sharpness probe against exact Hessians (issue 16).

Every expected value is built independently of the probe: the closed form
2/N [X 1]^T [X 1] for a linear model with MSE, or the full Hessian from nested
tapes (the Jacobian of the gradient), with NumPy's eigvalsh for its top eigenvalue.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from clippy_monitor import hessian_top_eigenvalue
from clippy_monitor.optimizers import ClippyAdagrad, ClippyAdam, LAMBAdagrad

RTOL = 1e-2  # the bar: within 1% of NumPy's top eigenvalue
N = 32
VOCAB = 20


def relative_error(value: float, expected: float) -> float:
    return abs(value - expected) / abs(expected)


def top_eigenvalue(matrix: np.ndarray) -> float:
    return float(np.linalg.eigvalsh((matrix + matrix.T) / 2)[-1])


def exact_hessian(model: keras.Model, x, y, sample_weight=None) -> np.ndarray:
    """The full Hessian of the compiled loss, in the order of ``trainable_variables``
    flattened (embedding tables whole), from nested tapes, in float64."""
    variables = model.trainable_variables
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            y_pred = model(x, training=False)
            loss = model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight)
        grads = inner.gradient(loss, variables)
        flat = tf.concat([tf.reshape(tf.convert_to_tensor(g), [-1]) for g in grads], 0)
    jacobians = outer.jacobian(flat, variables)
    size = int(flat.shape[0])
    return np.concatenate(
        [np.reshape(tf.convert_to_tensor(j).numpy(), (size, -1)) for j in jacobians], axis=1
    ).astype(np.float64)


def flat_gradient(model: keras.Model, x, y) -> np.ndarray:
    """The batch gradient of the compiled loss, flattened like ``exact_hessian``."""
    with tf.GradientTape() as tape:
        loss = model.compute_loss(x=x, y=y, y_pred=model(x, training=False))
    grads = tape.gradient(loss, model.trainable_variables)
    return np.concatenate([tf.reshape(tf.convert_to_tensor(g), [-1]).numpy() for g in grads])


def linear_data(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, 4)).astype("float32") * np.array([1.0, 2.0, 0.5, 1.5], "float32")
    return x, rng.normal(size=(N, 1)).astype("float32"), rng.random(N).astype("float32")


def linear_model(optimizer=None, loss="mse") -> keras.Model:
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer=optimizer or keras.optimizers.SGD(0.01), loss=loss)
    return model


def multitask_data(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, 6)).astype("float32")
    ids = rng.integers(0, VOCAB, size=(N, 2)).astype("int32")
    y = {
        "click": (rng.random((N, 1)) < 0.4).astype("float32"),
        "rating": rng.normal(size=(N, 1)).astype("float32"),
    }
    return x, ids, y


def multitask_model(optimizer=None, embedding: bool = False) -> keras.Model:
    """Two tanh layers, two heads (BCE + 0.5 MSE); 206 parameters, 338 with a 20 x 3 table."""
    features = keras.Input((6,), name="features")
    inputs, h = features, features
    if embedding:
        ids = keras.Input((2,), dtype="int32", name="ids")
        table = keras.layers.Flatten()(keras.layers.Embedding(VOCAB, 3, name="table")(ids))
        inputs, h = [features, ids], keras.layers.Concatenate()([features, table])
    h = keras.layers.Dense(12, activation="tanh")(h)
    h = keras.layers.Dense(8, activation="tanh")(h)
    outputs = {
        "click": keras.layers.Dense(1, activation="sigmoid", name="click")(h),
        "rating": keras.layers.Dense(1, name="rating")(h),
    }
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=optimizer or keras.optimizers.SGD(0.01),
        loss={"click": "binary_crossentropy", "rating": "mse"},
        loss_weights={"click": 1.0, "rating": 0.5},
    )
    return model


@pytest.mark.parametrize("weighted", [False, True])
def test_linear_mse_matches_the_closed_form(weighted):
    x, y, weights = linear_data()
    model = linear_model()
    w = weights if weighted else np.ones(N, "float32")
    design = np.hstack([x, np.ones((N, 1), "float32")]).astype(np.float64)
    expected = top_eigenvalue(2 / N * design.T @ (w[:, None] * design))

    estimate = hessian_top_eigenvalue(model, x, y, weights if weighted else None)

    assert relative_error(estimate.value, expected) < RTOL
    assert estimate.converged and estimate.iterations <= 5  # 5 parameters
    assert not estimate.preconditioned


def test_multitask_mlp_matches_the_nested_tape_hessian():
    x, _, y = multitask_data()
    model = multitask_model()
    model.fit(x, y, batch_size=N, epochs=3, verbose=0)  # away from the initialisation
    hessian = exact_hessian(model, x, y)
    assert hessian.shape == (206, 206)
    spectrum = np.linalg.eigvalsh((hessian + hessian.T) / 2)
    assert spectrum[0] < 0  # indefinite: the top eigenvalue is not just the largest |.|

    estimate = hessian_top_eigenvalue(model, x, y)

    assert relative_error(estimate.value, spectrum[-1]) < RTOL
    assert estimate.converged and estimate.residual < 1e-3


def test_the_top_eigenvalue_is_the_largest_not_the_largest_in_magnitude():
    # loss = -MSE: H = -2/N A^T A, all negative; the top one is the closest to zero.
    x, y, _ = linear_data()
    model = linear_model(loss=lambda y_true, y_pred: -keras.ops.mean((y_true - y_pred) ** 2))
    design = np.hstack([x, np.ones((N, 1), "float32")]).astype(np.float64)
    spectrum = np.linalg.eigvalsh(-2 / N * design.T @ design)

    estimate = hessian_top_eigenvalue(model, x, y)

    assert relative_error(estimate.value, spectrum[-1]) < RTOL
    assert abs(spectrum[0]) > 4 * abs(spectrum[-1])  # power iteration would find spectrum[0]


def test_embedding_rows_give_the_full_table_hessian_top_eigenvalue():
    x, ids, y = multitask_data()
    model = multitask_model(embedding=True)
    hessian = exact_hessian(model, [x, ids], y)  # the whole 20 x 3 table
    assert hessian.shape == (338, 338)

    estimate = hessian_top_eigenvalue(model, [x, ids], y)

    assert relative_error(estimate.value, top_eigenvalue(hessian)) < RTOL


def preconditioned_expectation(model, inputs, y, optimizer, steps: int = 3) -> float:
    """Train ``steps`` full-batch fit steps, tracking the Adagrad accumulator
    ``G = G0 + sum g^2`` from our own gradients; then top eig of P^1/2 H P^1/2."""
    size = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    accumulator = np.full(size, optimizer.initial_accumulator_value, np.float64)
    for _ in range(steps):
        accumulator += flat_gradient(model, inputs, y).astype(np.float64) ** 2
        model.fit(inputs, y, batch_size=N, epochs=1, shuffle=False, verbose=0)
    assert accumulator.max() > 0.2  # non-trivial accumulators
    root = np.sqrt(optimizer.learning_rate.numpy() / np.sqrt(accumulator + optimizer.epsilon))
    return top_eigenvalue(root[:, None] * exact_hessian(model, inputs, y) * root[None, :])


def test_preconditioned_adagrad_after_fit_steps():
    x, _, y = multitask_data()
    optimizer = keras.optimizers.Adagrad(0.05, initial_accumulator_value=0.1)
    model = multitask_model(optimizer)
    expected = preconditioned_expectation(model, x, y, optimizer)

    estimate = hessian_top_eigenvalue(model, x, y, preconditioned=True)

    assert estimate.preconditioned
    assert relative_error(estimate.value, expected) < RTOL


def test_preconditioned_clippy_adagrad_with_an_embedding_after_fit_steps():
    # ClippyAdagrad sums repeated rows before squaring (keras' Adagrad does not), so
    # its accumulator is G0 + sum g^2 for the table too.
    x, ids, y = multitask_data()
    optimizer = ClippyAdagrad(0.05, initial_accumulator_value=0.1)
    model = multitask_model(optimizer, embedding=True)
    expected = preconditioned_expectation(model, [x, ids], y, optimizer)

    estimate = hessian_top_eigenvalue(model, [x, ids], y, preconditioned=True)

    assert relative_error(estimate.value, expected) < RTOL


def test_preconditioned_before_the_first_step_uses_the_initial_accumulator():
    x, y, _ = linear_data()
    model = linear_model(ClippyAdagrad(0.05, initial_accumulator_value=0.5))
    design = np.hstack([x, np.ones((N, 1), "float32")]).astype(np.float64)
    expected = 0.05 / np.sqrt(0.5 + 1e-7) * top_eigenvalue(2 / N * design.T @ design)

    before = hessian_top_eigenvalue(model, x, y, preconditioned=True)
    model.fit(x, y, batch_size=N, epochs=1, verbose=0)  # builds the accumulators
    after = hessian_top_eigenvalue(model, x, y, preconditioned=True)

    assert relative_error(before.value, expected) < RTOL
    assert after.value < before.value  # G grew, so P shrank (the probe re-reads it)


@pytest.mark.parametrize(
    ("momentum", "nesterov", "factor"),
    [(0.0, False, 1.0), (0.9, False, 1 / 1.9), (0.9, True, 2.8 / 1.9)],
    ids=["plain", "heavy-ball", "nesterov"],
)
@pytest.mark.parametrize("target", [1.9, 2.1])
def test_preconditioned_sgd_is_the_stability_threshold(momentum, nesterov, factor, target):
    """P = eta (times the momentum factor): SGD on the quadratic is stable iff below 2."""
    x, y, _ = linear_data()
    design = np.hstack([x, np.ones((N, 1), "float32")]).astype(np.float64)
    sharpness = top_eigenvalue(2 / N * design.T @ design)
    learning_rate = target / (factor * sharpness)
    model = linear_model(keras.optimizers.SGD(learning_rate, momentum=momentum, nesterov=nesterov))

    estimate = hessian_top_eigenvalue(model, x, y, preconditioned=True)
    assert relative_error(estimate.value, target) < RTOL

    before = model.evaluate(x, y, verbose=0)
    data = tf.data.Dataset.from_tensors((x, y)).repeat()
    model.fit(data, steps_per_epoch=300, shuffle=False, verbose=0)
    after = model.evaluate(x, y, verbose=0)
    if target < 2:
        assert after < before
    else:
        assert not np.isfinite(after) or after > 1e3 * before


@pytest.mark.parametrize("make", [keras.optimizers.Adam, ClippyAdam, LAMBAdagrad])
def test_preconditioned_refuses_optimizers_without_a_fixed_step(make):
    x, y, _ = linear_data()
    model = linear_model(make())
    with pytest.raises(ValueError, match=type(make()).__name__):
        hessian_top_eigenvalue(model, x, y, preconditioned=True)
    # The plain sharpness does not need the optimizer.
    assert hessian_top_eigenvalue(model, x, y).value > 0


class RecordingLinear(keras.Model):
    """A linear model that notes, on every call, whether it ran eagerly."""

    def __init__(self) -> None:
        super().__init__()
        self.dense = keras.layers.Dense(1)
        self.eager_calls: list[bool] = []

    def call(self, inputs):
        self.eager_calls.append(tf.executing_eagerly())
        return self.dense(inputs)


def test_runs_as_one_compiled_graph_traced_once():
    x, y, _ = linear_data()
    model = RecordingLinear()
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    model(x[:1])
    model.eager_calls.clear()

    first = hessian_top_eigenvalue(model, x, y)
    traced = list(model.eager_calls)
    other_x, other_y, _ = linear_data(seed=1)
    second = hessian_top_eigenvalue(model, other_x, other_y)

    assert traced and not any(traced)  # the model ran only while tracing a tf.function
    assert model.eager_calls == traced  # same shapes: no second trace
    design = np.hstack([other_x, np.ones((N, 1), "float32")]).astype(np.float64)
    assert relative_error(second.value, top_eigenvalue(2 / N * design.T @ design)) < RTOL
    assert abs(second.value - first.value) > 1e-3 * first.value  # it used the new batch


def test_mirrored_strategy_matches_a_single_device(mirrored_strategy):
    x, ids, y = multitask_data()
    with mirrored_strategy.scope():
        mirrored = multitask_model(ClippyAdagrad(0.05), embedding=True)
    mirrored.fit([x, ids], y, batch_size=N, epochs=2, verbose=0)
    single = multitask_model(ClippyAdagrad(0.05), embedding=True)
    single.set_weights(mirrored.get_weights())
    single.optimizer.build(single.trainable_variables)
    for mine, theirs in zip(single.optimizer.variables, mirrored.optimizer.variables):
        mine.assign(theirs.numpy())

    for batch in (N, N - 1):  # even, and uneven across the two replicas
        inputs, targets = [x[:batch], ids[:batch]], {k: v[:batch] for k, v in y.items()}
        for preconditioned in (False, True):
            expected = hessian_top_eigenvalue(
                single, inputs, targets, preconditioned=preconditioned
            )
            got = hessian_top_eigenvalue(mirrored, inputs, targets, preconditioned=preconditioned)
            assert relative_error(got.value, expected.value) < RTOL
    hessian = exact_hessian(single, [x, ids], y)
    assert (
        relative_error(hessian_top_eigenvalue(mirrored, [x, ids], y).value, top_eigenvalue(hessian))
        < RTOL
    )
