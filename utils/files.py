"""Files written whole or not at all, with the permissions the user's umask gives.

A crash, a preemption or a failed download never leaves a half-written file where a later run
would take it for a good one; checkpoints, exports and downloads all go through ``atomic_write``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

# A write refused by the disk or the system: full, over quota, read-only, not allowed.
WRITE_ERRNOS = frozenset(
    (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG, errno.EIO)
)


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
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if (cause := _os_error(error)) is not None and cause.errno in WRITE_ERRNOS:
            # torch.save reports a full disk as "unexpected pos 704 vs 598": say what, and where
            raise OSError(cause.errno, cause.strerror, str(path)) from error
        raise


def _os_error(error: BaseException | None) -> OSError | None:
    """The OSError behind ``error`` (itself, or one it was raised from or during), if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno is not None:
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


class FoldersMade:
    """The folders that do not exist yet among ``paths`` (each the topmost one ``mkdir -p``
    would make), so that a start that fails can remove what it made: only folders left empty,
    never a file."""

    def __init__(self, *paths: Path) -> None:
        self.tops: list[Path] = []
        for path in (Path(p).absolute() for p in paths):
            top = None
            while not path.exists() and path != path.parent:
                top, path = path, path.parent
            if top is not None and top not in self.tops:
                self.tops.append(top)

    def remove_empty(self) -> None:
        for top in self.tops:
            if not top.is_dir():
                continue
            for folder, _, _ in os.walk(top, topdown=False):
                # one that is not empty holds something worth keeping (a download)
                with contextlib.suppress(OSError):
                    os.rmdir(folder)
