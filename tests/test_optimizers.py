"""The bundled optimizers: hand-computed steps, state, sparse rows, saving, jit,
mixed precision and tf.distribute."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from clippy_monitor import AGCAdagrad, ClippyAdagrad, ClippyAdam, GCAdagrad, LAMBAdagrad

EPS = 1e-7  # the optimizers' default epsilon
W0 = [1.0, -2.0, 0.0]


def _variable(value, name: str = "w") -> keras.Variable:
    return keras.Variable(np.asarray(value, np.float32), name=name)


def _apply(opt, variable: keras.Variable, grad) -> None:
    opt.apply_gradients([(tf.constant(np.asarray(grad, np.float32)), variable)])


def _factor(opt) -> float:
    return float(opt.clipping_factors[0].numpy())


# ==========================================================================
# ClippyAdagrad, hand-computed
# ==========================================================================
def test_clippy_adagrad_unclipped_step() -> None:
    opt = ClippyAdagrad(
        learning_rate=0.01
    )  # paper defaults: lambda_rel 0.5, lambda_abs 1e-2, G first
    v = _variable(W0)
    _apply(opt, v, [0.3, -0.4, 0.0])

    w = np.array(W0)
    g = np.array([0.3, -0.4, 0.0])
    G = 0.1 + g**2  # [0.19, 0.26, 0.10]: accumulator updated before the step
    r = g / np.sqrt(G + EPS)  # [0.688247, -0.784465, 0]
    delta = 0.01 * r  # [0.00688, -0.00784, 0]
    # thresholds 0.5|w| + 0.01 = [0.51, 1.01, 0.01] are all above |delta| -> sigma = 1
    np.testing.assert_allclose(v.numpy(), w - delta, rtol=1e-6)
    np.testing.assert_allclose(opt._accumulators[0].numpy(), [0.19, 0.26, 0.10], rtol=1e-6)
    assert _factor(opt) == 1.0
    assert opt.clipping_factors_by_path() == {"w": 1.0}
    assert int(opt.iterations.numpy()) == 1


def test_clippy_adagrad_clipped_step() -> None:
    opt = ClippyAdagrad(learning_rate=1.0)
    v = _variable(W0)
    _apply(opt, v, [0.3, -0.4, 0.2])

    w = np.array(W0)
    g = np.array([0.3, -0.4, 0.2])
    G = 0.1 + g**2  # [0.19, 0.26, 0.14]
    r = g / np.sqrt(G + EPS)  # [0.688247, -0.784465, 0.534522]
    threshold = 0.5 * np.abs(w) + 0.01  # [0.51, 1.01, 0.01]
    # per-coordinate scales threshold/|r| = [0.741, 1.2875, 0.018708]; the w=0 coordinate binds
    sigma = 0.01 / (0.2 / math.sqrt(0.14 + EPS))
    assert sigma == pytest.approx(0.0187083, rel=1e-5)
    assert sigma == pytest.approx(np.min(threshold / np.abs(r)))
    expected = w - sigma * r  # [0.987124, -1.985324, -0.01]
    np.testing.assert_allclose(v.numpy(), expected, rtol=1e-6, atol=1e-7)
    assert v.numpy()[2] == pytest.approx(
        -0.01, rel=1e-6
    )  # the binding coordinate moves by lambda_abs
    np.testing.assert_allclose(
        opt._accumulators[0].numpy(), [0.19, 0.26, 0.14], rtol=1e-6
    )  # unclipped g^2
    assert _factor(opt) == pytest.approx(sigma, rel=1e-6)
    assert opt.clipping_factors_by_path()["w"] == pytest.approx(sigma, rel=1e-6)


def test_clippy_adagrad_accumulator_relative_threshold() -> None:
    opt = ClippyAdagrad(learning_rate=1.0, accumulator_relative_threshold=0.01)
    v = _variable(W0)
    _apply(opt, v, [0.3, -0.4, 0.2])
    w = np.array(W0)
    g = np.array([0.3, -0.4, 0.2])
    p = 1.0 / np.sqrt(0.1 + g**2 + EPS)  # [2.294157, 1.961161, 2.672612]
    threshold = 0.5 * np.abs(w) + 0.01 * p + 0.01  # [0.532942, 1.029612, 0.036726]
    sigma = np.min(threshold / np.abs(g * p))  # 0.036726 / 0.534522 = 0.0687083
    assert sigma == pytest.approx(0.0687083, rel=1e-5)
    np.testing.assert_allclose(v.numpy(), w - sigma * g * p, rtol=1e-6, atol=1e-7)
    assert _factor(opt) == pytest.approx(sigma, rel=1e-6)


@pytest.mark.parametrize("clip_accumulator_update", [False, True])
def test_clippy_adagrad_delayed_accumulator(clip_accumulator_update: bool) -> None:
    opt = ClippyAdagrad(
        learning_rate=1.0,
        use_standard_accumulator_update=False,
        clip_accumulator_update=clip_accumulator_update,
    )
    v = _variable(W0)
    w = np.array(W0)

    # Step 1 uses G_0 = 0.1: p = 1/sqrt(0.1) = 3.162278
    g1 = np.array([0.3, -0.4, 0.2])
    r1 = g1 / math.sqrt(0.1 + EPS)  # [0.948683, -1.264911, 0.632456]
    # scales [0.51/0.9487, 1.01/1.2649, 0.01/0.6325] = [0.5376, 0.7985, 0.015811]
    s1 = 0.01 / (0.2 / math.sqrt(0.1 + EPS))
    assert s1 == pytest.approx(0.0158114, rel=1e-5)
    w1 = w - s1 * r1
    # accumulator after the step: G_0 + g^2, or G_0 + (sigma g)^2 if the update is clipped
    G1 = 0.1 + (s1 * g1) ** 2 if clip_accumulator_update else 0.1 + g1**2
    _apply(opt, v, g1)
    np.testing.assert_allclose(v.numpy(), w1, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(opt._accumulators[0].numpy(), G1, rtol=1e-6)
    assert _factor(opt) == pytest.approx(s1, rel=1e-6)
    if clip_accumulator_update:
        np.testing.assert_allclose(G1, [0.1000225, 0.10004, 0.10001], rtol=1e-6)
    else:
        np.testing.assert_allclose(G1, [0.19, 0.26, 0.14], rtol=1e-12)

    # Step 2 uses G_1 from step 1.
    g2 = np.array([0.01, 0.02, -0.01])
    r2 = g2 / np.sqrt(G1 + EPS)
    s2 = min(1.0, np.min((0.5 * np.abs(w1) + 0.01) / np.abs(r2)))
    w2 = w1 - s2 * r2
    G2 = G1 + (s2 * g2) ** 2 if clip_accumulator_update else G1 + g2**2
    _apply(opt, v, g2)
    np.testing.assert_allclose(v.numpy(), w2, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(opt._accumulators[0].numpy(), G2, rtol=1e-6)
    assert _factor(opt) == pytest.approx(s2, rel=1e-5)


@pytest.mark.parametrize("accumulator_relative_threshold", [0.0, 0.05])
def test_clippy_adagrad_step_obeys_bound(accumulator_relative_threshold: float) -> None:
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(6, 5)).astype(np.float32)
    w0[0, :] = 0.0  # zero weights bind via lambda_abs
    g = (10 * rng.normal(size=(6, 5))).astype(np.float32)
    opt = ClippyAdagrad(
        learning_rate=2.0, accumulator_relative_threshold=accumulator_relative_threshold
    )
    v = _variable(w0)
    _apply(opt, v, g)
    step = np.abs(w0.astype(np.float64) - v.numpy())
    p = 1.0 / np.sqrt(0.1 + g.astype(np.float64) ** 2 + EPS)
    bound = 0.5 * np.abs(w0) + accumulator_relative_threshold * p + 0.01
    assert _factor(opt) < 0.1  # clipped hard
    assert np.all(step <= bound * (1 + 1e-5) + 1e-7)
    assert np.max(step / bound) == pytest.approx(1.0, rel=1e-5)  # some coordinate is on the bound
    # the applied step is sigma * the Adagrad step, in every coordinate
    np.testing.assert_allclose(step, _factor(opt) * 2.0 * np.abs(g) * p, rtol=1e-5, atol=5e-7)


# ==========================================================================
# Baselines: one hand-checked step each; the accumulator gets unclipped g^2
# ==========================================================================
def test_gc_adagrad_step() -> None:
    opt = GCAdagrad(learning_rate=1.0, clipnorm=0.1)
    v = _variable(W0)
    g = np.array([0.3, -0.4, 0.0])
    _apply(opt, v, g)
    sigma = 0.1 / 0.5  # ||g||_2 = 0.5
    G = 0.1 + g**2  # unclipped (eq. 5); clipped would be 0.1 + 0.04 g^2
    np.testing.assert_allclose(v.numpy(), np.array(W0) - sigma * g / np.sqrt(G + EPS), rtol=1e-6)
    np.testing.assert_allclose(opt._accumulators[0].numpy(), [0.19, 0.26, 0.1], rtol=1e-6)
    assert _factor(opt) == pytest.approx(0.2, rel=1e-6)


def test_agc_adagrad_whole_tensor_step() -> None:
    opt = AGCAdagrad(learning_rate=1.0, clipping=0.1)
    v = _variable(W0)
    g = np.array([0.3, -0.4, 0.0])
    _apply(opt, v, g)
    sigma = 0.1 * math.sqrt(5.0) / 0.5  # ||w|| = sqrt(5), ||g|| = 0.5 -> 0.4472136
    G = 0.1 + g**2
    np.testing.assert_allclose(v.numpy(), np.array(W0) - sigma * g / np.sqrt(G + EPS), rtol=1e-6)
    np.testing.assert_allclose(opt._accumulators[0].numpy(), [0.19, 0.26, 0.1], rtol=1e-6)
    assert _factor(opt) == pytest.approx(0.4472136, rel=1e-6)


def test_agc_adagrad_unitwise_step() -> None:
    opt = AGCAdagrad(learning_rate=1.0, clipping=0.1, unitwise=True)
    w = np.array([[1.0, 0.0], [-2.0, 0.0]])  # Dense kernel [in=2, out=2]; column 1 all zero
    g = np.array([[0.3, 0.1], [-0.4, 0.0]])
    v = _variable(w, "kernel")
    _apply(opt, v, g)
    # column norms: w [sqrt(5), 0 -> floored 1e-3], g [0.5, 0.1]
    sigma = np.array([[0.1 * math.sqrt(5.0) / 0.5, 0.1 * 1e-3 / 0.1]])  # [[0.4472, 1e-3]]
    G = 0.1 + g**2
    np.testing.assert_allclose(v.numpy(), w - sigma * g / np.sqrt(G + EPS), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(opt._accumulators[0].numpy(), G, rtol=1e-6)
    assert _factor(opt) == pytest.approx(
        1e-3, rel=1e-5
    )  # the exported factor is the smallest unit's


def test_lamb_adagrad_step() -> None:
    opt = LAMBAdagrad(learning_rate=0.1)
    v = _variable(W0)
    g = np.array([0.3, -0.4, 0.0])
    _apply(opt, v, g)
    G = 0.1 + g**2
    r = g / np.sqrt(G + EPS)
    # ||r||^2 = 0.09/0.19 + 0.16/0.26 = 1.089068; trust ratio sqrt(5)/1.043584 = 2.142681
    sigma = math.sqrt(5.0) / np.linalg.norm(r)
    assert sigma == pytest.approx(2.142681, rel=1e-5)
    np.testing.assert_allclose(v.numpy(), np.array(W0) - 0.1 * sigma * r, rtol=1e-6)
    np.testing.assert_allclose(opt._accumulators[0].numpy(), [0.19, 0.26, 0.1], rtol=1e-6)
    assert _factor(opt) == pytest.approx(sigma, rel=1e-6)


# ==========================================================================
# Baselines in the eq. 2 form: the clipped gradient feeds the accumulator
# ==========================================================================
def _adagrad_steps(w, grads, factor, clip_before_accumulator: bool, lr: float = 1.0):
    """NumPy reference of GC/AGC Adagrad: eq. 5 (G += g^2, step eta sigma g G^-1/2)
    or eq. 2 (g' = sigma g, G += g'^2, step eta g' G^-1/2); weights, accumulators, factors."""
    w, G = np.asarray(w, np.float64), np.full(np.shape(w), 0.1)
    ws, Gs, sigmas = [], [], []
    for g in grads:
        g = np.asarray(g, np.float64)
        sigma = factor(g, w)
        fed = sigma * g if clip_before_accumulator else g
        G = G + fed**2
        w = w - lr * sigma * g / np.sqrt(G + EPS)
        ws, Gs, sigmas = ws + [w], Gs + [G], sigmas + [sigma]
    return ws, Gs, sigmas


_GC_STEPS = [[0.3, -0.4, 0.0], [0.0, 0.05, 0.0], [1.2, 0.0, 0.5]]


@pytest.mark.parametrize("clip_before_accumulator", [False, True], ids=["eq5", "eq2"])
def test_gc_adagrad_eq2_vs_eq5_three_steps(clip_before_accumulator: bool) -> None:
    opt = GCAdagrad(
        learning_rate=1.0, clipnorm=0.1, clip_before_accumulator=clip_before_accumulator
    )
    v = _variable(W0)
    # sigma = min(1, 0.1 / ||g||): ||g|| = 0.5, 0.05, 1.3 -> 0.2, 1 (unclipped), 1/13
    sigmas = [0.2, 1.0, 0.1 / 1.3]
    if clip_before_accumulator:  # eq. 2: G += (sigma g)^2
        accumulators = [
            [0.1036, 0.1064, 0.1],
            [0.1036, 0.1089, 0.1],
            [0.1121207, 0.1089, 0.1014793],
        ]
    else:  # eq. 5: G += g^2
        accumulators = [[0.19, 0.26, 0.1], [0.19, 0.2625, 0.1], [1.63, 0.2625, 0.35]]
    ws, Gs, _ = _adagrad_steps(
        W0, _GC_STEPS, lambda g, w: min(1.0, 0.1 / np.linalg.norm(g)), clip_before_accumulator
    )
    for step, g in enumerate(_GC_STEPS):
        _apply(opt, v, g)
        np.testing.assert_allclose(opt._accumulators[0].numpy(), accumulators[step], rtol=1e-6)
        np.testing.assert_allclose(Gs[step], accumulators[step], rtol=1e-6)
        np.testing.assert_allclose(v.numpy(), ws[step], rtol=1e-5, atol=1e-7)
        assert _factor(opt) == pytest.approx(sigmas[step], rel=1e-6)


def test_gc_adagrad_eq2_takes_longer_steps_after_clipping() -> None:
    # The same three gradients: eq. 2's smaller accumulator lets the later steps move further.
    moved = {}
    for eq2 in (False, True):
        v = _variable(W0)
        opt = GCAdagrad(learning_rate=1.0, clipnorm=0.1, clip_before_accumulator=eq2)
        for g in _GC_STEPS:
            _apply(opt, v, g)
        moved[eq2] = np.abs(v.numpy() - np.array(W0))
    # coordinate 2 is touched only at step 3: 0.5/13 / sqrt(0.1 + g'^2) vs / sqrt(0.1 + g^2)
    assert moved[True][2] == pytest.approx(0.5 / 13 / math.sqrt(0.1014793 + EPS), rel=1e-5)
    assert moved[False][2] == pytest.approx(0.5 / 13 / math.sqrt(0.35 + EPS), rel=1e-5)
    assert np.all(moved[True] >= moved[False])


@pytest.mark.parametrize("unitwise", [False, True], ids=["whole-tensor", "unitwise"])
def test_agc_adagrad_eq2_matches_numpy(unitwise: bool) -> None:
    w0 = np.array([[1.0, 0.5], [-2.0, 0.25]])
    grads = [[[0.3, 0.1], [-0.4, 0.2]], [[0.05, -0.3], [0.1, 0.0]], [[-0.6, 0.2], [0.0, 0.1]]]

    def factor(g, w):  # eq. 3 with NFNets' floor; per column (output unit) if unitwise
        axis = 0 if unitwise else None
        norm = lambda x: np.sqrt(np.sum(x**2, axis=axis, keepdims=unitwise))  # noqa: E731
        return np.minimum(1.0, 0.1 * np.maximum(norm(w), 1e-3) / norm(g))

    opt = AGCAdagrad(
        learning_rate=1.0, clipping=0.1, unitwise=unitwise, clip_before_accumulator=True
    )
    v = _variable(w0, "kernel")
    ws, Gs, sigmas = _adagrad_steps(w0, grads, factor, clip_before_accumulator=True)
    for step, g in enumerate(grads):
        _apply(opt, v, g)
        np.testing.assert_allclose(opt._accumulators[0].numpy(), Gs[step], rtol=1e-6)
        np.testing.assert_allclose(v.numpy(), ws[step], rtol=1e-5, atol=1e-7)
        assert _factor(opt) == pytest.approx(np.min(sigmas[step]), rel=1e-5)
    # the clipped gradients went into the accumulator: G - 0.1 = sum_t (sigma_t g_t)^2
    fed = sum((s * np.asarray(g)) ** 2 for s, g in zip(sigmas, grads))
    np.testing.assert_allclose(opt._accumulators[0].numpy() - 0.1, fed, rtol=1e-5, atol=1e-8)
    assert np.min(sigmas[0]) < 0.5  # the first step was clipped


def test_eq2_excluded_variable_is_plain_adagrad() -> None:
    opt = GCAdagrad(
        learning_rate=1.0, clipnorm=0.1, clip_before_accumulator=True, exclude_from_clipping=["w"]
    )
    v = _variable(W0)
    g = np.array([0.3, -0.4, 0.0])
    _apply(opt, v, g)
    np.testing.assert_allclose(opt._accumulators[0].numpy(), [0.19, 0.26, 0.1], rtol=1e-6)
    np.testing.assert_allclose(v.numpy(), np.array(W0) - g / np.sqrt(0.1 + g**2 + EPS), rtol=1e-6)
    assert _factor(opt) == 1.0


@pytest.mark.parametrize(
    "make",
    [
        lambda: LAMBAdagrad(clip_before_accumulator=True),
        lambda: ClippyAdagrad(clip_before_accumulator=True),
        lambda: LAMBAdagrad.from_config(
            {**LAMBAdagrad().get_config(), "clip_before_accumulator": True}
        ),
    ],
    ids=["lamb", "clippy", "lamb-from-config"],
)
def test_clip_before_accumulator_rejected_for_update_based_rules(make) -> None:
    with pytest.raises(
        ValueError, match=r"clip_before_accumulator=True \(paper eq. 2\) needs a factor"
    ):
        make()


# ==========================================================================
# ClippyAdam
# ==========================================================================
def test_clippy_adam_two_steps_match_numpy() -> None:
    opt = ClippyAdam(learning_rate=0.1)
    v = _variable(W0)
    w = np.array(W0)
    m = np.zeros(3)
    s = np.zeros(3)
    b1, b2 = 0.9, 0.999
    sigmas = []
    for t, g in enumerate([np.array([0.3, -0.4, 0.2]), np.array([-0.1, 0.5, 0.3])], start=1):
        m = b1 * m + (1 - b1) * g
        s = b2 * s + (1 - b2) * g**2
        m_hat = m / (1 - b1**t)
        s_hat = s / (1 - b2**t)
        delta = 0.1 * m_hat / (np.sqrt(s_hat) + EPS)  # step 1: ~0.1 * sign(g)
        sigma = min(1.0, np.min((0.5 * np.abs(w) + 0.01) / np.abs(delta)))
        w = w - sigma * delta
        sigmas.append(sigma)
        _apply(opt, v, g)
        np.testing.assert_allclose(v.numpy(), w, rtol=1e-5, atol=1e-7)
        # float32 bias correction 1 - 0.999^t loses ~1e-5 relative to cancellation
        assert _factor(opt) == pytest.approx(sigma, rel=1e-4)
    # step 1: the w=0 coordinate binds, 0.01 / 0.1
    assert sigmas[0] == pytest.approx(0.1, rel=1e-5)
    assert sigmas[1] < 1.0
    np.testing.assert_allclose(opt._momentums[0].numpy(), m, rtol=1e-5)  # unclipped moments
    np.testing.assert_allclose(opt._velocities[0].numpy(), s, rtol=1e-5)


# ==========================================================================
# Exclusion, non-finite guard
# ==========================================================================
def _embedding_model() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((3,), dtype="int32"),
            keras.layers.Embedding(
                10, 4, embeddings_initializer=keras.initializers.RandomNormal(stddev=0.05, seed=1)
            ),
            keras.layers.Flatten(),
            keras.layers.Dense(
                1, kernel_initializer=keras.initializers.RandomNormal(stddev=0.5, seed=2)
            ),
        ]
    )


