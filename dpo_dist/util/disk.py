"""A full disk, said plainly: which folder, how much is free, what to do.

Writes that hit a full file system surface in many shapes (OSError ENOSPC/EDQUOT from Python, torch.save's
"PytorchStreamWriter failed writing file", a truncated safetensors file). The rank and the launcher both turn
them into one message naming the folder, so a user never has to read a traceback to learn the disk is full.
(Hand-written: no library names the folder a failed write was aimed at.)
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

# Below this many free bytes a folder counts as full: no checkpoint, log line or model file fits any more.
FULL_BELOW_BYTES = 1 << 20
_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# What torch.save / torch's zip writer raise when the underlying write fails (the OSError is swallowed).
_NO_SPACE_TEXT = ("no space left on device", "disk quota exceeded", "file write failed")


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes (for an unprivileged writer) on the file system that holds `path` or its nearest existing parent."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def is_no_space(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) is a write that failed because the disk or quota is full."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE_ERRNOS:
            return True
        if any(t in str(exc).lower() for t in _NO_SPACE_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def no_space_message(path: str | os.PathLike) -> str | None:
    """'no space left on <path> (N bytes free) ...' when the file system holding `path` is full, else None."""
    free = free_bytes(path)
    if free is None or free >= FULL_BELOW_BYTES:
        return None
    return (f"no space left on {path} ({free} bytes free). Free space there (or move the run with --run_dir / "
            "--output_dir to a larger disk), then resume from the newest complete checkpoint "
            "(--resume_from_checkpoint latest).")
