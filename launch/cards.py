"""How many cards this node has for a hardware, read without torch: `*_VISIBLE_DEVICES`, `hl-smi` and the
CPU count. The launcher checks `--cards` against it before it writes anything; `doctor` reports it."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Mapping

from dpo_dist.backend import BACKENDS
from launch.plan import HARDWARE

HL_SMI_INDEX = ("hl-smi", "-Q", "index", "-f", "csv,noheader")  # one line per Gaudi card this process can see
TOOL_TIMEOUT_S = 15.0


def visible_ids(value: str | None) -> list[str] | None:
    """'0,1,2' -> ['0', '1', '2']; unset, '' or 'all' -> None (no restriction)."""
    if value is None or value.strip().lower() in ("", "all"):
        return None
    return [x.strip() for x in value.split(",") if x.strip()]


def run_tool(argv: tuple[str, ...] | list[str], timeout: float = TOOL_TIMEOUT_S) -> str | None:
    """stdout of a fixed tool command (never a shell), or None if it is missing or fails."""
    exe = shutil.which(argv[0])
    if exe is None:
        return None
    try:
        proc = subprocess.run([exe, *argv[1:]], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def hl_smi_count(run: Callable[[tuple[str, ...]], str | None] = run_tool) -> int | None:
    """Gaudi cards hl-smi lists on this node (None without hl-smi, or when it fails or lists none)."""
    out = run(HL_SMI_INDEX)
    n = None if out is None else len([x for x in out.splitlines() if x.strip()])
    return n or None


def available_cards(hardware: str, environ: Mapping[str, str] | None = None, cpu_count: int | None = None,
                    hl_smi: Callable[[], int | None] | None = hl_smi_count) -> tuple[int | None, str]:
    """(count, where it comes from) of the cards this node has for `hardware`, or (None, why unknown).
    The device's visible-devices variable wins; a Gaudi without one asks `hl-smi`; never imports torch."""
    env = os.environ if environ is None else environ
    device = HARDWARE[hardware].device if hardware in HARDWARE else None
    if device == "cpu":
        cores = cpu_count if cpu_count is not None else os.cpu_count()
        return (cores, f"this machine has {cores} CPU cores") if cores else (None, "os.cpu_count() is unknown")
    if device not in BACKENDS or not BACKENDS[device].visible_devices_env:
        return None, "unknown hardware"
    var = BACKENDS[device].visible_devices_env
    ids = visible_ids(env.get(var))
    if ids is not None:
        return len(ids), f"{var}={env[var]} makes {len(ids)} visible"
    if device == "hpu":
        n = hl_smi() if hl_smi else None
        return (n, f"hl-smi lists {n}") if n else (None, f"no {var} list and no hl-smi")
    return None, f"{var} is not set"