def test_exclude_from_clipping_gives_adagrad_update() -> None:
    x = np.array([[0, 1, 2], [3, 4, 5]], np.int32)  # no repeated id
    y = np.array([[5.0], [-5.0]], np.float32)
    clippy_model = _embedding_model()
    adagrad_model = _embedding_model()
    adagrad_model.set_weights(clippy_model.get_weights())
    opt = ClippyAdagrad(learning_rate=1.0, exclude_from_clipping=["embedding"])
    clippy_model.compile(optimizer=opt, loss="mse")
    adagrad_model.compile(
        optimizer=keras.optimizers.Adagrad(1.0, initial_accumulator_value=0.1, epsilon=EPS),
        loss="mse",
    )
    clippy_model.train_on_batch(x, y)
    adagrad_model.train_on_batch(x, y)

    factors = opt.clipping_factors_by_path()
    emb_path = clippy_model.layers[0].embeddings.path
    kernel_path = clippy_model.layers[2].kernel.path
    assert factors[emb_path] == 1.0
    assert factors[kernel_path] < 0.5
    emb_clippy, kernel_clippy = clippy_model.get_weights()[:2]
    emb_adagrad, kernel_adagrad = adagrad_model.get_weights()[:2]
    np.testing.assert_allclose(emb_clippy, emb_adagrad, rtol=1e-6, atol=1e-7)
    assert np.abs(emb_clippy - clippy_model.layers[0].embeddings.numpy()).max() == 0.0
    assert not np.allclose(kernel_clippy, kernel_adagrad, rtol=1e-3)  # the Dense kernel was clipped


