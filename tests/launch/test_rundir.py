"""Run dirs: refused with the fix and nothing written (a symlink to /, a folder of someone else's files, an
earlier run without --overwrite_run_dir, a file, a folder another launch holds); default names never shared."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT
from dpo_dist.util.lock import release_folder
from launch.rundir import RUN_MARKER, RunDirError, claim_run_dir, default_run_dir


def _train(capsys, *args):
    from launch.cli import main

    rc = main(["train", "--model", "google/gemma-3-270m", "--hardware", "cpu", "--cards", "1", "--dry-run",
               *map(str, args)])
    out = capsys.readouterr()
    return rc, out.out + out.err


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_symlink_to_a_folder_of_other_files_is_refused_even_with_overwrite(capsys, tmp_path):
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    link = tmp_path / "run"
    link.symlink_to(foreign)
    before = _snapshot(foreign)
    for extra in ([], ["--overwrite_run_dir"]):
        rc, out = _train(capsys, "--run_dir", link, *extra)
        assert rc == 2, out
        assert "holds files dpo-dist did not write (notes.txt)" in out and "choose a new --run_dir" in out
        assert _snapshot(foreign) == before  # no command.sh, plan.json or ds_config.json


def test_symlink_to_root_is_refused(capsys, tmp_path):
    link = tmp_path / "run"
    link.symlink_to("/")
    rc, out = _train(capsys, "--run_dir", link)
    assert rc == 2 and "did not write" in out
    assert not Path("/command.sh").exists() and not Path("/plan.json").exists()


def test_an_earlier_run_is_kept_unless_overwrite_run_dir(capsys, tmp_path):
    run = tmp_path / "run"
    rc, out = _train(capsys, "--run_dir", run)
    assert rc == 0, out
    assert (run / RUN_MARKER).is_file()
    (run / "command.sh").write_text("# the earlier run's command\n")
    rc, out = _train(capsys, "--run_dir", run)
    assert rc == 2 and "holds an earlier run" in out and "--overwrite_run_dir" in out
    assert (run / "command.sh").read_text() == "# the earlier run's command\n"
    rc, out = _train(capsys, "--run_dir", run, "--overwrite_run_dir")
    assert rc == 0, out
    assert "dpo_dist.dpo" in (run / "command.sh").read_text()


def test_a_run_dir_that_is_a_file_is_refused_without_traceback(capsys, tmp_path):
    f = tmp_path / "run"
    f.write_text("x")
    rc, out = _train(capsys, "--run_dir", f)
    assert rc == 2 and "is a file, not a folder" in out and "Traceback" not in out
    assert f.read_text() == "x"
    rc, out = _train(capsys, "--run_dir", f / "sub")
    assert rc == 2 and "is a file, so no folder can be made" in out


def test_an_existing_non_empty_output_dir_is_refused_before_the_run_dir_is_written(capsys, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "weights.bin").write_text("x")
    run = tmp_path / "run"
    rc, out = _train(capsys, "--run_dir", run, "--", "--output_dir", out_dir)
    assert rc == 2 and "exists and is not empty" in out and "--overwrite_output_dir" in out
    assert not run.exists()


HOLDER = textwrap.dedent("""
    import sys, time
    from dpo_dist.util.lock import hold_folder
    hold_folder(sys.argv[1]); print("held", flush=True); time.sleep(60)
""")


def _holder(folder: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_run_dir_or_output_dir_held_by_a_live_launch_is_refused_and_freed_when_it_dies(capsys, tmp_path):
    run = tmp_path / "run"
    rc, out = _train(capsys, "--run_dir", run)
    assert rc == 0
    holder = _holder(run)  # a launch that is going on now
    try:
        rc, out = _train(capsys, "--run_dir", run, "--overwrite_run_dir")
        assert rc == 2 and "in use by another launch" in out
    finally:
        holder.kill()
        holder.wait()
    rc, out = _train(capsys, "--run_dir", run, "--overwrite_run_dir")  # killed: no stale lock
    assert rc == 0, out

    out_dir = tmp_path / "shared_out"
    out_dir.mkdir()
    holder = _holder(out_dir)  # a rank 0 writing there now
    try:
        rc, out = _train(capsys, "--run_dir", tmp_path / "run2", "--", "--output_dir", out_dir)
        assert rc == 2 and f"the output dir {out_dir} is in use by another run" in out
        assert not (tmp_path / "run2").exists()
    finally:
        holder.kill()
        holder.wait()


def test_default_run_dirs_are_unique_and_safe_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, made_a = claim_run_dir(None, "org/My Model;rm -rf ~")
    b, made_b = claim_run_dir(None, "org/My Model;rm -rf ~")
    try:
        assert made_a and made_b and a != b  # same second, two folders
        assert a.parent == b.parent == Path("runs")
        assert all(c.isalnum() or c in "._-" for c in a.name), a.name
        assert default_run_dir("../..").name.startswith("model-")
    finally:
        release_folder(a)
        release_folder(b)


def test_claim_refuses_a_symlink_to_nothing(tmp_path):
    link = tmp_path / "run"
    link.symlink_to(tmp_path / "gone")
    with pytest.raises(RunDirError, match="does not exist"):
        claim_run_dir(link, "m")
    assert not (tmp_path / "gone").exists()
    assert os.path.islink(link)


def test_the_pipeline_never_moves_a_folder_it_did_not_make(tmp_path, capsys):
    """`make sanity OUT_DIR=$HOME` must not rename the home folder aside: refused, nothing changed."""
    from launch.pipeline import PipelineArguments, run_pipeline

    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("x")
    rc = run_pipeline(PipelineArguments(model="google/gemma-3-270m", out_dir=str(home)))
    err = capsys.readouterr().err
    assert rc == 2 and "--out_dir" in err and "did not write (.bashrc)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"] and (home / ".bashrc").read_text() == "x"


def test_the_pipeline_moves_an_earlier_pipeline_aside_unless_it_is_running(tmp_path):
    from launch.pipeline import claim_out_dir

    out = tmp_path / "sanity"
    first = claim_out_dir(out, "m")
    (first / "dpo_pipeline_sanity.log").write_text("earlier run")
    release_folder(out)
    holder = _holder(out)  # the earlier pipeline, still running (another process)
    try:
        with pytest.raises(RunDirError, match="in use by a pipeline that is running now"):
            claim_out_dir(out, "m")
    finally:
        holder.kill()
        holder.wait()
    again = claim_out_dir(out, "m")
    try:
        (prev,) = [p for p in tmp_path.iterdir() if p.name.startswith("sanity.prev-")]
        assert (prev / "dpo_pipeline_sanity.log").read_text() == "earlier run"
        assert again == out.resolve() and [p.name for p in again.iterdir()] == [RUN_MARKER]
    finally:
        release_folder(again)
