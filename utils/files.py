"""Files written whole or not at all, with the permissions the user's umask gives.

A crash, a preemption or a failed download never leaves a half-written file where a later run
would take it for a good one; checkpoints, exports and downloads all go through ``atomic_write``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def umask() -> int:
    """The process's umask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_as_usual(path: str | Path, directory: bool = False) -> None:
    """Give a temporary file (created 0600, or a folder 0700) the mode an ordinary ``open`` or
    ``mkdir`` would have: a team on a shared cluster reads what the user's umask lets it."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """``write`` into a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        share_as_usual(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