def test_skip_non_finite() -> None:
    opt = ClippyAdagrad(learning_rate=1.0, skip_non_finite=True)
    v = _variable(W0)
    _apply(opt, v, [0.3, -0.4, 0.2])
    state = [x.numpy().copy() for x in opt.variables]
    weights = v.numpy().copy()
    assert int(opt.non_finite_steps.numpy()) == 0

    _apply(opt, v, [0.1, np.nan, 0.0])
    np.testing.assert_array_equal(v.numpy(), weights)
    for before, var in zip(state, opt.variables):
        if var is opt.non_finite_steps:
            continue
        np.testing.assert_array_equal(var.numpy(), before, err_msg=var.path)
    assert int(opt.iterations.numpy()) == 1
    assert int(opt.non_finite_steps.numpy()) == 1

    _apply(opt, v, [0.1, np.inf, 0.0])
    assert int(opt.non_finite_steps.numpy()) == 2

    _apply(opt, v, [0.1, 0.1, 0.1])  # finite steps go on as usual
    assert int(opt.iterations.numpy()) == 2
    assert not np.array_equal(v.numpy(), weights)
    assert int(opt.non_finite_steps.numpy()) == 2


def test_non_finite_propagates_by_default() -> None:
    opt = ClippyAdagrad(learning_rate=1.0)
    assert opt.skip_non_finite is False
    v = _variable(W0)
    _apply(opt, v, [0.1, np.nan, 0.0])
    assert np.isnan(v.numpy()).any()
    assert int(opt.iterations.numpy()) == 1
    assert int(opt.non_finite_steps.numpy()) == 0


