"""Which run directories a server may open: the one confinement rule of every front end.

The Dash app and the TensorBoard tab name a run by its path relative to the
directory they serve, and names come from requests (which can be forged).
:func:`confined_run` turns a name into the run's real directory, or raises
:class:`RunRefused` when the name, or any of the run's record files, leads out
of the served directory.  No TensorFlow, no TensorBoard.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from clippy_monitor.record.format import RECORD_FILES
from clippy_monitor.record.reader import RecordError, find_runs

MAX_NAME_LENGTH = 4096


class RunRefused(RecordError):
    """A run name that does not designate a run inside the served directory."""


def is_inside(path: Path, root: Path) -> bool:
    """True if ``path`` is ``root`` or below it (both already real, absolute paths)."""
    return path == root or root in path.parents


def confined_run(root: str | os.PathLike, name: object) -> Path:
    """The real directory of run ``name`` under ``root``; :class:`RunRefused` if it leaves ``root``.

    ``name`` is a path relative to ``root`` ("." is ``root`` itself).  Refused:
    a name that is not a non-empty string, an absolute path, a ``..``
    component or a backslash; a directory whose real path (symlinks resolved)
    is outside ``root``; a run whose record file (:data:`RECORD_FILES`) is a
    symlink whose target is outside ``root``, dangling or not.  ``root`` may
    be relative or itself a symlink.  Whether the directory holds a record is
    not checked here.
    """
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_LENGTH or "\x00" in name:
        raise RunRefused(f"invalid run name {_shown(name)}: refused")
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts or "\\" in name:
        raise RunRefused(f"run {name!r} is outside {root}: refused")
    real_root = Path(os.path.realpath(root))
    real = Path(os.path.realpath(real_root.joinpath(*rel.parts)))
    if not is_inside(real, real_root):
        raise RunRefused(f"run {name!r} resolves outside {root} (symlink): refused")
    for file in RECORD_FILES:
        if not is_inside(Path(os.path.realpath(real / file)), real_root):
            raise RunRefused(f"run {name!r}: {file} links outside {root}: refused")
    return real


def run_name(root: str | os.PathLike, path: str | os.PathLike) -> str:
    """The name of the run in ``path`` under ``root``: its relative POSIX path, "." for ``root``."""
    rel = os.path.relpath(path, root)
    return "." if rel == os.curdir else PurePosixPath(Path(rel)).as_posix()


def served_runs(root: str | os.PathLike) -> dict[str, Path]:
    """``{name: real directory}`` of every run under ``root`` that :func:`confined_run` accepts.

    What a server lists: a run whose record file links outside ``root`` is left
    out, and symlinked directories are not entered.  ``{}`` if ``root`` is unreadable.
    """
    real_root = Path(os.path.realpath(root))
    try:
        paths = find_runs(real_root)
    except (RecordError, OSError):
        return {}
    runs = {}
    for path in paths:
        name = run_name(real_root, path)
        try:
            runs[name] = confined_run(real_root, name)
        except RunRefused:
            continue
    return runs


def _shown(name: object) -> str:
    text = repr(name)
    return text if len(text) <= 80 else text[:77] + "..."
