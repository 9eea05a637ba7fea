"""The multitask ranking model (paper 3.1) on the real KuaiRand log, trained with ClippyAdagrad.

    python examples/kuairand_clippy.py [--model Small] [--scale 0.125] [--lr 0.2] [--out runs/kuairand]

The KuaiRand-27K subset ships with the package (14 days, 41,828 interactions;
CC BY-SA 4.0, Gao et al., CIKM 2022 -- see clippy_monitor/testbed/data/kuairand/
ATTRIBUTION.md for its selection biases).  Days 1-13 are visited in time order,
batches drawn from a 2-day moving window, and the model is evaluated on day 14
after every half day: AUC for is_click, long_view, label (like/hate),
is_comment, is_follow, is_forward, RMSE for log1p(play_time_ms).  The run is
recorded by the DivergenceMonitor.
"""

from __future__ import annotations

import argparse

import keras

from clippy_monitor import ClippyAdagrad
from clippy_monitor.testbed.data import KuaiRandLog
from clippy_monitor.testbed.models import build_model, compile_model
from clippy_monitor.testbed.protocol import (
    LinearWarmup,
    ProtocolConfig,
    output_biases,
    train_sequentially,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="Small", choices=["Small", "Large", "Large+DCN"])
    parser.add_argument(
        "--scale",
        type=float,
        default=1 / 8,
        help="width multiplier (1 = the paper's 512x2 / 4096x4)",
    )
    parser.add_argument("--lr", type=float, default=0.2, help="peak learning rate")
    parser.add_argument("--out", default="runs/kuairand")
    args = parser.parse_args()

    log = KuaiRandLog()
    keras.utils.set_random_seed(0)
    model = build_model(
        args.model,
        log.features,
        log.tasks,
        scale=args.scale,
        embedding_dim=16,
        output_bias=output_biases(log),
    )
    optimizer = ClippyAdagrad(
        LinearWarmup(args.lr, warmup_steps=60), exclude_from_clipping=["embedding"]
    )
    compile_model(model, log.tasks, optimizer)
    protocol = ProtocolConfig(
        batch_size=256, steps_per_day=30, window_days=2, evals_per_day=2, eval_rows=4096
    )
    result = train_sequentially(model, log, protocol, args.out, seed=0, stop_on_divergence=False)

    print(
        f"{result.steps} steps in {result.wall_s:.0f} s; divergence events: {result.events or 'none'}"
    )
    print("evaluation on the last day (2022-04-21):")
    for name, value in result.final.items():
        print(f"  {name:22s} {value:.4f}")
    print(
        f"open the record:  tensorboard --logdir {args.out}    or    clippy-monitor dash --logdir {args.out}"
    )


if __name__ == "__main__":
    main()
