"""``clippy-monitor`` command line: a thin argparse dispatcher.

The subcommands are the rows of :data:`COMMANDS`: a name, help texts, a
function adding its arguments (``_<name>_arguments``) and one running it
(``_run_<name>``).  A command imports its implementation only when run, so
``clippy-monitor --help`` stays fast and commands that read records never
import TensorFlow.  A command that does (``imports_tensorflow``) imports it
first through :func:`quiet_tensorflow`, so its start-up log lines are not shown.
Bad arguments get one line, ``clippy-monitor CMD: error: ...``, and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NoReturn

# TensorFlow's start-up lines: absl's note, INFO/WARNING log lines (oneDNN, CUDA stub,
# XLA service) and the ERROR a machine without a CUDA driver gets on every start.
_TF_NOISE = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$"
    r"|[IW]\d{4} [\d:.]+ +\d+ \S+:\d+\] "
    r"|E\d{4} [\d:.]+ +\d+ \S+:\d+\] failed call to cuInit: "
)


@contextlib.contextmanager
def tensorflow_noise_filtered() -> Iterator[None]:
    """While inside, what the process writes to stderr (fd 2, C++ included) is held, then
    written back without TensorFlow's start-up lines (``_TF_NOISE``)."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to filter
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            lines = held.read().decode(errors="replace").splitlines(keepends=True)
            kept = "".join(line for line in lines if not _TF_NOISE.match(line))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


