"""``clippy-monitor postmortem RUN [--json] [--html FILE] [--redetect NAME=VALUE ...]``.

Exit codes (docs/POSTMORTEM.md):

* 0 -- the whole record was read and analysed;
* 2 -- bad input, nothing analysed: missing path, a directory holding no run,
  unreadable meta, no readable step, a bad ``--redetect`` item, an unwritable
  ``--html`` file, an ``--html`` file that is a directory or a file of a run
  record (one line on stderr);
* 3 -- parts of the record were unreadable (torn tail, corrupt chunk, torn
  events line) and skipped, or held impossible values (a ``detector/*`` value
  the detector cannot output) that were ignored: the rest was analysed and
  reported as usual, and one warning line on stderr for each says what.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

PROG = "clippy-monitor postmortem"
EXIT_OK, EXIT_BAD_INPUT, EXIT_PARTIAL = 0, 2, 3


class UsageError(Exception):
    """Bad input: reported as one line on stderr with exit code 2."""


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def parse_thresholds(items: Sequence[str]) -> dict[str, Any]:
    """``["spike_ratio=3", "warmup_steps=20"]`` -> ``{"spike_ratio": 3, "warmup_steps": 20}``."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise UsageError(
                f"--redetect: bad item {item!r} (want NAME=NUMBER, e.g. spike_ratio=3)"
            )
        try:
            out[name.strip()] = _number(value.strip())
        except ValueError:
            raise UsageError(f"--redetect: {name.strip()}={value!r} is not a number") from None
    return out


def check_thresholds(run: Any, thresholds: dict[str, Any]) -> None:
    """Validate re-detection thresholds against ``DetectorConfig`` (imports TensorFlow)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from clippy_monitor.monitor.detectors import DetectorConfig

    unknown = sorted(DetectorConfig.unknown(thresholds))
    if unknown:
        known = ", ".join(sorted(DetectorConfig.names()))
        raise UsageError(f"--redetect: unknown threshold(s) {', '.join(unknown)}; known: {known}")
    recorded = run.meta.get("detector") if isinstance(run.meta.get("detector"), dict) else {}
    try:
        DetectorConfig(**{**DetectorConfig.known(recorded), **thresholds})
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--redetect: {' '.join(str(exc).split())}") from None


def _load(args: argparse.Namespace) -> tuple[Any, dict[str, Any] | None]:
    """The run and the re-detection thresholds (None: use the recorded events); UsageError if bad."""
    from clippy_monitor.record import RecordError, load_run

    thresholds = parse_thresholds(args.redetect) if args.redetect is not None else None
    try:
        record = load_run(args.run)
    except RecordError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"{args.run}: {exc.strerror or exc}") from None
    if not len(record):
        why = (
            f": {len(record.skipped)} unreadable part(s), first: {record.skipped[0]}"
            if record.skipped
            else ""
        )
        raise UsageError(f"{record.path}: no readable steps in the record{why}")
    if args.html is not None:
        from clippy_monitor.postmortem.html import target_problem

        problem = target_problem(args.html, record)
        if problem is not None:
            raise UsageError(problem)
    if thresholds is not None:
        check_thresholds(record, thresholds)
    return record, thresholds


def _skipped_line(run: Any) -> str:
    notes = run.skipped
    more = f" (+{len(notes) - 1} more)" if len(notes) > 1 else ""
    return (
        f"{PROG}: warning: {run.path}: {len(notes)} unreadable part(s) skipped{more}: {notes[0]}; "
        f"analysed the {len(run)} readable steps"
    )


def run(args: argparse.Namespace) -> int:
    """Run the subcommand; returns the exit code (never raises for bad input)."""
    try:
        record, thresholds = _load(args)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT

    from clippy_monitor.postmortem.report import build_report, render_text, to_json

    report = build_report(record, redetect=thresholds)
    if args.html is not None:
        from clippy_monitor.postmortem.html import write_html

        try:
            write_html(record, report, args.html)
        except ValueError as exc:  # the target changed since it was checked
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except OSError as exc:
            print(
                f"{PROG}: error: {args.html}: cannot write the HTML report ({exc.strerror or exc})",
                file=sys.stderr,
            )
            return EXIT_BAD_INPUT
        report["html"] = str(args.html)
    text = to_json(report) + "\n" if args.json else render_text(report)
    if args.html is not None and not args.json:
        text += f"\nHTML report: {args.html}\n"
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. `| head`: not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if record.skipped:
        print(_skipped_line(record), file=sys.stderr)
    if report["ignored"]:
        print(
            f"{PROG}: warning: {record.path}: impossible recorded values ignored: {'; '.join(report['ignored'])}",
            file=sys.stderr,
        )
    return EXIT_PARTIAL if record.skipped or report["ignored"] else EXIT_OK
