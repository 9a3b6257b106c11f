"""A disk that fills up mid-run, for real: the run dir on a small tmpfs, filled to the last byte once checkpoint-2
is complete. The launcher must end with one clear "no space left on <path>" error and a non-zero exit, stop every
rank (nothing of the run left alive), not restart (a restart would fail the same way), and no torn checkpoint may
count as complete. Needs root to mount the tmpfs: otherwise SKIP with the reason."""

from __future__ import annotations

import errno
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from support.launched import LaunchedRun, wait_no_leftovers

pytestmark = pytest.mark.slow

TMPFS_SIZE = "96m"


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", f"dpo-dist-test-{uuid.uuid4().hex[:8]}",
                        str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"SKIP: cannot mount a {TMPFS_SIZE} tmpfs to fill up ({(r.stderr or r.stdout).strip()}); "
                    "this test needs root (CAP_SYS_ADMIN)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(folder: Path) -> int:
    """Write until the file system is full; returns the bytes written."""
    n = 0
    with open(folder / "filler", "wb", buffering=0) as fh:
        block = b"\0" * (1 << 20)
        while True:
            try:
                n += fh.write(block)
            except OSError as e:
                assert e.errno == errno.ENOSPC
                if len(block) == 1:
                    return n
                block = block[: len(block) // 16] or b"\0"


def test_a_disk_that_fills_up_stops_the_run_with_one_clear_error(tmp_path, tiny_assets, small_disk):
    from dpo_dist.util.checkpoint import checkpoint_problems, newest_complete_checkpoint

    run = LaunchedRun(tmp_path, tiny_assets, "--save_steps", 2, "--save_total_limit", 1000,
                      launch_extra=("--max_restarts", 1), run_dir=small_disk / "run", name="full")
    out = run.run_dir / "output"
    try:
        first = out / "checkpoint-2"
        run.wait_for(lambda: first.is_dir() and not checkpoint_problems(first, 2, True), "complete checkpoint-2")
        run.note_tree()
        filled = _fill(small_disk)
        rc, took = run.wait_exit(120)
        err = run.stderr
        print(f"disk full after {filled / 2**20:.0f} MiB of filler: launcher exited {rc} after {took:.1f} s: "
              f"{err.strip().splitlines()[-1]}")
        assert rc != 0
        assert f"no space left on {run.run_dir}" in err, err[-3000:]
        assert "Traceback" not in err
        assert "launch: restart" not in run.stdout  # a restart cannot help a full disk
        assert not wait_no_leftovers(str(run.run_dir), run.seen)
        # Every checkpoint either passes the completeness check or is named as torn; the newest complete one is
        # one that was complete before the disk filled up.
        newest, torn = newest_complete_checkpoint(out, world_size=2, deepspeed=True)
        assert newest is not None and not checkpoint_problems(newest, 2, True)
        for ckpt, problems in torn:
            assert problems, ckpt
        print(f"checkpoints: newest complete {newest.name}; torn: {[(c.name, p[:1]) for c, p in torn]}")
    finally:
        run.cleanup()
        (small_disk / "filler").unlink(missing_ok=True)
        os.sync()
