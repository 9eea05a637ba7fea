"""Step time with the DivergenceMonitor against the same fit without it (issue 3 target: <= 1.05x).

Variants, side by side in one process and interleaved round by round:
  * no callback (baseline);
  * DivergenceMonitor (every step recorded, flush_every=1000);
  * keras.callbacks.TensorBoard(update_freq=1);
  * a per-step host pull: the train step returns per-layer gradient norms in its
    logs and a (non-async) callback reads them every batch.

    python -m benchmarks.monitor_overhead [--model small|recommender|both] [--rounds 5]
    python -m benchmarks.monitor_overhead --parts   # the monitor with and without its per-variable passes
    python -m benchmarks.monitor_overhead --processes 3   # the same in 3 fresh processes; medians over them
    python -m benchmarks.monitor_overhead --model recommender --vocab 1000000 --table-variants
                                                    # embedding statistics on the touched rows vs the whole table
    python -m benchmarks.monitor_overhead --recovery-variants
                                                    # the monitor alone, with the skip rung, with the whole ladder
    python -m benchmarks.monitor_overhead --sharpness-variants
                                                    # the monitor alone, with its sharpness probe every 100 steps,
                                                    # and with the probe's tf.cond but never due

Each model runs at steps_per_execution 1 and 32, with jit_compile False (Keras's
default on CPU) and True (its default on GPUs, our stand-in for TPUs).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

import keras
import tensorflow as tf

from benchmarks.common import (
    in_fresh_processes,
    interleaved_medians,
    ratios,
    recommender_data,
    recommender_model,
    report,
    report_across_processes,
    small_data,
    small_model,
    timed_fit,
)
from clippy_monitor import DivergenceMonitor
from clippy_monitor.monitor import callback
from clippy_monitor.monitor.recorder import StepRecorder


class NormsInLogs(keras.Model):
    """The usual hand-rolled alternative: per-layer gradient norms returned in the logs."""

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = self.compute_loss(x=x, y=y, y_pred=self(x, training=True))
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply(grads, self.trainable_variables)
        logs = {f"norm_{i}": tf.norm(g) for i, g in enumerate(grads)}
        logs["loss"] = loss
        return logs


class PullLogs(keras.callbacks.Callback):
    """Reads every value of the logs on the host, each batch (a sync per step)."""

    def on_train_batch_end(self, batch, logs=None):
        self.last = {k: float(v) for k, v in (logs or {}).items()}


def _loss_row_only(
    self,
    grads,
    weights_before,
    weights_after,
    learning_rate,
    applied_factors,
    losses,
    overflow_skips=False,
    rows=None,
):
    """``StepRecorder.record`` without the per-variable passes: the rest of the monitor's cost."""
    row = tf.stack([tf.cast(value, tf.float32) for value in [*losses, learning_rate]])
    index = tf.math.floormod(self.step, self.capacity)[None]
    self.loss_buffer.scatter_update(tf.IndexedSlices(row[None], index))
    self.step.assign_add(1)


def _patched(owner, attr: str, value, run):
    """``run`` with ``owner.attr`` replaced while it runs (the monitor's step is traced on the first call)."""

    def patched():
        original = getattr(owner, attr)
        setattr(owner, attr, value)
        try:
            return run()
        finally:
            setattr(owner, attr, original)

    return patched


RECOVERY_VARIANTS = {
    "DivergenceMonitor, skip_bad_steps": {"skip_bad_steps": True},
    "DivergenceMonitor, on_divergence=recover": {"on_divergence": "recover"},
}
# The step keeps its batch only when a probe is due: at 10**9 it never is (after the first
# step, which sizes the buffers), so that variant times the per-step tf.cond alone.
SHARPNESS_VARIANTS = {
    "DivergenceMonitor, sharpness_every=100": {"sharpness_every": 100},
    "DivergenceMonitor, sharpness_every=10**9 (never due)": {"sharpness_every": 10**9},
}
MONITOR_VARIANTS = RECOVERY_VARIANTS | SHARPNESS_VARIANTS


def variant_names(
    xla_variants: bool,
    parts: bool,
    table_variants: bool,
    recovery_variants: bool = False,
    sharpness_variants: bool = False,
) -> list[str]:
    """The variants to time; the last flag given wins, as before."""
    if sharpness_variants:
        return ["no callback", "DivergenceMonitor", *SHARPNESS_VARIANTS]
    if recovery_variants:
        return ["no callback", "DivergenceMonitor", *RECOVERY_VARIANTS]
    if table_variants:
        return [
            "no callback",
            "DivergenceMonitor, whole embedding table read",
            "DivergenceMonitor",
        ]
    if parts:
        return ["no callback", "DivergenceMonitor, loss row only", "DivergenceMonitor"]
    if xla_variants:
        return ["no callback", "DivergenceMonitor(xla=True)", "DivergenceMonitor(xla=False)"]
    return [
        "no callback",
        "DivergenceMonitor",
        "TensorBoard(update_freq=1)",
        "norms in logs + host pull",
    ]


