"""Sharpness: the top eigenvalue of the loss Hessian, by Hessian-vector products.

The paper (Tang et al., KDD 2023, section 3.2) explains loss divergence by a step
size too large for the curvature: on a quadratic, gradient descent is stable only
while ``eta * lambda_max(H) < 2`` (Cohen et al. 2021, "Gradient descent on neural
networks typically occurs at the edge of stability").  With a per-coordinate step
``P`` the condition reads ``lambda_max(P^1/2 H P^1/2) < 2``: the *preconditioned
sharpness*, ``P`` from the optimizer (:func:`step_size`):

* Adagrad, ClippyAdagrad, GCAdagrad, AGCAdagrad: ``P = eta (G + epsilon)^-1/2``, ``G``
  the accumulator as it stands (its initial value before the first step), ``eta``
  the current learning rate.  The clipping factor (<= 1) is left out: ``P`` is the
  unclipped step, an upper bound on the applied one.  Keras Adagrad adds ``g^2`` to
  ``G`` before the step, so the next step's ``P`` is at most this one.
* SGD: ``P = eta``; with momentum ``beta``, ``eta / (1 + beta)`` (heavy ball, stable
  on a quadratic while ``eta lambda < 2 + 2 beta``) or ``eta (1 + 2 beta) / (1 + beta)``
  (Nesterov, ``eta lambda < (2 + 2 beta) / (1 + 2 beta)``), the thresholds of
  Cohen et al. 2021 for momentum.
* anything else (Adam, ClippyAdam, LAMBAdagrad, ...): ``ValueError``; their step is
  not a fixed ``P g`` (moments, trust ratio).

Method: Lanczos on Hessian-vector products (double backprop; the Hessian is never
materialised), in one compiled ``tf.function`` per model and optimizer.  The top
Ritz value approaches the largest (algebraic, not absolute) eigenvalue from below;
negative curvature does not disturb it, as it would power iteration.

The loss is ``model.compute_loss`` (every compiled task loss with its
``loss_weights``, plus ``model.losses``: what ``fit`` minimises) with respect to
``model.trainable_variables``.  The forward pass runs with ``training=False``:
dropout would make every product use a different loss, and batch normalisation in
training mode would move its statistics on every product.  Without such layers
this is fit's loss exactly.

Embedding tables enter through the rows the batch looks up.  That is exact: the
loss does not depend on the other rows, so their rows and columns of ``H`` are zero
(a weight regulariser on a whole table adds curvature there, which is left out).
Under a multi-replica ``tf.distribute`` strategy each replica takes its share of
the batch (at least one example each) and the products are summed, so the value
is the single-device one.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from clippy_monitor.optimizers import AGCAdagrad, ClippyAdagrad, GCAdagrad
from clippy_monitor.sparse import is_sparse

Vector = list[tf.Tensor]  # one block per trainable variable the loss depends on

# Optimizers whose step is eta * (G + eps)^-1/2 * g, times a clipping factor <= 1.
ADAGRAD_FAMILY = (keras.optimizers.Adagrad, ClippyAdagrad, GCAdagrad, AGCAdagrad)


@dataclasses.dataclass(frozen=True)
class SharpnessEstimate:
    """What :func:`hessian_top_eigenvalue` measured.

    ``value``: the top eigenvalue (of ``H``, or of ``P^1/2 H P^1/2`` when
    ``preconditioned``).  ``iterations``: Hessian-vector products used.
    ``residual``: the Lanczos estimate of ``||A y - value y|| / |value|`` for the
    Ritz vector ``y``, which bounds the relative distance from ``value`` to an
    eigenvalue of ``A``.  ``converged``: ``residual <= tol``.
    """

    value: float
    iterations: int
    converged: bool
    residual: float
    preconditioned: bool


def hessian_top_eigenvalue(
    model: keras.Model,
    x: Any,
    y: Any,
    sample_weight: Any = None,
    *,
    preconditioned: bool = False,
    optimizer: keras.optimizers.Optimizer | None = None,
    iterations: int = 20,
    tol: float = 1e-3,
    seed: int = 0,
) -> SharpnessEstimate:
    """Top eigenvalue of the Hessian of ``model``'s compiled loss on one batch.

    ``preconditioned``: of ``P^1/2 H P^1/2`` instead, ``P`` the per-coordinate step
    of ``optimizer`` (default ``model.optimizer``): training on this batch's
    quadratic model is stable while it is below 2 (paper section 3.2; Cohen et al.
    2021).  ``iterations``: most Hessian-vector products; ``tol``: stop once the
    residual bounds the relative error by it.  See the module docstring for the
    loss, the optimizers, embedding tables and distribution.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    if preconditioned:
        optimizer = _unwrap(model.optimizer if optimizer is None else optimizer)
        check_preconditioner(optimizer)
    else:
        optimizer = None
    probe = _compiled_probe(model, optimizer)
    x, y, sample_weight = tf.nest.map_structure(_as_tensor, (x, y, sample_weight))
    value, used, converged, residual = probe(
        x,
        y,
        sample_weight,
        tf.constant(iterations),
        tf.constant(tol, tf.float32),
        tf.constant(seed),
    )
    return SharpnessEstimate(
        value=float(value),
        iterations=int(used),
        converged=bool(converged),
        residual=float(residual),
        preconditioned=preconditioned,
    )