# ==========================================================================
# Sparse (tf.IndexedSlices) gradients
# ==========================================================================
_TABLE = np.array([[1.0, 1.0], [0.0, 0.0], [2.0, -2.0], [0.5, 0.5]], np.float32)


def _sparse_and_dense(values, indices, opt_factory):
    values = np.asarray(values, np.float32)
    indices = np.asarray(indices, np.int64)
    sparse_v, dense_v = _variable(_TABLE, "sparse"), _variable(_TABLE, "dense")
    sparse_opt, dense_opt = opt_factory(), opt_factory()
    grad = tf.IndexedSlices(
        tf.constant(values), tf.constant(indices), tf.constant(_TABLE.shape, tf.int64)
    )
    sparse_opt.apply_gradients([(grad, sparse_v)])
    dense_opt.apply_gradients([(tf.convert_to_tensor(grad), dense_v)])
    return sparse_v, sparse_opt, dense_v, dense_opt


@pytest.mark.parametrize(
    "factory",
    [
        lambda: ClippyAdagrad(learning_rate=1.0),
        lambda: ClippyAdagrad(
            learning_rate=1.0, use_standard_accumulator_update=False, clip_accumulator_update=True
        ),
        lambda: GCAdagrad(learning_rate=1.0, clipnorm=0.1),
        lambda: GCAdagrad(learning_rate=1.0, clipnorm=0.1, clip_before_accumulator=True),
    ],
    ids=["clippy", "clippy-delayed-clipped", "gc", "gc-eq2"],
)
def test_sparse_gradient_matches_dense(factory) -> None:
    # rows 2 and 0 touched (unsorted); rows 1 and 3 untouched
    sparse_v, sparse_opt, dense_v, dense_opt = _sparse_and_dense(
        [[0.3, 0.1], [0.2, -0.4]], [2, 0], factory
    )
    np.testing.assert_allclose(sparse_v.numpy(), dense_v.numpy(), rtol=1e-6)
    np.testing.assert_allclose(
        sparse_opt._accumulators[0].numpy(), dense_opt._accumulators[0].numpy(), rtol=1e-6
    )
    assert _factor(sparse_opt) == pytest.approx(_factor(dense_opt), rel=1e-6)
    assert _factor(sparse_opt) < 1.0
    np.testing.assert_array_equal(sparse_v.numpy()[[1, 3]], _TABLE[[1, 3]])
    np.testing.assert_array_equal(
        sparse_opt._accumulators[0].numpy()[[1, 3]], np.full((2, 2), 0.1, np.float32)
    )