def variant_callbacks(variant: str) -> list[keras.callbacks.Callback]:
    """The callbacks a variant fits with (each writes to a fresh temp dir)."""
    if variant in (
        "DivergenceMonitor",
        "DivergenceMonitor, loss row only",
        "DivergenceMonitor, whole embedding table read",
    ):
        return [DivergenceMonitor(tempfile.mkdtemp(), flush_every=1000, tensorboard=True)]
    if variant in MONITOR_VARIANTS:
        return [
            DivergenceMonitor(
                tempfile.mkdtemp(), flush_every=1000, tensorboard=True, **MONITOR_VARIANTS[variant]
            )
        ]
    if variant == "DivergenceMonitor(xla=True)":
        return [DivergenceMonitor(tempfile.mkdtemp(), flush_every=1000, xla=True)]
    if variant == "DivergenceMonitor(xla=False)":
        return [DivergenceMonitor(tempfile.mkdtemp(), flush_every=1000, xla=False)]
    if variant == "TensorBoard(update_freq=1)":
        return [keras.callbacks.TensorBoard(tempfile.mkdtemp(), update_freq=1)]
    if variant == "norms in logs + host pull":
        return [PullLogs()]
    return []  # "no callback"


def variant_run(variant: str, make_model, data, spe: int, jit: bool, steps: int):
    """A compiled model for ``variant`` and the timed fit that runs it."""
    keras.utils.set_random_seed(0)
    model = make_model()
    if variant == "norms in logs + host pull":
        model = NormsInLogs(model.inputs, model.outputs)
    model.compile(
        optimizer=keras.optimizers.Adagrad(0.01),
        loss="binary_crossentropy",
        steps_per_execution=spe,
        jit_compile=jit,
    )
    run = timed_fit(model, data, steps, variant_callbacks(variant))
    if variant == "DivergenceMonitor, loss row only":
        return _patched(StepRecorder, "record", _loss_row_only, run)
    if variant == "DivergenceMonitor, whole embedding table read":
        # the monitor before it read only the touched rows
        return _patched(callback, "touched_rows", lambda grad: None, run)
    return run


def variants(
    name: str,
    spe: int,
    jit: bool,
    steps: int,
    batch: int,
    xla_variants: bool = False,
    parts: bool = False,
    vocab: int = 10_000,
    table_variants: bool = False,
    recovery_variants: bool = False,
    sharpness_variants: bool = False,
) -> dict:
    make_model, data = {
        "small": (small_model, small_data(batch, 64)),
        "recommender": (
            lambda: recommender_model(vocab=vocab),
            recommender_data(batch, 8, vocab=vocab),
        ),
    }[name]
    return {
        variant: variant_run(variant, make_model, data, spe, jit, steps)
        for variant in variant_names(
            xla_variants, parts, table_variants, recovery_variants, sharpness_variants
        )
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["small", "recommender", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--spe", type=int, nargs="+", default=[1, 32], help="steps_per_execution values"
    )
    parser.add_argument("--jit", choices=["off", "on", "both"], default="both")
    parser.add_argument(
        "--xla-variants",
        action="store_true",
        help="compare the monitor's xla=True and xla=False instead",
    )
    parser.add_argument(
        "--parts",
        action="store_true",
        help="split the monitor's cost: without and with the per-variable passes",
    )
    parser.add_argument(
        "--vocab", type=int, default=10_000, help="rows of the recommender's embedding table"
    )
    parser.add_argument(
        "--table-variants",
        action="store_true",
        help="compare reading the whole embedding table against its touched rows",
    )
    parser.add_argument(
        "--recovery-variants",
        action="store_true",
        help="the monitor alone, with skip_bad_steps, and with on_divergence='recover'",
    )
    parser.add_argument(
        "--sharpness-variants",
        action="store_true",
        help="the monitor alone, with sharpness_every=100, and with the probe never due",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="repeat in this many fresh processes; report the medians over them",
    )
    parser.add_argument(
        "--ratios-json", help=argparse.SUPPRESS
    )  # where a child process of --processes writes its ratios
    return parser.parse_args()


def time_config(args: argparse.Namespace, name: str, batch: int, steps: int, jit: bool, spe: int):
    """Time every variant of one model / jit / steps_per_execution; print the table.

    Returns ``(heading, ratios to "no callback")``."""
    steps_run = max(steps, spe) // spe * spe
    runs = variants(
        name,
        spe,
        jit,
        steps_run,
        batch,
        args.xla_variants,
        args.parts,
        args.vocab,
        args.table_variants,
        args.recovery_variants,
        args.sharpness_variants,
    )
    times = interleaved_medians(runs, args.rounds)
    table = f", vocab {args.vocab}" if name == "recommender" else ""
    heading = (
        f"{name} model{table}, batch {batch}, steps_per_execution={spe}, "
        f"jit_compile={jit}, {steps_run} steps per timing, {args.rounds} rounds"
    )
    print(f"\n### {heading}")
    print(report(times, "no callback"), flush=True)
    return heading, ratios(times, "no callback")


def main() -> None:
    args = parse_args()
    if args.processes > 1:
        argv = [*sys.argv[1:], "--processes", "1"]  # argparse keeps the last value given
        print(
            report_across_processes(
                in_fresh_processes("benchmarks.monitor_overhead", argv, args.processes)
            )
        )
        return
    configs = {"small": (256, 640), "recommender": (1024, 32)}  # batch, steps per timing
    collected = {}
    for name in ["small", "recommender"] if args.model == "both" else [args.model]:
        batch, steps = configs[name]
        for jit in {"off": (False,), "on": (True,), "both": (False, True)}[args.jit]:
            for spe in args.spe:
                heading, row = time_config(args, name, batch, steps, jit, spe)
                collected[heading] = row
    if args.ratios_json:
        with open(args.ratios_json, "w") as f:
            json.dump(collected, f)


if __name__ == "__main__":
    main()
