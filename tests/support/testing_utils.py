"""Helpers shared by the tests and the bench for launching real CPU ranks on this machine."""

from __future__ import annotations

import os
import random
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = map(int, open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A port free now, for a rank rendezvous, chosen BELOW the kernel's ephemeral range: a port the kernel hands
    out (bind to 0) is what gloo's own connections of concurrent runs get next, so the rendezvous store could
    find it taken (EADDRINUSE) by the time it binds."""
    lo, _ = _ephemeral_range()
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, lo - 12000), lo)
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
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
