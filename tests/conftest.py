"""Shared fixtures: the tiny assets, and real multi-process launches under a hard timeout."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dpo_dist.backend import cleanup_shm_buffers

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        # This venv's launchers and its ninja first: a second ninja elsewhere on PATH reads the other's
        # build log as stale and rebuilds DeepSpeed's CPU comm op on every rank start.
        PATH=os.path.dirname(PY) + os.pathsep + env.get("PATH", ""),
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


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


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())
