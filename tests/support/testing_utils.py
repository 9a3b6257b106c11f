"""Helpers shared by the tests and the bench for launching real CPU ranks on this machine."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(**extra) -> dict:
    """This process's environment for CPU ranks (gloo), offline, with the project importable."""
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
        PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env
