"""Output paths of the training commands: checks made before any slow work, and overwrites
that never leave a half-written (or emptied) file behind.

    check_output_file("distilled.jsonl", "--out")      # ValueError if it cannot be a file
    with replace_file("out.jsonl") as f:                # written to a temporary file, renamed
        f.write(...)                                    # over "out.jsonl" only on success
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import IO

from medusa_jax.config import ConfigError


class OutputPathError(ConfigError):
    """An output path that cannot be written as asked (a directory where a file is meant, a
    file where a directory is meant, or under a file). A ConfigError (so a ValueError): the
    CLIs report it as one ``error:`` line."""


def _blocking_ancestor(path: str) -> str | None:
    """The nearest existing ancestor of ``path`` if it is not a directory (then nothing can be
    created below it), else None."""
    parent = os.path.dirname(path)
    while parent and not os.path.exists(parent):
        up = os.path.dirname(parent)
        if up == parent:
            return None
        parent = up
    return parent if parent and not os.path.isdir(parent) else None


def check_output_file(path: str | os.PathLike, what: str) -> str:
    """The absolute ``path`` if a file can be written there; OutputPathError naming ``what``
    (the option or setting that gave it) if it is a directory or lies under a file."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if os.path.isdir(path):
        raise OutputPathError(f"{what}: {path} is a directory; give the path of a file")
    blocker = _blocking_ancestor(path)
    if blocker:
        raise OutputPathError(f"{what}: cannot create {path}: {blocker} is a file, not a "
                              "directory")
    return path


def check_output_dir(path: str | os.PathLike, what: str) -> str:
    """The absolute ``path`` if a directory can be (or is) there; OutputPathError naming
    ``what`` if it is an existing file or lies under one."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputPathError(f"{what}: {path} is a file, not a directory; give a directory "
                              "(it is created if missing)")
    blocker = _blocking_ancestor(path)
    if blocker:
        raise OutputPathError(f"{what}: cannot create {path}: {blocker} is a file, not a "
                              "directory")
    return path


@contextlib.contextmanager
def replace_file(path: str | os.PathLike, mode: str = "w",
                 encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file next to ``path`` for writing; on success it replaces ``path``
    (``os.replace``, atomic on one file system), on an exception it is removed and ``path`` is
    left as it was. A crash mid-write therefore never empties or truncates the old file."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    kw = {} if "b" in mode else {"encoding": encoding}
    try:
        with open(tmp, mode, **kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
