"""dpo_dist.merge without a training run: refused arguments exit 2 and write nothing, and an output folder
that a killed merge moved aside comes back."""

from __future__ import annotations

import pytest

from conftest import cpu_env, run_main


def _cli(*args, env_extra=None):
    """`python -m dpo_dist.merge ARGS`, in this process (conftest.run_main)."""
    from dpo_dist.post.merge import main

    return run_main(main, args, env=cpu_env(**(env_extra or {})))

@pytest.mark.parametrize("aside_name", [".merged.old-999999", "merged.old-999999"])  # replace_folder's; earlier merges'
def test_overwrite_moved_aside_by_a_killed_merge_is_restored(tmp_path, aside_name):
    """A merge killed between moving the old output aside and renaming the new one in: the old one comes back."""
    from dpo_dist.post.merge import MergeArgumentError, merge_model

    out = tmp_path / "merged"
    aside = tmp_path / aside_name
    aside.mkdir()
    (aside / "keep.txt").write_text("previous model")
    (tmp_path / "ckpt").mkdir()  # never read: the merge stops at the restored output
    with pytest.raises(MergeArgumentError, match="exists and is not empty"):
        merge_model(tmp_path / "ckpt", out)
    assert (out / "keep.txt").read_text() == "previous model" and not aside.exists()


def test_bad_arguments_exit_2(tmp_path):
    from dpo_dist.post.merge import MergeArgumentError, merge_model

    res = _cli("--checkpoint", tmp_path / "nope", "--output", tmp_path / "out", "--max_shard_size", "2GB")
    assert res.returncode == 2 and "no such folder" in res.stdout and "Traceback" not in res.stdout, res.stdout[-2000:]
    res = _cli("--checkpoint", tmp_path / "nope", "--output", tmp_path / "out", "--frobnicate")
    assert res.returncode == 2 and "unknown arguments ['--frobnicate']" in res.stdout and "Traceback" not in res.stdout
    (tmp_path / "empty").mkdir()
    with pytest.raises(MergeArgumentError, match="not a model folder"):
        merge_model(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(MergeArgumentError, match="max_shard_size"):
        merge_model(tmp_path / "empty", tmp_path / "out", max_shard_size="lots")
    with pytest.raises(MergeArgumentError, match="contains"):
        merge_model(tmp_path / "empty", tmp_path)
    assert not (tmp_path / "out").exists()


def test_overwrite_never_replaces_a_folder_that_is_not_a_model(tmp_path):
    """`merge --output ~ --overwrite` must not move a home folder aside and delete it: refused, nothing changed."""
    from dpo_dist.post.merge import MergeArgumentError, merge_model

    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(MergeArgumentError, match="not a model folder"):
        merge_model(tmp_path / "ckpt", home, overwrite=True)
    assert [p.name for p in home.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "home"]