def test_sparse_clippy_hand_computed() -> None:
    sparse_v, opt, _, _ = _sparse_and_dense(
        [[0.3, 0.1], [0.2, -0.4]], [2, 0], lambda: ClippyAdagrad(learning_rate=1.0)
    )
    # touched rows: row 2 (w=[2,-2], g=[0.3,0.1]) and row 0 (w=[1,1], g=[0.2,-0.4])
    w = np.array([[2.0, -2.0], [1.0, 1.0]])
    g = np.array([[0.3, 0.1], [0.2, -0.4]])
    r = g / np.sqrt(0.1 + g**2 + EPS)
    sigma = np.min(
        (0.5 * np.abs(w) + 0.01) / np.abs(r)
    )  # row 0, column 1: 0.51 / 0.78446 = 0.650127
    assert sigma == pytest.approx(0.650127, rel=1e-5)
    expected = _TABLE.astype(np.float64).copy()
    expected[[2, 0]] = w - sigma * r
    np.testing.assert_allclose(sparse_v.numpy(), expected, rtol=1e-6)
    # the accumulator is scattered into the touched rows only
    expected_acc = np.full((4, 2), 0.1)
    expected_acc[[2, 0]] += g**2
    np.testing.assert_allclose(opt._accumulators[0].numpy(), expected_acc, rtol=1e-6)
    assert _factor(opt) == pytest.approx(sigma, rel=1e-6)


