"""One run per folder: an exclusive lock on the folder itself, held for the life of the process.

`flock` on a descriptor of the folder (no lock file is written, so the folder's contents are untouched). The
kernel drops the lock when the holder exits, however it exits (SIGKILL, a crash, a lost node's process): a
crashed run never leaves a stale lock behind. Two launchers into one run dir, or two rank-0 processes into
one output dir, cannot both hold it. (Hand-written: the standard library has `fcntl.flock`; the rule is ours.)
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

# The descriptors of the folders this process holds, kept open (and so locked) until the process exits.
_HELD: dict[str, int] = {}


class FolderBusy(OSError):
    """Another live process holds the folder."""


def hold_folder(folder: str | os.PathLike) -> None:
    """Lock `folder` (which must exist) for this process until it exits; FolderBusy if another process holds it.
    Holding it twice in one process is a no-op."""
    key = os.path.realpath(folder)
    if key in _HELD:
        return
    fd = os.open(key, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise FolderBusy(errno.EBUSY, "held by another running process", key) from None
        raise
    _HELD[key] = fd


def release_folder(folder: str | os.PathLike) -> None:
    fd = _HELD.pop(os.path.realpath(folder), None)
    if fd is not None:
        os.close(fd)


def folder_is_busy(folder: str | os.PathLike) -> bool:
    """Whether another process holds `folder` now (a probe: takes and drops the lock)."""
    if not Path(folder).is_dir() or os.path.realpath(folder) in _HELD:
        return False
    try:
        hold_folder(folder)
    except FolderBusy:
        return True
    release_folder(folder)
    return False
