"""The run dir: one launch per folder, a folder dpo-dist made (or an empty one), checked before anything is written.

A run dir holds what the launcher writes (plan.json, ds_config.json, command.sh, .deepspeed_env, launch.log,
restarts.json) and the ranks' output/. Rules, each refused with the fix and with nothing written:
- a path that is a file, or a symlink to nothing, is not a run dir;
- a folder that holds files dpo-dist did not write (no run marker: `/`, a home folder, a source tree) is never
  written into, even with --overwrite_run_dir;
- an earlier run's folder (it has the marker) is reused only with --overwrite_run_dir;
- a folder another launch holds now (util.lock) is refused while that launch lives;
- the default name (runs/<model>-<time>) is made with an exclusive mkdir, so two launches never share it.
(Hand-written: the rule is dpo-dist's own.)
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from dpo_dist.util.atomic import write_atomic
from dpo_dist.util.lock import FolderBusy, hold_folder, release_folder

RUN_MARKER = ".dpo_dist_run"  # written first into every run dir dpo-dist makes: "this folder is a run of ours"


class RunDirError(ValueError):
    """A run dir that cannot be used; the message says why and the fix."""


def safe_name(model: str) -> str:
    """The model's last path part as a folder name: letters, digits, '.', '_' and '-' only, never '..' (pure)."""
    return (re.sub(r"[^A-Za-z0-9._-]+", "_", Path(model.rstrip("/")).name).strip("._") or "model")[:80]


def default_run_dir(model: str, root: Path = Path("runs"), now: float | None = None) -> Path:
    """runs/<safe_name(model)>-<YYYYmmdd-HHMMSS> (pure; claim_run_dir makes it unique)."""
    return root / f"{safe_name(model)}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}"


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and not path.is_symlink() and path != path.parent:
        path = path.parent
    return path


def is_run(folder: Path) -> bool:
    """A folder dpo-dist made (it holds the run marker)."""
    return (folder / RUN_MARKER).is_file()


def check_run_dir(run_dir: Path, overwrite: bool, flag: str = "--run_dir") -> str | None:
    """Pure check of an existing path (reads only): the refusal, or None when it may be used."""
    if run_dir.is_symlink() and not run_dir.exists():
        return f"{flag} {run_dir} is a symlink to {os.readlink(run_dir)}, which does not exist. Choose another {flag}."
    if run_dir.exists() and not run_dir.is_dir():
        return f"{flag} {run_dir} is a file, not a folder. Nothing was written. Choose a new {flag}."
    if not run_dir.exists():
        parent = _nearest_existing(run_dir)
        if not parent.is_dir():
            return (f"{flag} {run_dir}: {parent} is a file, so no folder can be made under it. Nothing was written. "
                    f"Choose a {flag} under a folder.")
        return None
    entries = sorted(os.listdir(run_dir))
    if not entries:
        return None
    shown = run_dir if not run_dir.is_symlink() else f"{run_dir} (a symlink to {run_dir.resolve()})"
    if RUN_MARKER not in entries:
        return (f"{flag} {shown} holds files dpo-dist did not write ({', '.join(entries[:5])}"
                f"{', ...' if len(entries) > 5 else ''}). Nothing was written. It must be a new or empty "
                f"folder, or an earlier dpo-dist run: choose a new {flag}.")
    if not overwrite:
        return (f"{flag} {shown} holds an earlier run (its plan.json, command.sh, output/). Nothing was written. "
                "Pass --overwrite_run_dir to replace its plan and command (output/ is kept; the ranks then ask for "
                "--overwrite_output_dir or --resume_from_checkpoint), or choose a new --run_dir.")
    return None


def claim_run_dir(run_dir: Path | None, model: str, overwrite: bool = False, flag: str = "--run_dir") -> tuple[Path, bool]:
    """Make or check the run dir, then hold it (util.lock) for the life of this process and mark it as a run.
    Returns (the run dir, whether this call made it). RunDirError (nothing written, nothing left behind) when
    it cannot be used."""
    if run_dir is None:
        base = default_run_dir(model)
        base.parent.mkdir(parents=True, exist_ok=True)
        for n in range(1, 1000):
            candidate = base if n == 1 else base.with_name(f"{base.name}-{n}")
            try:
                os.mkdir(candidate)
            except FileExistsError:
                continue
            hold_folder(candidate)
            try:
                _mark(candidate)
            except OSError:
                release_folder(candidate)
                candidate.rmdir()
                raise
            return candidate, True
        raise RunDirError(f"could not make a new run dir next to {base}: 999 already exist. Pass --run_dir.")
    run_dir = Path(run_dir)
    problem = check_run_dir(run_dir, overwrite, flag)
    if problem:
        raise RunDirError(problem)
    made = None
    if not run_dir.exists():
        made = _nearest_existing(run_dir)
        try:
            run_dir.mkdir(parents=True)
        except FileExistsError:  # made by a launch that started at the same moment: check it as found
            made = None
        except OSError as e:
            raise RunDirError(f"{flag} {run_dir}: cannot make it ({e.strerror or e}). Nothing was written. "
                              "Choose a folder you can write to.") from None
    try:
        hold_folder(run_dir)
    except FolderBusy:
        raise RunDirError(f"{flag} {run_dir} is in use by another launch that is running now. Nothing was written. "
                          f"Wait for it to end, or choose a new {flag}.") from None
    problem = check_run_dir(run_dir, overwrite, flag)  # again, now that it is ours: a racing launch may have written
    if problem:
        release_folder(run_dir)
        raise RunDirError(problem)
    try:
        _mark(run_dir)
    except OSError:
        release_folder(run_dir)
        if made is not None:
            remove_made(run_dir, made)
        raise
    return run_dir, made is not None


def remove_made(run_dir: Path, stop: Path | None = None) -> None:
    """Remove the run dir this launch made (its marker first, then the empty folders up to `stop`, the folder
    that existed before; just the run dir when not given). Anything else in it stays."""
    (run_dir / RUN_MARKER).unlink(missing_ok=True)
    release_folder(run_dir)
    stop = stop if stop is not None else run_dir.parent
    p = run_dir
    while p != stop and p != p.parent:
        try:
            p.rmdir()
        except OSError:
            return
        p = p.parent


def _mark(run_dir: Path) -> None:
    write_atomic(run_dir / RUN_MARKER, json.dumps({"pid": os.getpid(), "started": time.time()}) + "\n")