def check_preconditioner(optimizer: Any) -> None:
    """Raise ``ValueError`` unless :func:`step_size` knows ``optimizer``'s step."""
    if optimizer is None:
        raise ValueError("preconditioned=True needs an optimizer (none given, model not compiled)")
    if not isinstance(optimizer, (keras.optimizers.SGD, *ADAGRAD_FAMILY)):
        raise ValueError(
            f"no preconditioned sharpness for {type(optimizer).__name__}: supported are SGD "
            "and Adagrad, ClippyAdagrad, GCAdagrad, AGCAdagrad (LAMBAdagrad's trust ratio "
            "and Adam's moments make the step not a fixed P g); use preconditioned=False"
        )


def step_size(optimizer: keras.optimizers.Optimizer, variable: Any, rows: Any = None) -> Any:
    """``P`` for ``variable``'s coordinates (its ``rows`` if given): a tensor or scalar."""
    eta = tf.cast(tf.convert_to_tensor(optimizer.learning_rate), variable.dtype)
    if isinstance(optimizer, keras.optimizers.SGD):
        beta = float(optimizer.momentum)
        return eta * ((1 + 2 * beta) / (1 + beta) if optimizer.nesterov else 1 / (1 + beta))
    accumulator = _accumulator(optimizer, variable)
    if rows is not None and accumulator.shape.rank:
        accumulator = tf.gather(accumulator, rows)
    return eta * tf.math.rsqrt(accumulator + optimizer.epsilon)


def _accumulator(optimizer: Any, variable: Any) -> tf.Tensor:
    """The Adagrad accumulator of ``variable`` (a scalar before the optimizer is built).

    Keras names it ``{variable.path with '/' -> '_'}_accumulator``
    (``Optimizer.add_variable_from_reference``).
    """
    if not optimizer.built:
        return tf.constant(optimizer.initial_accumulator_value, variable.dtype)
    name = f"{variable.path.replace('/', '_')}_accumulator"
    for candidate in optimizer.variables:
        if candidate.name == name:
            return tf.convert_to_tensor(candidate)
    raise ValueError(f"{type(optimizer).__name__} has no accumulator for {variable.path!r}")


def _as_tensor(value: Any) -> Any:
    return None if value is None else tf.convert_to_tensor(value)


def _unwrap(optimizer: Any) -> Any:
    """The optimizer inside a ``LossScaleOptimizer`` (mixed precision), else itself."""
    while isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    return optimizer


