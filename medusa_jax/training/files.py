"""Output paths of the training commands: checks made before any slow work, and overwrites
that never leave a half-written (or emptied) file behind.

    check_output_file("distilled.jsonl", "--out")      # ValueError if it cannot be a file
    with replace_file("out.jsonl") as f:                # written to a temporary file, renamed
        f.write(...)                                    # over "out.jsonl" only on success
    read_done_ids("distilled.jsonl")                    # ids to skip when resuming; a half-
                                                        # written last line is cut off
"""

from __future__ import annotations

import contextlib
import json
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


def read_done_ids(path: str | os.PathLike, repair: bool = True) -> tuple[set[str], int]:
    """Ids of the records already in a distillation output, and the number of malformed lines.

    Only the last line can be half written (a crash inside a write); with ``repair`` it is cut
    off the file so the resumed run appends after the last complete record. A last line that
    parses but lacks its newline gets the newline. Malformed lines elsewhere are left in place
    and counted."""
    path = os.fspath(path)
    done: set[str] = set()
    bad = 0
    if not os.path.exists(path):
        return done, bad
    good_end = 0  # byte offset just past the last complete line
    tail = b""
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                tail = line
                break
            good_end += len(line)
            if not line.strip():
                continue
            rid = _record_id(line)
            if rid is None:
                bad += 1
            else:
                done.add(rid)
    if tail:
        rid = _record_id(tail) if tail.strip() else None
        if repair:
            with open(path, "r+b") as f:
                if rid is None:
                    f.truncate(good_end)
                else:
                    f.seek(0, os.SEEK_END)
                    f.write(b"\n")
        if rid is not None:
            done.add(rid)
    return done, bad


def _record_id(line: bytes) -> str | None:
    try:
        rec = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(rec, dict) or rec.get("id") is None or "conversations" not in rec:
        return None
    return str(rec["id"])