def test_sparse_agc_uses_touched_rows_norm() -> None:
    # AGC's ||w|| is taken over the touched rows only (not the whole table).
    sparse_v, opt, _, dense_opt = _sparse_and_dense(
        [[0.3, 0.1], [0.2, -0.4]], [2, 0], lambda: AGCAdagrad(learning_rate=1.0, clipping=0.1)
    )
    g = np.array([[0.3, 0.1], [0.2, -0.4]])
    # ||w_touched|| = sqrt(4 + 4 + 1 + 1) = sqrt(10); ||g|| = sqrt(0.09 + 0.01 + 0.04 + 0.16) = sqrt(0.3)
    sigma = (
        0.1 * math.sqrt(10.0) / math.sqrt(0.3)
    )  # 0.577350; the whole table (sqrt(10.5)) gives 0.591608
    assert _factor(opt) == pytest.approx(sigma, rel=1e-6)
    assert _factor(dense_opt) == pytest.approx(0.1 * math.sqrt(10.5) / math.sqrt(0.3), rel=1e-6)
    expected = _TABLE.astype(np.float64).copy()
    expected[[2, 0]] -= sigma * g / np.sqrt(0.1 + g**2 + EPS)
    np.testing.assert_allclose(sparse_v.numpy(), expected, rtol=1e-6)


def test_sparse_agc_eq2_hand_computed() -> None:
    # eq. 2 on the touched rows: sigma from their norms, (sigma g)^2 into their accumulator rows.
    sparse_v, opt, _, _ = _sparse_and_dense(
        [[0.3, 0.1], [0.2, -0.4]],
        [2, 0],
        lambda: AGCAdagrad(learning_rate=1.0, clipping=0.1, clip_before_accumulator=True),
    )
    g = np.array([[0.3, 0.1], [0.2, -0.4]])
    sigma = 0.1 * math.sqrt(10.0) / math.sqrt(0.3)  # touched rows' norms: 0.577350
    assert _factor(opt) == pytest.approx(sigma, rel=1e-6)
    expected_acc = np.full((4, 2), 0.1)
    expected_acc[[2, 0]] += (sigma * g) ** 2  # [[0.13, 0.1033], [0.1133, 0.1533]] in rows 2, 0
    np.testing.assert_allclose(opt._accumulators[0].numpy(), expected_acc, rtol=1e-6)
    np.testing.assert_allclose(expected_acc[2], [0.13, 0.1 + 0.01 / 3], rtol=1e-6)
    expected = _TABLE.astype(np.float64).copy()
    expected[[2, 0]] -= sigma * g / np.sqrt(expected_acc[[2, 0]] + EPS)
    np.testing.assert_allclose(sparse_v.numpy(), expected, rtol=1e-6)


def test_sparse_duplicate_indices_are_summed() -> None:
    # An embedding lookup of one id twice in a batch repeats its index; the step must
    # equal the dense one ((g1 + g2)^2 in the accumulator) and obey the bound.
    sparse_v, sparse_opt, dense_v, dense_opt = _sparse_and_dense(
        [[0.3, 0.1], [0.2, 0.1], [0.1, 0.0]], [0, 0, 2], lambda: ClippyAdagrad(learning_rate=1.0)
    )
    np.testing.assert_allclose(
        sparse_opt._accumulators[0].numpy()[0], 0.1 + np.array([0.5, 0.2]) ** 2, rtol=1e-6
    )
    np.testing.assert_allclose(
        sparse_opt._accumulators[0].numpy(), dense_opt._accumulators[0].numpy(), rtol=1e-6
    )
    np.testing.assert_allclose(sparse_v.numpy(), dense_v.numpy(), rtol=1e-6)
    assert _factor(sparse_opt) == pytest.approx(_factor(dense_opt), rel=1e-6)
    bound = 0.5 * np.abs(_TABLE) + 0.01
    assert np.all(np.abs(_TABLE - sparse_v.numpy()) <= bound * (1 + 1e-6))


def test_embedding_model_updates_only_touched_rows() -> None:
    model = _embedding_model()
    opt = ClippyAdagrad(learning_rate=1.0)
    model.compile(optimizer=opt, loss="mse")
    table0 = model.layers[0].embeddings.numpy().copy()
    x = np.array([[1, 3, 1], [3, 3, 7]], np.int32)  # repeated ids within and across samples
    y = np.array([[3.0], [-3.0]], np.float32)
    with tf.GradientTape() as tape:
        loss = keras.losses.MeanSquaredError()(y, model(x))
    emb_grad = tape.gradient(loss, model.layers[0].embeddings.value)
    assert isinstance(emb_grad, tf.IndexedSlices)
    dense_grad = tf.convert_to_tensor(emb_grad).numpy()  # duplicates summed
    model.train_on_batch(x, y)
    table1 = model.layers[0].embeddings.numpy()
    touched = [1, 3, 7]
    untouched = [i for i in range(10) if i not in touched]
    np.testing.assert_array_equal(table1[untouched], table0[untouched])
    assert np.all(np.abs(table1[touched] - table0[touched]).max(axis=1) > 0)
    acc = opt._accumulators[0].numpy()
    np.testing.assert_array_equal(acc[untouched], np.full((len(untouched), 4), 0.1, np.float32))
    np.testing.assert_allclose(acc, 0.1 + dense_grad.astype(np.float64) ** 2, rtol=1e-6)
    assert np.all(acc[touched] > 0.1)
    # the clipped step obeys the bound on the touched rows
    bound = 0.5 * np.abs(table0) + 0.01
    assert np.all(np.abs(table1 - table0) <= bound * (1 + 1e-6))


