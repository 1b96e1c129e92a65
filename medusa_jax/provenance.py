"""Which code produced a result: the git commit of a checkout, for the records that results
files, data-store manifests and device reports keep."""

from __future__ import annotations

import subprocess


def git_commit(where: str, *, short: bool = False, mark_dirty: bool = True) -> str | None:
    """The commit checked out at ``where`` (abbreviated with ``short``), followed by ``+dirty``
    when tracked files differ from it (unless ``mark_dirty`` is False); None outside a git
    checkout or without git."""
    git = ["git", "-C", where]
    try:
        head = subprocess.run(git + ["rev-parse"] + (["--short"] if short else []) + ["HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        if not head:
            return None
        if not mark_dirty:
            return head
        dirty = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")
