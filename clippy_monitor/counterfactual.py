"""Counterfactual replay: would another optimizer have saved this run?

A run recorded with ``DivergenceMonitor(..., keep_replay=True)`` keeps the snapshot
taken before step-a of its first full divergence and a fingerprint of every batch
(``monitor.replay_keeper``).  :func:`replay` builds a fresh model, restores that
snapshot into it, and trains it through the original's decision step (plus a margin) on
the same batches -- each checked against its recorded fingerprint -- with the
optimizer given, under a monitor that writes the sibling record
``<run>/replay-<name>``.  The post-mortem then compares the two
(``clippy_monitor.replay_reading``).  docs/REPLAY.md has the whole story.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np

from clippy_monitor.monitor.callback import DivergenceMonitor
from clippy_monitor.monitor.detectors import DetectorConfig
from clippy_monitor.monitor.replay_keeper import batch_fingerprint, same_fingerprint
from clippy_monitor.monitor.statistics import Thresholds
from clippy_monitor.record.format import META_FILE
from clippy_monitor.record.reader import Run, load_run
from clippy_monitor.replay_reading import (
    FINGERPRINT,
    REPLAY_DIR,
    REPLAY_PREFIX,
    KeptSnapshot,
    ReplayInfo,
)

_log = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def kept_snapshot(run_path: str | os.PathLike) -> KeptSnapshot:
    """The snapshot the run at ``run_path`` kept for a replay (ValueError if none)."""
    kept = KeptSnapshot.read(Path(run_path) / REPLAY_DIR)
    if kept is None:
        raise ValueError(
            f"{run_path}: no snapshot kept for a replay (record the run with "
            "DivergenceMonitor(..., keep_replay=True); one is kept at its first full divergence)"
        )
    if kept.snapshot_step < 0:
        raise ValueError(
            f"{run_path}: no snapshot was taken before step-a ({kept.step_a}) of its divergence"
        )
    return kept


def replay_start(run_path: str | os.PathLike) -> int:
    """The first step a replay trains: pass ``batches`` from the original's batch of this
    step on (batch ``k`` of the original, counting from 0, is its step ``k``)."""
    return kept_snapshot(run_path).snapshot_step + 1


def _checked(batches: Iterable[Any], run: Run, first: int, last: int) -> Iterator[tuple[int, Any]]:
    """``(step, batch)`` from ``first`` through ``last`` (or until ``batches`` ends), each
    batch's fingerprint checked against the record (ValueError naming the step)."""
    recorded = dict(zip(run.steps.tolist(), run.series(FINGERPRINT).tolist()))
    for step, batch in zip(range(first, last + 1), batches):
        expected = recorded.get(step)
        got = float(batch_fingerprint(batch))
        if expected is not None and np.isfinite(expected) and not same_fingerprint(got, expected):
            raise ValueError(
                f"replay: the batch given for step {step} is not the one the original saw "
                f"(fingerprint {got:.7g}, recorded {expected:.7g}); pass the original's "
                f"batches from step {first} on, in order"
            )
        yield step, batch


#: How a replay compiles its model: ``model.compile`` keyword arguments (the optimizer
#: added), or a function ``compile(model, optimizer)``, or None (see :func:`replay`).
CompileWith = dict | Callable[[keras.Model, Any], None] | None


def _compile(model: keras.Model, optimizer: Any, compile_kwargs: CompileWith) -> None:
    """Compile with ``optimizer`` and ``compile_kwargs`` (default: the loss ``model_fn``
    compiled the model with)."""
    if callable(compile_kwargs):
        compile_kwargs(model, optimizer)
        return
    if compile_kwargs is None:
        loss = getattr(model, "loss", None)
        if loss is None:
            raise ValueError(
                "replay: model_fn returned an uncompiled model; pass compile_kwargs="
                "dict(loss=...) with the original's loss"
            )
        compile_kwargs = {"loss": loss}
    model.compile(optimizer=optimizer, **compile_kwargs)


def _slot_key(path: str, model_paths: Sequence[str]) -> str:
    """An optimizer variable's name without the optimizer's and the model's naming:
    ``"3:accumulator"`` for the slot of model variable 3, else its own name."""
    name = path.split("/", 1)[-1]
    for i, model_path in sorted(enumerate(model_paths), key=lambda p: -len(p[1])):
        prefix = model_path.replace("/", "_") + "_"
        if name.startswith(prefix):
            return f"{i}:{name[len(prefix) :]}"
    return name


def _keys(paths: Sequence[str], model_paths: Sequence[str]) -> list[str]:
    """:func:`_slot_key` of each path, ``#k`` added to its k-th repeat (names may repeat)."""
    keys = [_slot_key(p, model_paths) for p in paths]
    return [f"{k}#{keys[:i].count(k)}" for i, k in enumerate(keys)]


def restore(model: keras.Model, kept: KeptSnapshot, values: Sequence[np.ndarray]):
    """Set ``model``'s variables to the snapshot's exactly, and each optimizer variable
    whose name (per model variable) and shape match one of the snapshot's; the learning
    rate stays the replay optimizer's.  Returns (restored, not restored) optimizer paths."""
    n = len(kept.model_variables)
    shapes = [tuple(v.shape) for v in model.variables]
    if shapes != [tuple(s) for s in kept.shapes[:n]]:
        raise ValueError(
            "replay: model_fn builds a model whose variables differ from the snapshot's "
            f"(shapes {shapes} vs {[tuple(s) for s in kept.shapes[:n]]})"
        )
    for variable, value in zip(model.variables, values[:n]):
        variable.assign(value)
    model.optimizer.build(model.trainable_variables)
    saved = dict(zip(_keys(kept.optimizer_variables, kept.model_variables), values[n:]))
    variables = model.optimizer.variables
    keys = _keys([v.path for v in variables], [v.path for v in model.variables])
    restored, missing = [], []
    for variable, key in zip(variables, keys):
        if key == "learning_rate#0":
            continue
        value = saved.get(key)
        if value is not None and tuple(value.shape) == tuple(variable.shape):
            variable.assign(value)
            restored.append(variable.path)
        else:
            missing.append(variable.path)
    return restored, missing


