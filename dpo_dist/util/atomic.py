"""Atomic files and folders: a reader sees the old content or the new, never half of one.

Every file dpo-dist writes for a user (metrics, reports, configs, plots, caches) goes through
`write_atomic`: a uniquely named temp file in the same folder, flushed and fsynced, then `os.replace`.
A temp file is removed when anything fails, so an interrupted or refused write leaves what was there.
Model folders go through `replace_folder`, which swaps a complete temp folder into place.
(Written by hand: the standard library has the pieces, no library has the rule.)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomic(path: str | os.PathLike, data: str | bytes | Callable[[Path], None], *, mode: int | None = None) -> Path:
    """Write `data` (text, bytes, or a function that writes the given temp path) to `path` atomically.
    The parent folder is created. `mode` sets the file's permission bits (default: 0o666 minus the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        if callable(data):
            os.close(fd)
            data(tmp)
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())
        if mode is None:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int = 2, sort_keys: bool = False) -> Path:
    """`obj` as JSON, atomically. Serialised first: an object JSON cannot take leaves no trace."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False) + "\n"
    return write_atomic(path, text)


def replace_folder(tmp: str | os.PathLike, dest: str | os.PathLike, *, before_swap: Callable[[Path], None] | None = None) -> None:
    """Put the complete folder `tmp` at `dest` (both on one file system, so each rename is atomic).

    An existing `dest` is renamed aside first and removed only once `tmp` is in place; when the swap fails,
    the old folder is put back. `before_swap(dest)` runs just before the old folder moves (e.g. to take its lock).
    """
    tmp, dest = Path(tmp), Path(dest)
    old = None
    if dest.exists() or dest.is_symlink():
        if dest.is_dir() and not dest.is_symlink() and not any(dest.iterdir()):
            dest.rmdir()
        else:
            if before_swap is not None:
                before_swap(dest)
            old = dest.parent / f".{dest.name}.old-{os.getpid()}"
            os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except BaseException:
        if old is not None and not dest.exists():
            os.rename(old, dest)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
