"""The one place that tells hpu, cuda and cpu apart (DESIGN.md §1).

Everything else asks this module: which device, which distributed backend, which
DeepSpeed accelerator, which trainer API, how to read peak memory. Habana modules are
imported only when the device is hpu.
"""

from __future__ import annotations

import importlib.util
import os
import resource
import sys
from dataclasses import dataclass

DEVICES = ("hpu", "cuda", "cpu")


@dataclass(frozen=True)
class Backend:
    device: str  # hpu | cuda | cpu
    dist_backend: str  # hccl | nccl | gloo
    ds_accelerator: str  # DS_ACCELERATOR value
    trainer_api: str  # "gaudi" (optimum-habana GaudiDPOTrainer, trl 0.9.6 style) | "trl" (trl 0.22 DPOTrainer)

    @property
    def env(self) -> dict[str, str]:
        """Environment a rank of this backend needs before Python starts (the launcher sets it too)."""
        env = {"DS_ACCELERATOR": self.ds_accelerator}
        if self.device == "hpu":
            # The default became 0 in SynapseAI 1.21; GaudiDPOTrainer expects lazy mode.
            env.update({"PT_HPU_LAZY_MODE": "1", "PT_ENABLE_INT64_SUPPORT": "1"})
        return env


_BACKENDS = {
    "hpu": Backend("hpu", "hccl", "hpu", "gaudi"),
    "cuda": Backend("cuda", "nccl", "cuda", "trl"),
    "cpu": Backend("cpu", "gloo", "cpu", "trl"),
}


def _hpu_available() -> bool:
    if importlib.util.find_spec("habana_frameworks") is None:
        return False
    try:
        import habana_frameworks.torch.hpu as hthpu  # noqa: PLC0415 (HPU only)

        return bool(hthpu.is_available())
    except Exception:  # a broken Habana install is reported as "no HPU"
        return False


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def detect_device(requested: str = "auto") -> str:
    """`requested` is auto|hpu|cuda|cpu. DS_ACCELERATOR set by a launcher also counts as a request."""
    if requested in (None, "", "auto"):
        requested = os.environ.get("DS_ACCELERATOR", "auto")
    if requested in DEVICES:
        return requested
    if requested != "auto":
        raise ValueError(f"--device {requested!r}: expected one of auto, {', '.join(DEVICES)}.")
    if _hpu_available():
        return "hpu"
    if _cuda_available():
        return "cuda"
    return "cpu"


def get_backend(requested: str = "auto") -> Backend:
    return _BACKENDS[detect_device(requested)]


def apply_env(backend: Backend) -> None:
    """Set the backend's variables for this process (no-op for those already set by a launcher)."""
    for key, value in backend.env.items():
        os.environ.setdefault(key, value)


def peak_memory_bytes(backend: Backend) -> int:
    """Peak memory of this process on its device: HBM on hpu/cuda, resident set on cpu."""
    if backend.device == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated())
    if backend.device == "hpu":
        import habana_frameworks.torch.hpu as hthpu  # noqa: PLC0415 (HPU only)

        return int(hthpu.max_memory_allocated())
    # ru_maxrss is KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def cleanup_shm_buffers(port, rank=None, shm_dir: str = "/dev/shm") -> int:
    """Remove DeepSpeed's CPU shared-memory all-reduce buffers of the run on `port` (one rank's, or all).

    DeepSpeed's CPU backend leaves `deepspeed_allreduce_buffer_<n>_<addr>_<port>_<rank>` (69 MB each) in
    /dev/shm even after a clean exit; a test suite or a bench then fills the tmpfs and gets OOM-killed.
    Unlinking is safe once the process group is gone (a mapping that is still open keeps its memory).
    Returns how many files were removed.
    """
    import glob

    removed = 0
    pattern = f"deepspeed_allreduce_buffer_*_{port}_{'*' if rank is None else rank}"
    for path in glob.glob(os.path.join(shm_dir, pattern)):
        try:
            os.unlink(path)
            removed += 1
        except OSError:
            pass
    return removed