# Compiled probes per model, keyed by optimizer and trainable variables.  The
# functions hold the model weakly, so the cache does not keep models alive.
_PROBES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _compiled_probe(model: keras.Model, optimizer: Any) -> Callable[..., Any]:
    # An optimizer's first step builds its accumulators: trace again then.
    built = getattr(optimizer, "built", None)
    key = (id(optimizer), built, tuple(id(v) for v in model.trainable_variables))
    probes = _PROBES.setdefault(model, {})
    if key not in probes:  # keep the optimizer alive with its probe, so its id stays unique
        probes[key] = (optimizer, _make_probe(weakref.ref(model), optimizer))
    return probes[key][1]


def _make_probe(model_ref: Callable[[], keras.Model], optimizer: Any) -> Callable[..., Any]:
    @tf.function(reduce_retracing=True)
    def probe(x, y, sample_weight, iterations, tol, seed):
        model = model_ref()
        data = (x, y, sample_weight)
        if model.distribute_strategy.num_replicas_in_sync == 1:
            apply, specs = _local_products(model, optimizer, data)
        else:
            apply, specs = _replicated_products(model, optimizer, data)
        return _top_eigenvalue(apply, specs, iterations, tol, seed)

    return probe


def _local_products(model: keras.Model, optimizer: Any, data: tuple) -> tuple[Callable, list]:
    """``v -> A v`` on one device: one forward and backward pass, kept on a persistent
    tape, then one more backward pass per product."""
    variables = model.trainable_variables
    with tf.GradientTape(persistent=True) as tape:
        with tf.GradientTape() as inner:
            loss = _replica_loss(model, *data)
        grads = inner.gradient(loss, variables)
    blocks = [
        _Block.of(v, g, _touched_rows(g) if is_sparse(g) else None)
        for v, g in zip(variables, grads)
        if g is not None
    ]
    scales = _scales(optimizer, blocks)

    def products(vector: Vector) -> Vector:
        products = tape.gradient(
            [b.target for b in blocks],
            [b.variable for b in blocks],
            output_gradients=[b.seed(v) for b, v in zip(blocks, vector)],
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
        return [b.restrict(p) for b, p in zip(blocks, products)]

    return _preconditioned(products, scales), [b.spec() for b in blocks]


def _replicated_products(model: keras.Model, optimizer: Any, data: tuple) -> tuple[Callable, list]:
    """``v -> A v`` under a multi-replica strategy: each replica takes its share of
    the batch, and the products are summed.  A collective cannot sit in a loop inside
    a replica function, so every product re-runs the forward and backward pass."""
    strategy = model.distribute_strategy
    layout: dict[int, bool] = {}  # variable index -> sparse gradient; filled while tracing

    def touched(data: tuple) -> dict[int, tf.Tensor]:
        grads = _replica_gradients(model, data)
        layout.update({i: is_sparse(g) for i, g in enumerate(grads) if g is not None})
        return {i: _hits(g) for i, g in enumerate(grads) if is_sparse(g)}

    hits = strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(touched, (data,)), axis=None)
    rows = {i: tf.where(h > 0)[:, 0] for i, h in hits.items()}
    kept = sorted(layout)
    if not kept:
        raise ValueError("the loss depends on none of the model's trainable variables")
    variables = [model.trainable_variables[i] for i in kept]

    def local(vector: Vector, data: tuple) -> Vector:
        with tf.GradientTape() as outer:
            grads = _replica_gradients(model, data)
            blocks = [_Block.of(variables[k], grads[i], rows.get(i)) for k, i in enumerate(kept)]
            dot = _dot([b.target for b in blocks], [b.seed(v) for b, v in zip(blocks, vector)])
        products = outer.gradient(
            dot, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        return [b.restrict(p) for b, p in zip(blocks, products)]

    def products(vector: Vector) -> Vector:
        per_replica = strategy.run(local, (vector, data))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    specs = [
        (_row_shape(v, rows[i]) if i in rows else tf.shape(v), tf.as_dtype(v.dtype))
        for v, i in zip(variables, kept)
    ]
    scales = _scales(optimizer, [_Block(v, None, rows.get(i)) for v, i in zip(variables, kept)])
    return _preconditioned(products, scales), specs


def _replica_gradients(model: keras.Model, data: tuple) -> list[Any]:
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        loss = _replica_loss(model, *data)
    return tape.gradient(loss, variables)


def _replica_loss(model: keras.Model, x: Any, y: Any, sample_weight: Any) -> tf.Tensor:
    """This replica's term of the batch loss (the terms of all replicas sum to it)."""
    ctx = tf.distribute.get_replica_context()
    replicas = 1 if ctx is None else ctx.num_replicas_in_sync

    def loss_on(x: Any, y: Any, sample_weight: Any) -> tf.Tensor:
        y_pred = model(x, training=False)
        return model.compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
        )

    if replicas == 1:
        return loss_on(x, y, sample_weight)
    batch = tf.shape(tf.nest.flatten(x)[0])[0]
    replica = tf.cast(ctx.replica_id_in_sync_group, batch.dtype)
    start, end = batch * replica // replicas, batch * (replica + 1) // replicas
    share = tf.nest.map_structure(
        lambda t: None if t is None else t[start:end], (x, y, sample_weight)
    )
    # compute_loss divides by the replica count (Keras' scale_loss_for_distribution);
    # weight by this replica's share of the batch instead, which also covers uneven splits.
    loss = loss_on(*share)
    return loss * tf.cast(replicas * (end - start), loss.dtype) / tf.cast(batch, loss.dtype)