# ==========================================================================
# Serialization
# ==========================================================================
_BASE = {
    "exclude_from_clipping": ["embedding", "bias$"],
    "export_clipping_factors": False,
    "skip_non_finite": True,
}
_ADAGRAD = {"initial_accumulator_value": 0.25, "epsilon": 1e-6}
_ARGS = [
    (
        ClippyAdagrad,
        {
            "learning_rate": 0.05,
            "variable_relative_threshold": 0.3,
            "accumulator_relative_threshold": 0.02,
            "absolute_threshold": 1e-3,
            "clip_accumulator_update": True,
            "use_standard_accumulator_update": False,
            "name": "my_clippy",
            **_ADAGRAD,
            **_BASE,
        },
    ),
    (
        ClippyAdam,
        {
            "learning_rate": 0.05,
            "beta_1": 0.8,
            "beta_2": 0.99,
            "epsilon": 1e-6,
            "variable_relative_threshold": 0.3,
            "absolute_threshold": 1e-3,
            "name": "my_adam",
            **_BASE,
        },
    ),
    (
        GCAdagrad,
        {
            "learning_rate": 0.05,
            "clipnorm": 0.01,
            "clip_before_accumulator": True,
            "name": "my_gc",
            **_ADAGRAD,
            **_BASE,
        },
    ),
    (
        AGCAdagrad,
        {
            "learning_rate": 0.05,
            "clipping": 1e-2,
            "eps": 1e-4,
            "unitwise": True,
            "clip_before_accumulator": True,
            "name": "my_agc",
            **_ADAGRAD,
            **_BASE,
        },
    ),
    (LAMBAdagrad, {"learning_rate": 0.05, "name": "my_lamb", **_ADAGRAD, **_BASE}),
]


@pytest.mark.parametrize("cls,kwargs", _ARGS, ids=[c.__name__ for c, _ in _ARGS])
def test_config_round_trip(cls, kwargs) -> None:
    opt = cls(**kwargs)
    config = opt.get_config()
    for key, value in kwargs.items():
        assert key in config, key
        assert (
            config[key] == pytest.approx(value)
            if isinstance(value, float)
            else config[key] == value
        ), key
    clone = cls.from_config(config)
    assert type(clone) is cls
    assert clone.get_config() == config
    for key, value in kwargs.items():
        if key == "clipnorm":
            assert clone.gc_clipnorm == value
            assert clone.clipnorm is None  # not Keras's global gradient clipping
        elif key != "learning_rate":
            assert getattr(clone, key) == value, key
    # keras.optimizers.serialize/deserialize goes through the registered name
    again = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert type(again) is cls and again.get_config() == config


def test_config_round_trip_with_schedule() -> None:
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=10, decay_rate=0.5)
    opt = ClippyAdagrad(learning_rate=schedule)
    clone = ClippyAdagrad.from_config(opt.get_config())
    assert isinstance(clone._learning_rate, keras.optimizers.schedules.ExponentialDecay)
    assert clone.get_config() == opt.get_config()


def _dense_model() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(
                3, activation="tanh", kernel_initializer=keras.initializers.GlorotUniform(seed=3)
            ),
            keras.layers.Dense(1, kernel_initializer=keras.initializers.GlorotUniform(seed=4)),
        ]
    )


def _data(n: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = (x @ np.array([[1.0], [-2.0], [0.5], [3.0]]) + 0.1 * rng.normal(size=(n, 1))).astype(
        np.float32
    )
    return x, y


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda: ClippyAdagrad(
            learning_rate=0.5, accumulator_relative_threshold=0.01, exclude_from_clipping=["bias"]
        ),
        lambda: ClippyAdam(learning_rate=0.1, skip_non_finite=True),
        lambda: AGCAdagrad(learning_rate=0.5, clipping=0.01, unitwise=True),
    ],
    ids=["clippy-adagrad", "clippy-adam", "agc"],
)
def test_model_save_load_restores_optimizer(tmp_path, make_opt) -> None:
    x, y = _data(16)
    model = _dense_model()
    model.compile(optimizer=make_opt(), loss="mse")
    model.train_on_batch(x, y)
    model.train_on_batch(x, y)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)

    opt, opt2 = model.optimizer, loaded.optimizer
    assert type(opt2) is type(opt)
    assert opt2.get_config() == opt.get_config()
    assert int(opt2.iterations.numpy()) == 2
    assert len(opt2.variables) == len(opt.variables)
    for a, b in zip(opt.variables, opt2.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    # (paths differ: the loaded Sequential names its variables without the model prefix)
    assert list(opt2.clipping_factors_by_path().values()) == list(
        opt.clipping_factors_by_path().values()
    )
    assert min(opt.clipping_factors_by_path().values()) < 1.0  # something to restore

    model.train_on_batch(x, y)
    loaded.train_on_batch(x, y)
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert list(opt2.clipping_factors_by_path().values()) == list(
        opt.clipping_factors_by_path().values()
    )


# ==========================================================================
# Constructor validation
# ==========================================================================
def test_clip_accumulator_update_needs_delayed_update() -> None:
    with pytest.raises(ValueError, match="use_standard_accumulator_update"):
        ClippyAdagrad(clip_accumulator_update=True, use_standard_accumulator_update=True)
    with pytest.raises(ValueError, match="use_standard_accumulator_update"):
        ClippyAdagrad(clip_accumulator_update=True)  # the default update is the standard one
    ClippyAdagrad(clip_accumulator_update=True, use_standard_accumulator_update=False)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ClippyAdagrad(variable_relative_threshold=-0.1),
        lambda: ClippyAdagrad(accumulator_relative_threshold=-0.1),
        lambda: ClippyAdagrad(absolute_threshold=-1e-3),
        lambda: ClippyAdagrad(initial_accumulator_value=-0.1),
        lambda: ClippyAdam(variable_relative_threshold=-0.1),
        lambda: ClippyAdam(absolute_threshold=-1e-3),
        lambda: GCAdagrad(clipnorm=-0.1),
        lambda: AGCAdagrad(clipping=-0.1),
    ],
)
def test_negative_thresholds_raise(make) -> None:
    with pytest.raises(ValueError, match="must be >= 0"):
        make()


