"""Shared fixtures: the tiny assets, and real multi-process launches under a hard timeout."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dpo_dist.backend import cleanup_shm_buffers
from dpo_dist.testing_utils import ROOT, cpu_env, free_port  # noqa: F401 (re-exported to the tests)

PY = sys.executable


def run_cmd(argv, *, timeout: float, env=None, cwd=None) -> subprocess.CompletedProcess:
    """Run argv in its own process group; on timeout kill the whole group and fail the test."""
    proc = subprocess.Popen(
        argv, cwd=cwd or ROOT, env=env or cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"timed out after {timeout}s: {' '.join(map(str, argv))}\n{out[-4000:]}")
    finally:
        words = [str(a) for a in argv]
        if "--master_port" in words:  # DeepSpeed's CPU all-reduce buffers of killed ranks stay in /dev/shm
            cleanup_shm_buffers(words[words.index("--master_port") + 1])
    return subprocess.CompletedProcess(argv, proc.returncode, out, None)


def run_ranks(script_args, *, nproc: int = 2, timeout: float = 300, module: str = "dpo_dist.dpo", env=None):
    """`deepspeed --num_accelerators N --module <module> <args>` on CPU (gloo)."""
    argv = [PY, "-m", "deepspeed.launcher.runner", "--num_accelerators", str(nproc), "--master_port", str(free_port()),
            "--module", module, *map(str, script_args)]
    return run_cmd(argv, timeout=timeout, env=env)


@pytest.fixture(scope="session")
def tiny_assets():
    from dpo_dist.tiny import ensure_tiny_assets

    return ensure_tiny_assets()


@pytest.fixture(scope="session")
def zero3_config(tmp_path_factory) -> Path:
    """The repo's ZeRO-3 template, used as-is with --deepspeed."""
    path = ROOT / "ds_configs" / "zero3.json"
    assert path.exists(), "ds_configs/zero3.json is missing"
    return path


@functools.lru_cache(maxsize=None)
def bench_row_lengths(n: int = 1000, max_length: int = 1024) -> list[tuple[int, int]]:
    """(chosen, rejected) row lengths (prompt + response + EOS) of the first n long-tailed bench pairs."""
    from transformers import AutoTokenizer

    from dpo_dist.data import split_hh_transcript
    from dpo_dist.tiny import ensure_bench_assets

    a = ensure_bench_assets()
    tok = AutoTokenizer.from_pretrained(a.tokenizer_dir)
    rows = [json.loads(x) for x in open(a.train_file)][:n]
    out = []
    for i, r in enumerate(rows):
        p, c, rj = split_hh_transcript(r["chosen"], r["rejected"], i)
        n_p = len(tok(tok.bos_token + p, add_special_tokens=False)["input_ids"])
        out.append(tuple(min(max_length, n_p + len(tok(x, add_special_tokens=False)["input_ids"]) + 1) for x in (c, rj)))
    return out


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())