def _monitor(out: Path, run: Run, first: int, span: int) -> DivergenceMonitor:
    """A monitor set like the original's (detector, thresholds, sharpness probe)."""
    meta = run.meta
    detector = meta.get("detector")
    thresholds = meta.get("thresholds")
    return DivergenceMonitor(
        out,
        flush_every=max(1, min(span, 1000)),
        thresholds=Thresholds(**thresholds) if isinstance(thresholds, dict) else None,
        detector=DetectorConfig.from_dict(detector) if isinstance(detector, dict) else None,
        tensorboard=False,
        sharpness_every=meta.get("sharpness_every") or None,
        sharpness_onset_every=meta.get("sharpness_onset_every") or None,
        first_step=first,
    )


def _replay_dir(run_dir: Path, name: str) -> Path:
    """``<run>/replay-<name>``, checked: a valid name, and no replay of that name yet."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"replay: name must be letters, digits, '_', '.' or '-', got {name!r}")
    out = run_dir / f"{REPLAY_PREFIX}{name}"
    if (out / META_FILE).exists():
        raise FileExistsError(f"{out}: a replay of this name exists; pick another name")
    return out


def _restore_kept(
    model: keras.Model, run_dir: Path, kept: KeptSnapshot, name: str
) -> tuple[list[str], list[str]]:
    """Load the kept snapshot into ``model`` (:func:`restore`); say which optimizer
    variables it lacks."""
    with np.load(run_dir / REPLAY_DIR / kept.file) as data:
        values = [data[f"v{i}"] for i in range(len(data.files))]
    restored, missing = restore(model, kept, values)
    if missing:
        kinds = sorted(set(missing))
        _log.warning(
            "replay %s: %d optimizer variable(s) not in the snapshot, left as built: %s",
            name,
            len(missing),
            ", ".join(kinds[:5]) + (f" and {len(kinds) - 5} more" if len(kinds) > 5 else ""),
        )
    return restored, missing


def _replay_span(
    kept: KeptSnapshot, original: Run, steps: int | None, margin: int
) -> tuple[int, int]:
    """The first and last step a replay trains: ``steps`` from the snapshot on, or
    through the decision step plus ``margin``; never past the original's last step."""
    first = kept.snapshot_step + 1
    if steps is None and kept.decision_step is None:
        raise ValueError("replay: the divergence has no decision step; pass steps=")
    last = first + steps - 1 if steps is not None else kept.decision_step + margin
    return first, min(last, int(original.steps[-1]))


def _train(model: keras.Model, chosen: list, monitor: DivergenceMonitor) -> None:
    """One epoch over ``chosen`` under ``monitor``; the record is closed after it."""
    batches_again = itertools.cycle(chosen)  # fit's generator may be read past its end
    model.fit(
        (next(batches_again) for _ in itertools.count()),
        steps_per_epoch=len(chosen),
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[monitor],
    )
    monitor.close()


def replay(
    run_path: str | os.PathLike,
    model_fn: Callable[[], keras.Model],
    batches: Iterable[Any],
    optimizer: keras.optimizers.Optimizer,
    *,
    name: str,
    steps: int | None = None,
    margin: int = 50,
    compile_kwargs: CompileWith = None,
) -> Path:
    """Replay the run's first full divergence with ``optimizer``; the replay's record path.

    ``model_fn()`` builds the original's model (built: it has its variables), compiled
    with the original's loss or not compiled (then pass ``compile_kwargs``, e.g.
    ``dict(loss="mse")``; ``optimizer`` is added to them); for a multitask model, a
    function ``compile_kwargs(model, optimizer)`` that compiles it as the original was.  ``batches`` yields the
    original's batches from step :func:`replay_start` on, in order; each is checked
    against the recorded fingerprint (ValueError naming the first step that differs).
    Trains ``steps`` steps, or through the step the original's detector declared the
    divergence (``decided_at``; step-c in older records) plus ``margin`` (not past
    its last recorded step), writing ``<run>/replay-<name>``.  Optimizer variables are
    restored where they match the snapshot's (e.g. Adagrad's accumulators into
    ClippyAdagrad's); those that do not stay as built, and the replay says so.
    """
    run_dir = Path(run_path)
    out = _replay_dir(run_dir, name)
    kept = kept_snapshot(run_dir)
    original = load_run(run_dir)
    first, last = _replay_span(kept, original, steps, margin)
    chosen = [batch for _, batch in _checked(batches, original, first, last)]
    if not chosen:
        raise ValueError(f"replay: no batches given for steps {first}-{last}")
    model = model_fn()
    _compile(model, optimizer, compile_kwargs)
    restored, missing = _restore_kept(model, run_dir, kept, name)
    _train(model, chosen, _monitor(out, original, first, len(chosen)))
    info = ReplayInfo(
        name=name,
        snapshot_step=kept.snapshot_step,
        first_step=first,
        last_step=first + len(chosen) - 1,
        step_c=kept.step_c,
        optimizer=keras.saving.serialize_keras_object(optimizer),
        restored=restored,
        not_restored=missing,
    )
    info.write(out)
    return out