def _hits(grad: Any) -> tf.Tensor:
    """How often each row of the table is looked up (for a sparse gradient)."""
    indices = tf.cast(grad.indices, tf.int64)
    ones = tf.ones_like(indices, tf.float32)
    return tf.math.unsorted_segment_sum(ones, indices, tf.cast(grad.dense_shape[0], tf.int64))


def _touched_rows(grad: Any) -> tf.Tensor:
    """The sorted rows a sparse gradient touches."""
    return tf.where(_hits(grad) > 0)[:, 0]


def _row_shape(variable: Any, rows: tf.Tensor) -> tf.Tensor:
    return tf.concat([tf.shape(rows), tf.shape(variable)[1:]], 0)


@dataclasses.dataclass
class _Block:
    """One variable's coordinates: the whole variable, or the table rows in ``rows``."""

    variable: Any
    target: tf.Tensor | None  # the gradient (its looked-up rows for a sparse one)
    rows: tf.Tensor | None = None  # sorted table rows the batch touches (on any replica)
    positions: tf.Tensor | None = None  # index in rows of each looked-up row of target

    @classmethod
    def of(cls, variable: Any, grad: Any, rows: tf.Tensor | None) -> _Block:
        if rows is None:
            return cls(variable, tf.convert_to_tensor(grad))
        return cls(
            variable, grad.values, rows, tf.searchsorted(rows, tf.cast(grad.indices, tf.int64))
        )

    def spec(self) -> tuple[tf.Tensor, tf.DType]:
        shape = (
            tf.shape(self.variable) if self.rows is None else _row_shape(self.variable, self.rows)
        )
        return shape, self.target.dtype

    def seed(self, v: tf.Tensor) -> tf.Tensor:
        """The output gradient for ``target`` that makes the tape compute ``H v``."""
        return v if self.rows is None else tf.gather(v, self.positions)

    def restrict(self, product: Any) -> tf.Tensor:
        """A product for the whole variable, on this block's coordinates."""
        if self.rows is None:
            return tf.convert_to_tensor(product)
        if is_sparse(product):
            where = tf.searchsorted(self.rows, tf.cast(product.indices, tf.int64))
            return tf.math.unsorted_segment_sum(product.values, where, tf.size(self.rows))
        return tf.gather(product, self.rows)


def _scales(optimizer: Any, blocks: Sequence[_Block]) -> list[Any] | None:
    """``P^1/2`` per block, or None without an optimizer."""
    if optimizer is None:
        return None
    return [tf.sqrt(step_size(optimizer, b.variable, b.rows)) for b in blocks]