def test_zero_thresholds_are_allowed() -> None:
    opt = ClippyAdagrad(variable_relative_threshold=0.0, absolute_threshold=0.0)
    assert opt.absolute_threshold == 0.0


# ==========================================================================
# model.fit: jit + steps_per_execution, mixed precision, MirroredStrategy
# ==========================================================================
def _fit(model: keras.Model, x, y, batch_size: int, epochs: int = 3):
    return model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0)


def test_jit_and_steps_per_execution_match_eager_graph() -> None:
    x, y = _data(64)
    runs = []
    for kwargs in [{"jit_compile": False}, {"jit_compile": True, "steps_per_execution": 4}]:
        model = _dense_model()
        opt = ClippyAdagrad(learning_rate=0.3)
        model.compile(optimizer=opt, loss="mse", **kwargs)
        history = _fit(model, x, y, batch_size=8)
        assert model.jit_compile == kwargs["jit_compile"]
        runs.append(
            (
                model.get_weights(),
                history.history["loss"],
                opt.clipping_factors_by_path(),
                opt.iterations.numpy(),
            )
        )
    (w_ref, loss_ref, f_ref, it_ref), (w_jit, loss_jit, f_jit, it_jit) = runs
    assert it_ref == it_jit == 24
    assert loss_jit[-1] < loss_jit[0]
    np.testing.assert_allclose(loss_jit, loss_ref, rtol=1e-5)
    for a, b in zip(w_ref, w_jit):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert len(f_ref) == len(f_jit) == 4
    np.testing.assert_allclose(list(f_jit.values()), list(f_ref.values()), rtol=1e-4)
    assert min(f_jit.values()) < 1.0  # clipping was active


@pytest.fixture
def mixed_float16():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_mixed_float16_with_loss_scale_optimizer(mixed_float16) -> None:
    x, y = _data(64)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.Dense(1, dtype="float32"),
        ]
    )
    model.compile(optimizer=ClippyAdagrad(learning_rate=0.3), loss="mse")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    inner = model.optimizer.inner_optimizer
    assert isinstance(inner, ClippyAdagrad)
    assert model.layers[0].compute_dtype == "float16"
    history = _fit(model, x, y, batch_size=16)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0]
    factors = np.array(list(inner.clipping_factors_by_path().values()))
    assert factors.shape == (4,)
    assert np.all((factors > 0) & (factors <= 1))
    assert int(inner.iterations.numpy()) > 0
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())


def _strategy_model() -> keras.Model:
    ids = keras.Input((2,), dtype="int32")
    dense = keras.Input((4,))
    emb = keras.layers.Flatten()(
        keras.layers.Embedding(
            6, 2, embeddings_initializer=keras.initializers.RandomNormal(stddev=0.1, seed=5)
        )(ids)
    )
    h = keras.layers.Dense(
        3, activation="tanh", kernel_initializer=keras.initializers.GlorotUniform(seed=6)
    )(keras.layers.Concatenate()([emb, dense]))
    out = keras.layers.Dense(1, kernel_initializer=keras.initializers.GlorotUniform(seed=7))(h)
    return keras.Model([ids, dense], out)


def test_mirrored_strategy_matches_single_device(mirrored_strategy) -> None:
    strategy = mirrored_strategy
    x, y = _data(64)
    ids = np.random.default_rng(1).integers(0, 6, size=(64, 2)).astype(np.int32)
    results = []
    for scope in [strategy.scope(), tf.distribute.get_strategy().scope()]:
        with scope:
            model = _strategy_model()
            opt = ClippyAdagrad(learning_rate=0.3)
            model.compile(optimizer=opt, loss="mse")
        history = model.fit([ids, x], y, batch_size=32, epochs=3, shuffle=False, verbose=0)
        results.append(
            (model.get_weights(), history.history["loss"], opt.clipping_factors_by_path())
        )
    (w_mirrored, loss_mirrored, f_mirrored), (w_single, loss_single, f_single) = results
    assert loss_single[-1] < loss_single[0]
    np.testing.assert_allclose(loss_mirrored, loss_single, rtol=1e-5)
    for a, b in zip(w_mirrored, w_single):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(list(f_mirrored.values()), list(f_single.values()), rtol=1e-4)
    assert min(f_single.values()) < 1.0


def test_mirrored_strategy_skip_non_finite(mirrored_strategy) -> None:
    strategy = mirrored_strategy
    x, y = _data(32)
    with strategy.scope():
        model = _dense_model()
        opt = ClippyAdagrad(learning_rate=0.3, skip_non_finite=True)
        model.compile(optimizer=opt, loss="mse")
    model.train_on_batch(x, y)
    weights = model.get_weights()
    state = [v.numpy().copy() for v in opt.variables if v is not opt.non_finite_steps]

    x_bad = x.copy()
    x_bad[20, 1] = np.nan  # lands on the second replica only
    model.train_on_batch(x_bad, y)
    for a, b in zip(model.get_weights(), weights):
        np.testing.assert_array_equal(a, b)
    for before, v in zip(state, [v for v in opt.variables if v is not opt.non_finite_steps]):
        np.testing.assert_array_equal(v.numpy(), before, err_msg=v.path)
    assert int(opt.non_finite_steps.numpy()) == 1
    assert int(opt.iterations.numpy()) == 1

    model.train_on_batch(x, y)
    assert int(opt.iterations.numpy()) == 2
    assert not np.array_equal(model.get_weights()[0], weights[0])
