"""The multitask ranking model family of the paper (section 3.1, Figure 2, Table 1).

Every model has the same skeleton::

    categorical ids -> embeddings --+
                                    +-> concat -> [DCN-v2 -> LayerNorm] -> shared bottom -> one tower per task
    dense features -----------------+

* Small:      shared bottom FFN 512 x 2
* Large:      shared bottom FFN 4096 x 4
* Large+DCN:  DCN-v2 cross layers on the inputs, then LayerNorm, then Large's FFN

Widths scale by one number, ``scale``: ``scale=1`` gives the paper's sizes (for a
GPU), ``scale=1/32`` a model that trains in seconds on two CPU cores.  The model
is a Keras functional model whose outputs are a dict keyed by task name, compiled
with binary cross-entropy for binary tasks and MSE for regression ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import keras
from keras import layers, ops

TaskKind = Literal["binary", "regression"]


@dataclasses.dataclass(frozen=True)
class Task:
    """One prediction head: ``binary`` (sigmoid, log loss, AUC) or ``regression`` (MSE, RMSE)."""

    name: str
    kind: TaskKind

    @property
    def loss(self) -> str:
        return "binary_crossentropy" if self.kind == "binary" else "mse"


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """The model's inputs: ``vocab_sizes[i]`` ids for categorical feature i, plus ``n_dense`` floats."""

    vocab_sizes: tuple[int, ...]
    n_dense: int

    @property
    def n_categorical(self) -> int:
        return len(self.vocab_sizes)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """One row of Table 1, before scaling.

    Attributes:
        name: "Small", "Large" or "Large+DCN" (or a variant of them, e.g. "Small+DCN").
        bottom: widths of the shared-bottom FFN at ``scale=1``.
        dcn_layers: DCN-v2 cross layers on the inputs (0 = none); followed by LayerNorm.
        tower: hidden width of each task tower at ``scale=1``.
    """

    name: str
    bottom: tuple[int, ...]
    dcn_layers: int = 0
    tower: int = 256


SMALL = ModelConfig("Small", (512, 512))
LARGE = ModelConfig("Large", (4096,) * 4)
LARGE_DCN = ModelConfig("Large+DCN", (4096,) * 4, dcn_layers=2)
SMALL_DCN = ModelConfig("Small+DCN", (512, 512), dcn_layers=2)  # Table 3, "smaller model size"
MODELS: dict[str, ModelConfig] = {m.name: m for m in (SMALL, LARGE, LARGE_DCN, SMALL_DCN)}


def scaled(width: int, scale: float, minimum: int = 4) -> int:
    """``width * scale`` rounded, at least ``minimum``."""
    return max(minimum, round(width * scale))


@keras.saving.register_keras_serializable(package="clippy_monitor")
class CrossLayer(layers.Layer):
    """One DCN-v2 cross layer (Wang et al. 2021): ``x_{l+1} = x_0 * (W x_l + b) + x_l``.

    ``rank`` > 0 uses the low-rank ``W = U V`` of the paper's mixture-free variant.
    """

    def __init__(self, rank: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rank = rank

    def build(self, input_shape: Sequence[Any]) -> None:
        dim = int(input_shape[0][-1])
        if self.rank:
            self.u = self.add_weight(name="u", shape=(dim, self.rank), initializer="glorot_uniform")
            self.v = self.add_weight(name="v", shape=(self.rank, dim), initializer="glorot_uniform")
        else:
            self.kernel = self.add_weight(
                name="kernel", shape=(dim, dim), initializer="glorot_uniform"
            )
        self.bias = self.add_weight(name="bias", shape=(dim,), initializer="zeros")

    def call(self, inputs: Sequence[Any]) -> Any:
        x0, x = inputs
        projected = (
            ops.matmul(ops.matmul(x, self.u), self.v) if self.rank else ops.matmul(x, self.kernel)
        )
        return x0 * (projected + self.bias) + x

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "rank": self.rank}


def build_model(
    config: ModelConfig | str,
    features: FeatureSpec,
    tasks: Sequence[Task],
    *,
    scale: float = 1.0,
    embedding_dim: int = 8,
    output_bias: Mapping[str, float] | None = None,
) -> keras.Model:
    """The uncompiled functional model: inputs ``{"categorical": int32[n_cat], "dense": float32[n_dense]}``,
    outputs ``{task.name: [batch, 1]}``.

    ``output_bias`` initialises each task's output bias (the log-odds of a binary
    task's base rate, a regression target's mean; see ``protocol.output_biases``),
    so the first steps are not spent learning the label means.

    All categorical features share one embedding table (``embedding``) with a row
    offset per feature, so the optimizer sees one sparse variable whatever the
    number of features; exclude it from clipping with ``exclude_from_clipping=["embedding"]``.
    """
    config = MODELS[config] if isinstance(config, str) else config
    categorical = keras.Input((features.n_categorical,), dtype="int32", name="categorical")
    dense = keras.Input((features.n_dense,), dtype="float32", name="dense")

    offsets = [0]
    for vocab in features.vocab_sizes[:-1]:
        offsets.append(offsets[-1] + vocab)
    ids = categorical + ops.convert_to_tensor(offsets, dtype="int32")
    embedded = layers.Embedding(sum(features.vocab_sizes), embedding_dim, name="embedding")(ids)
    x = layers.Concatenate(name="inputs")(
        [layers.Flatten(name="flatten_embeddings")(embedded), dense]
    )

    if config.dcn_layers:  # Large+DCN: DCN-v2 on the inputs, followed by LayerNorm (5.1.2)
        x0 = x
        for i in range(config.dcn_layers):
            x = CrossLayer(name=f"dcn_{i}")([x0, x])
        x = layers.LayerNormalization(name="input_layer_norm")(x)

    for i, width in enumerate(config.bottom):
        x = layers.Dense(scaled(width, scale), activation="relu", name=f"shared_bottom_{i}")(x)

    outputs = {}
    for task in tasks:
        h = layers.Dense(scaled(config.tower, scale), activation="relu", name=f"{task.name}_tower")(
            x
        )
        activation = "sigmoid" if task.kind == "binary" else None
        bias = keras.initializers.Constant((output_bias or {}).get(task.name, 0.0))
        outputs[task.name] = layers.Dense(
            1, activation=activation, bias_initializer=bias, name=task.name
        )(h)
    return keras.Model(
        {"categorical": categorical, "dense": dense}, outputs, name=config.name.replace("+", "_")
    )


def compile_model(
    model: keras.Model, tasks: Sequence[Task], optimizer: keras.optimizers.Optimizer, **kwargs: Any
) -> keras.Model:
    """Compile with one loss per task (binary cross-entropy / MSE), summed with equal weights.

    The loss dict is passed in the order of the model's ``output_names`` (sorted),
    the order in which Keras computes the task losses.
    """
    losses = {t.name: t.loss for t in tasks}
    model.compile(
        optimizer=optimizer, loss={name: losses[name] for name in model.output_names}, **kwargs
    )
    return model