def quiet_tensorflow() -> None:
    """Import TensorFlow without its start-up lines, unless the user set ``TF_CPP_MIN_LOG_LEVEL``
    (then nothing is changed).  Sets it to 2: later INFO and WARNING lines are dropped too."""
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ:
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    with tensorflow_noise_filtered():
        import tensorflow as tf

        tf.config.list_physical_devices()  # CUDA is probed here, not at import


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``PROG: error: ...``) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def port_number(text: str) -> int:
    """``--port``: an integer in 1..65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1..65535)") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (1..65535)")
    return port


def refresh_interval(text: str) -> int:
    """``--refresh-ms``: an integer of at least 100 (milliseconds)."""
    try:
        ms = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of milliseconds") from None
    if ms < 100:
        raise argparse.ArgumentTypeError(f"{ms} is below 100 ms")
    return ms


def _dash_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--logdir",
        required=True,
        type=Path,
        help="directory holding run records; only runs under it are served",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", default=8050, type=port_number, help="port, 1..65535 (default 8050)")
    p.add_argument(
        "--refresh-ms",
        default=1000,
        type=refresh_interval,
        help="how often the Live view polls the record, >= 100 (default 1000)",
    )


def _run_dash(args: argparse.Namespace) -> int:
    from clippy_monitor.record import RecordError

    if not args.logdir.is_dir():
        print(f"clippy-monitor dash: error: {args.logdir}: no such directory", file=sys.stderr)
        return 2
    from clippy_monitor.dashboards.dash_app import app

    try:
        app.serve(args.logdir, host=args.host, port=args.port, refresh_ms=args.refresh_ms)
    except app.CannotServe as exc:  # port in use, unknown host: the user picks another
        print(f"clippy-monitor dash: error: {exc}", file=sys.stderr)
        return 2
    except (OSError, RecordError, ValueError) as exc:
        print(f"clippy-monitor dash: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _postmortem_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "run",
        type=Path,
        metavar="RUN",
        help="a run's logdir (or a directory holding exactly one record)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument(
        "--html", type=Path, metavar="FILE", help="also write a self-contained HTML report"
    )
    p.add_argument(
        "--redetect",
        nargs="*",
        metavar="NAME=VALUE",
        help="re-detect events offline with these detector thresholds (the record's own for the rest), "
        "e.g. --redetect spike_ratio=3 warmup_steps=20; imports TensorFlow",
    )


def _run_postmortem(args: argparse.Namespace) -> int:
    from clippy_monitor.postmortem.command import run

    return run(args)


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out",
        type=Path,
        default=Path("runs"),
        help="where the three run records go (default ./runs)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the model initialisation and batch sampling"
    )


def _run_demo(args: argparse.Namespace) -> int:
    from clippy_monitor.testbed.demo import run_demo

    run_demo(args.out, seed=args.seed)
    return 0


#: ``experiments.ALL_METHODS``, spelled out so that ``--help`` imports no TensorFlow
#: (tests/test_testbed.py checks that they agree); the last four: ``FORM_METHODS``.
EXPERIMENT_METHODS = (
    "naive",
    "GC",
    "AGC",
    "LAMB",
    "Clippy",
    "GC-eq2",
    "AGC-eq2",
    "AGC-unitwise",
    "AGC-unitwise-eq2",
)


def _experiment_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out",
        type=Path,
        default=Path("experiment"),
        help="output directory (default ./experiment)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes and a reduced grid: about 6 minutes on 2 CPU cores",
    )
    p.add_argument(
        "--models",
        nargs="+",
        choices=["Small", "Large", "Large+DCN"],
        help="Table 2's models (default: all three; --quick: Small)",
    )
    _experiment_grid_arguments(p)
    table3 = p.add_mutually_exclusive_group()
    table3.add_argument("--no-table3", action="store_true", help="skip Table 3's ablation runs")
    table3.add_argument(
        "--table3-only",
        action="store_true",
        help="run only Table 3, with all its runs (5 Clean, 3 per change)",
    )
    p.add_argument(
        "--table3-lr",
        type=float,
        metavar="X",
        help="Table 3's learning-rate multiplier (default: the plan's)",
    )


def _experiment_grid_arguments(p: argparse.ArgumentParser) -> None:
    """Which methods, thresholds and seeds Table 2 runs."""
    p.add_argument(
        "--methods",
        nargs="+",
        choices=EXPERIMENT_METHODS,
        metavar="METHOD",
        help="the methods to run, of "
        + " ".join(EXPERIMENT_METHODS)
        + " (default: the first five)",
    )
    p.add_argument(
        "--baseline-forms",
        action="store_true",
        help="add GC and AGC as the paper ran them: "
        + ", ".join(EXPERIMENT_METHODS[5:])
        + " (eq. 2: gradient clipped before Adagrad's accumulator; unitwise: AGC per output "
        "unit, as NFNets); shown as extra rows under Table 2",
    )
    p.add_argument(
        "--repeat-seeds",
        nargs="+",
        type=int,
        metavar="SEED",
        help="seeds each method's best setting runs with; the first is the search's "
        "(default 0 1 2; --quick: 0 1)",
    )
    p.add_argument(
        "--paper-grids",
        action="store_true",
        help="search section 5.1.3's full threshold grids (--quick otherwise tries one per method)",
    )


def _run_experiment(args: argparse.Namespace) -> int:
    from clippy_monitor.testbed.experiments import (
        QUICK_PLAN,
        QUICK_TESTBED,
        Plan,
        Testbed,
        customised_plan,
        run_experiment,
    )

    plan, testbed = (QUICK_PLAN, QUICK_TESTBED) if args.quick else (Plan(), Testbed())
    if args.models:
        plan = replace(plan, models=tuple(args.models))
    plan = customised_plan(
        plan, args.methods, args.baseline_forms, args.paper_grids, args.repeat_seeds
    )
    if args.table3_only:  # Table 3 in full (5 + 5 x 3 runs), also on the --quick testbed
        plan = replace(plan, models=(), table3_runs=Plan().table3_runs)
    if args.table3_lr is not None:
        plan = replace(plan, table3_lr_multiplier=args.table3_lr)
    result = run_experiment(args.out, plan, testbed, table3_enabled=not args.no_table3)
    if result.table2_md:
        print(f"\nTable 2\n\n{result.table2_md}\n\nFigure 5: {result.figure}")
    if result.table3_md:
        print(f"\nTable 3\n\n{result.table3_md}")
    print(f"\nAll results: {args.out / 'RESULTS.md'}  (wall time {result.wall_s / 60:.1f} min)")
    return 0


@dataclass(frozen=True)
class Command:
    """One subcommand: its name and help texts, what adds its arguments, what runs it (-> exit code)."""

    name: str
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    imports_tensorflow: Callable[[argparse.Namespace], bool] = lambda args: False


#: The subcommands, in the order ``clippy-monitor --help`` lists them.
COMMANDS: tuple[Command, ...] = (
    Command(
        "dash",
        help="serve the Dash app (live view, step-a/b/c replay, run comparison)",
        description="Serve the Dash app over the run records under --logdir (see docs/DASH.md).",
        add_arguments=_dash_arguments,
        run=_run_dash,
    ),
    Command(
        "postmortem",
        help="explain a run: events, step-a/b/c, culprit layers, GC/AGC/Clippy factors, verdict",
        description=(
            "Post-mortem of a run record (see docs/POSTMORTEM.md). Exit codes: 0 analysed; "
            "2 bad input (one line on stderr); 3 analysed, but unreadable parts of the record (torn, corrupt or "
            "truncated) were skipped or impossible recorded values ignored (one warning line each)."
        ),
        add_arguments=_postmortem_arguments,
        run=_run_postmortem,
        imports_tensorflow=lambda args: args.redetect is not None,
    ),
    Command(
        "demo",
        help="train naive Adagrad, ClippyAdagrad and naive Adagrad with recovery at the same high "
        "learning rate and explain what happened",
        description=(
            "Trains the same multitask model three times on a drifting synthetic log (naive Adagrad, "
            "ClippyAdagrad, naive Adagrad with on_divergence='recover'; about 3 minutes on 2 CPU cores), "
            "records the runs with the DivergenceMonitor and summarises the records."
        ),
        add_arguments=_demo_arguments,
        run=_run_demo,
        imports_tensorflow=lambda args: True,
    ),
    Command(
        "experiment",
        help="reproduce the paper's Table 2, Table 3 and Figure 5 on the testbed",
        description=(
            "Naive / GC / AGC / LAMB / Clippy x learning rates {1x, 2x} x models {Small, Large, Large+DCN}; "
            "the best setting of each method repeated over seeds; Table 3's divergence ratios. Writes "
            "table2.md, table3.md, figure5.html, results.json and RESULTS.md to --out. Finished runs are "
            "reused, so an interrupted experiment resumes."
        ),
        add_arguments=_experiment_arguments,
        run=_run_experiment,
        imports_tensorflow=lambda args: True,
    ),
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="clippy-monitor",
        description="Clippy optimizers, divergence monitoring and post-mortems (Tang et al., KDD 2023).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        p = subparsers.add_parser(command.name, help=command.help, description=command.description)
        command.add_arguments(p)
        p.set_defaults(spec=command)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command: Command | None = getattr(args, "spec", None)
    if command is None:
        parser.print_help()
        return 2
    if command.imports_tensorflow(args):
        quiet_tensorflow()
    return int(command.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
