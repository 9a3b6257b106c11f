"""Publishing the merged folder: built beside the output, locked while in use, swapped into place at the end.

Everything is written into ``<output>.tmp-<pid>`` (`make_temp`), verified there, then `publish` makes it
readable, fsyncs it and puts it at ``<output>`` with `dpo_dist.util.atomic.replace_folder`: an existing
``<output>`` (only with ``--overwrite``) is moved aside as ``.<output>.old-<pid>`` and deleted only once the new
one is in place; if the swap fails the old one is put back. A merge holds an ``flock`` on its temp folder and,
from just before it moves aside, on the old output, so the leftovers of a killed merge are those whose lock is
free: `clean_stale` removes their temp folders and puts back a folder a killed ``--overwrite`` moved aside. A
failed or interrupted merge leaves no ``<output>``.

Test hook: ``DPO_DIST_MERGE_PAUSE_BEFORE_RENAME=<seconds>`` sleeps after verification, before the swap.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from dpo_dist.post.errors import MergeArgumentError
from dpo_dist.util.atomic import replace_folder

logger = logging.getLogger("dpo_dist.merge")

PAUSE_ENV = "DPO_DIST_MERGE_PAUSE_BEFORE_RENAME"


def lock_dir(path: Path, blocking: bool = True) -> int | None:
    """flock a directory; returns the fd, or None when another live process holds it."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def unlock(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        with contextlib.suppress(OSError):
            os.close(fd)


def output_nonempty(output: Path) -> bool:
    return output.exists() and (not output.is_dir() or any(output.iterdir()))


def _aside_folders(output: Path) -> list[Path]:
    """Folders an --overwrite merge moved `output` aside into: replace_folder's ``.<name>.old-<pid>``, and
    ``<name>.old-<pid>`` as merges before replace_folder named them. The one merge-specific piece of the swap:
    replace_folder cleans up after itself but cannot after a killed process, and it does not export the name."""
    parent, name = output.parent, output.name
    return sorted([*parent.glob(f".{name}.old-*"), *parent.glob(f"{name}.old-*")])


def clean_stale(output: Path) -> list[str]:
    """Remove temp folders of killed merges into `output`; put back a folder a killed --overwrite moved aside.
    A live merge holds an flock on its folders, so only dead ones are touched."""
    actions = []
    parent, name = output.parent, output.name
    if not parent.is_dir():
        return actions
    for p in _aside_folders(output):
        fd = lock_dir(p, blocking=False) if p.is_dir() else None
        if fd is None:
            continue
        try:
            if output.is_dir() and not output_nonempty(output):
                output.rmdir()
            if not output.exists():
                os.rename(p, output)
                actions.append(f"restored {p.name} -> {name} (moved aside by an interrupted --overwrite merge)")
            else:
                shutil.rmtree(p, ignore_errors=True)
                actions.append(f"removed stale {p.name}")
        finally:
            unlock(fd)
    for p in sorted(parent.glob(f"{name}.tmp-*")):
        fd = lock_dir(p, blocking=False) if p.is_dir() else None
        if fd is None:
            if p.is_dir():
                logger.warning("%s belongs to a merge that is still running; left alone", p)
            continue
        try:
            shutil.rmtree(p, ignore_errors=True)
            actions.append(f"removed stale {p.name} (left by an interrupted merge)")
        finally:
            unlock(fd)
    for a in actions:
        logger.info("%s", a)
    return actions


def make_temp(output: Path) -> tuple[Path, int]:
    """A fresh, locked ``<output>.tmp-<pid>`` folder beside `output`: (path, lock fd for `unlock`)."""
    tmp = output.parent / f"{output.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp, lock_dir(tmp)


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(str(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            _fsync(p)
    _fsync(root)


def make_readable(root: Path) -> None:
    """safetensors writes 0600 files: open the folder up to the umask, like any other saved model."""
    mask = os.umask(0)
    os.umask(mask)
    for p in [root, *root.rglob("*")]:
        with contextlib.suppress(OSError):
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def publish(tmp: Path, output: Path, *, overwrite: bool, output_arg: str) -> None:
    """Put the complete, verified folder `tmp` at `output` (see the module doc). `output_arg` is --output as the
    user gave it, for the message when a folder appeared there while merging and `overwrite` is off."""
    make_readable(tmp)
    fsync_tree(tmp)
    pause = os.environ.get(PAUSE_ENV)
    if pause:
        logger.info("test hook %s: pausing %s s before the rename", PAUSE_ENV, pause)
        sys.stderr.flush()
        time.sleep(float(pause))

    held: list[int] = []

    def lock_old(dest: Path) -> None:  # replace_folder calls it only for a non-empty `output`
        if not overwrite:  # appeared while we merged
            raise MergeArgumentError(f"--output {output_arg}: appeared while merging; nothing was changed.")
        held.append(lock_dir(dest))  # clean_stale of a concurrent merge leaves it alone once it is aside

    try:
        replace_folder(tmp, output, before_swap=lock_old)
    finally:
        for fd in held:
            unlock(fd)