def _preconditioned(products: Callable[[Vector], Vector], scales: list | None) -> Callable:
    """``v -> P^1/2 H P^1/2 v`` from ``v -> H v`` (itself when ``scales`` is None)."""
    if scales is None:
        return products

    def apply(vector: Vector) -> Vector:
        product = products([v * s for v, s in zip(vector, scales)])
        return [p * s for p, s in zip(product, scales)]

    return apply


def _dot(a: Vector, b: Vector) -> tf.Tensor:
    return tf.add_n([tf.reduce_sum(tf.cast(s * t, tf.float32)) for s, t in zip(a, b)])


def _random_unit(specs: Sequence[tuple[tf.Tensor, tf.DType]], seed: tf.Tensor) -> Vector:
    """A random unit vector (stateless, so the same on every call with this seed)."""
    vector = [
        tf.random.stateless_normal(shape, tf.stack([seed, i]), dtype=dtype)
        for i, (shape, dtype) in enumerate(specs)
    ]
    norm = tf.sqrt(_dot(vector, vector))
    return [v / tf.cast(norm, v.dtype) for v in vector]


def _axpy(terms: Sequence[tuple[tf.Tensor, Vector]]) -> Vector:
    """The linear combination sum of ``scalar * vector`` over ``terms``."""
    return [
        tf.add_n([tf.cast(c, blocks[k].dtype) * blocks[k] for c, blocks in terms])
        for k in range(len(terms[0][1]))
    ]


def _top_ritz(alphas: tf.Tensor, betas: tf.Tensor, size: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Top eigenvalue of the Lanczos tridiagonal matrix of order ``size``, and the
    magnitude of the last component of its eigenvector."""
    diagonal = tf.cast(alphas[:size], tf.float64)
    off = tf.cast(betas[: size - 1], tf.float64)
    matrix = tf.linalg.diag(diagonal) + tf.linalg.diag(off, k=1) + tf.linalg.diag(off, k=-1)
    values, vectors = tf.linalg.eigh(matrix)
    return tf.cast(values[-1], tf.float32), tf.cast(tf.abs(vectors[-1, -1]), tf.float32)


def _top_eigenvalue(
    apply: Callable[[Vector], Vector],
    specs: Sequence[tuple[tf.Tensor, tf.DType]],
    iterations: tf.Tensor,
    tol: tf.Tensor,
    seed: tf.Tensor,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """Lanczos (no reorthogonalisation; the top Ritz value does not need it):
    (value, products used, converged, residual).

    Stops when the Ritz residual ``|beta_{j+1} s_j|`` (``s`` the top eigenvector of
    the tridiagonal matrix) is at most ``tol * |value|``, which bounds the relative
    distance of ``value`` to an eigenvalue by ``tol``; an invariant subspace (a
    breakdown, ``beta = 0``) stops it with residual 0.
    """
    v = _random_unit(specs, seed)

    def body(j, v, v_prev, beta, alphas, betas, _value, _residual):
        w = apply(v)
        alpha = _dot(v, w)
        w = _axpy([(1.0, w), (-alpha, v), (-beta, v_prev)])
        beta_next = tf.sqrt(_dot(w, w))
        alphas = tf.tensor_scatter_nd_update(alphas, [[j]], [alpha])
        betas = tf.tensor_scatter_nd_update(betas, [[j]], [beta_next])
        value, last = _top_ritz(alphas, betas, j + 1)
        v_next = [t / tf.cast(tf.maximum(beta_next, 1e-30), t.dtype) for t in w]
        return j + 1, v_next, v, beta_next, alphas, betas, value, beta_next * last

    def cond(j, _v, _v_prev, _beta, _alphas, _betas, value, residual):
        return tf.logical_and(j < iterations, residual > tol * tf.abs(value))

    zeros = tf.zeros([iterations])
    start = (tf.constant(0), v, [tf.zeros_like(t) for t in v], 0.0, zeros, zeros, 0.0, np.inf)
    j, *_, value, residual = tf.while_loop(cond, body, start)
    relative = residual / tf.maximum(tf.abs(value), 1e-30)
    return value, j, relative <= tol, relative
