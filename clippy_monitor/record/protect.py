"""Which files belong to a run record, so that no other output is ever written onto one.

Every tool that writes a file the user names (``postmortem --html FILE``, ...)
asks :func:`record_file_at` first and writes with :func:`write_text_atomic`.
A *file of a run record* is one a :class:`~clippy_monitor.record.RunWriter`
creates -- :data:`~clippy_monitor.record.format.RECORD_FILES` (``clippy_record.bin``,
``clippy_meta.json``, ...) and TensorBoard's ``events.out.tfevents.*`` -- by
name in any directory (a run's or not: no other output has those names), and
any other name of such a file: a relative path, ``..``, a symlink to it or to
its directory, another letter case, a hard link.  No TensorFlow.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from clippy_monitor.record.format import RECORD_FILES, TB_FILE_PREFIX


def _is_record_name(name: str) -> bool:
    name = name.lower()  # a case-insensitive file system maps other spellings to the same file
    return name in RECORD_FILES or name.startswith(TB_FILE_PREFIX)


def _same_file(st: os.stat_result, directory: Path) -> Path | None:
    """The record file in ``directory`` that is the file of ``st`` (same device and inode)."""
    try:
        names = [entry.name for entry in os.scandir(directory) if _is_record_name(entry.name)]
    except OSError:
        return None
    for name in names:
        try:
            other = os.stat(directory / name)
        except OSError:
            continue
        if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
            return directory / name
    return None


def record_file_at(
    target: str | os.PathLike, runs: Iterable[str | os.PathLike] = ()
) -> Path | None:
    """The file of a run record that writing ``target`` would overwrite, or None if there is none.

    ``target`` is refused by its name (as given, ``..`` and symlinks resolved,
    any letter case) and, when it exists with more than one hard link, by its
    inode against the record files of its own directory and of ``runs`` (run
    directories, or files in them).  A hard link from elsewhere cannot be
    found; :func:`write_text_atomic` replaces the link and never modifies
    that file.
    """
    given = Path(os.path.abspath(target))
    real = Path(os.path.realpath(target))
    for path in (given, real):
        if _is_record_name(path.name):
            return path
    try:
        st = os.stat(real)
    except OSError:
        return None
    if st.st_nlink < 2:
        return None
    directories = {real.parent, given.parent}
    for run in runs:
        run = Path(os.path.realpath(run))
        directories.add(run if run.is_dir() else run.parent)
    for directory in sorted(directories):
        found = _same_file(st, directory)
        if found is not None:
            return found
    return None


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` via a temporary file in the same directory and a rename.

    A failed write leaves ``path`` as it was and no temporary file behind; an
    existing ``path`` (or a symlink or hard link there) is replaced, the file
    it named is never modified.  Raises OSError (``IsADirectoryError`` for a
    directory).
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(21, "Is a directory", str(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:64]}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
