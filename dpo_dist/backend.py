"""The one place that tells hpu, cuda and cpu apart.

Everything else asks this module: which device, which distributed backend, which DeepSpeed
accelerator, which trainer API, what the engine must do for the device (static shapes, how packed
rows keep their attention apart, extra forward keywords), how to read peak memory and the rank.
The differences are data in ``BACKENDS``, one row per device. Habana modules are imported only
when the device is hpu. The launcher's planner reads the same rows (``launch.plan.hardware.Hardware.backend``),
so this module stays torch-free at import.

The Gaudi twin (``DPO_DIST_HPU_TWIN=1``, a development aid): the HPU path (optimum-habana's
``GaudiDPOTrainer``, ``GaudiConfig``, its model adaptation, the engine's static shapes and block
masks) runs on CPU with gloo, so that optimum-habana's real code can be driven on a machine without
a Gaudi. It needs a ``habana_frameworks`` stand-in on the path (tests/support/habana_shim) and the
Gaudi pins (``make setup-gaudi-twin``); nothing else changes.
"""

from __future__ import annotations

import importlib.util
import os
import resource
import sys
from dataclasses import dataclass, field

DEVICES = ("hpu", "cuda", "cpu")
TWIN_ENV = "DPO_DIST_HPU_TWIN"

# Set before Python starts on every HPU rank: lazy mode (the default became eager in SynapseAI 1.21, and
# GaudiDPOTrainer runs lazy) and 64-bit integer support.
HPU_ENV = {"PT_HPU_LAZY_MODE": "1", "PT_ENABLE_INT64_SUPPORT": "1"}
# Habana's DeepSpeed user guide: "flags that should be set ... to handle Out of Memory issues in large models"
# under ZeRO-3: cap lazy graphs at 1000 ops, let the memory pool take all of HBM, and sync ZeRO-3 with mark_step.
HPU_ZERO3_ENV = {"PT_HPU_MAX_COMPOUND_OP_SIZE": "1000", "PT_HPU_POOL_MEM_ACQUIRE_PERC": "100",
                 "DEEPSPEED_HPU_ZERO3_SYNC_MARK_STEP_REQUIRED": "1"}


@dataclass(frozen=True)
class Backend:
    device: str  # hpu | cuda | cpu: where tensors live
    dist_backend: str  # hccl | nccl | gloo
    ds_accelerator: str  # DS_ACCELERATOR value
    trainer_api: str  # "gaudi" (optimum-habana GaudiDPOTrainer, trl 0.9.6 style) | "trl" (trl 0.22 DPOTrainer)
    # Graph-compiling device: every new tensor shape is a compile, so batches come in a few fixed shapes.
    static_shapes: bool = False
    # How packed rows keep attention apart (dpo_dist/model/packing.py): "varlen" (transformers' attention interface,
    # per-row kernels) or "block_mask" (a 4D block-diagonal mask into the model's own attention code).
    packing_attention: str = "varlen"
    # The DPO forward's attention keeps no s x s score matrix (HPU FusedSDPA, CUDA flash / memory-efficient SDPA). False
    # on CPU: torch's CPU SDPA may take its flash kernel, but the planner keeps the score term for unpacked CPU rows, as
    # its CPU calibration did (launch/plan/memory.py).
    fused_sdpa: bool = True
    # A ZeRO-0 run is plain DDP (gaudi_spawn --use_mpi), not DeepSpeed: GaudiDPOTrainer then keeps Habana's fused
    # AdamW, as optimum-habana's own DPO baseline runs.
    ddp_without_deepspeed: bool = False
    # Keywords for every model forward: optimum-habana's Gaudi attention takes FusedSDPA only when asked.
    forward_kwargs: dict = field(default_factory=dict)
    # Set on every rank of a ZeRO-3 plan (values already in the environment win): Habana's large-model memory flags.
    zero3_env: dict = field(default_factory=dict)
    # The variable that lists the cards a process may use ("0,1,2", unset or "all": every card); None on CPU.
    visible_devices_env: str | None = None
    twin: bool = False  # the HPU path, run on CPU (see the module docstring)
    # How --bf16 runs. False: the weights are bf16 (DeepSpeed's bf16 mode / HF's bf16). True (CPU): the weights stay
    # fp32 and DeepSpeed's ``torch_autocast`` runs the matmuls in bf16 (AMX on recent Xeons) and gathers the linear
    # layers' weights in bf16; the HF Trainer refuses bf16=True on CPU ranks under DeepSpeed, so its flag stays off.
    bf16_autocast: bool = False

    @property
    def env(self) -> dict[str, str]:
        """Environment a rank of this backend needs before Python starts (the launcher sets it too)."""
        env = {"DS_ACCELERATOR": self.ds_accelerator}
        if self.device == "hpu":
            env.update(HPU_ENV)
        return env


_HPU_ENGINE = dict(static_shapes=True, packing_attention="block_mask", forward_kwargs={"use_flash_attention": True})
BACKENDS = {
    "hpu": Backend("hpu", "hccl", "hpu", "gaudi", ddp_without_deepspeed=True, visible_devices_env="HABANA_VISIBLE_DEVICES",
                   zero3_env=HPU_ZERO3_ENV, **_HPU_ENGINE),
    "cuda": Backend("cuda", "nccl", "cuda", "trl", visible_devices_env="CUDA_VISIBLE_DEVICES"),
    "cpu": Backend("cpu", "gloo", "cpu", "trl", fused_sdpa=False, bf16_autocast=True),
}
# The HPU row's facts on CPU: the same Gaudi attention calls (FusedSDPA through the stand-in) and ZeRO-0 as DDP.
TWIN = Backend("cpu", "gloo", "cpu", "gaudi", twin=True, ddp_without_deepspeed=True, **_HPU_ENGINE)


def twin_requested(environ=None) -> bool:
    env = os.environ if environ is None else environ
    return env.get(TWIN_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _hpu_available() -> bool:
    if importlib.util.find_spec("habana_frameworks") is None:
        return False
    try:
        import habana_frameworks.torch.hpu as hthpu  # deferred: HPU only

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
    """The backend for `requested`; with $DPO_DIST_HPU_TWIN set, a request for hpu (or auto) is the twin."""
    if twin_requested() and requested in (None, "", "auto", "hpu"):
        return TWIN
    return BACKENDS[detect_device(requested)]


def apply_env(backend: Backend) -> None:
    """Set the backend's variables for this process (no-op for those already set by a launcher)."""
    for key, value in backend.env.items():
        os.environ.setdefault(key, value)


def _env_int(names, default: int) -> int:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return default


def global_rank() -> int:
    """This process's rank under any launcher: torchrun/DeepSpeed (RANK) or MPI (gaudi_spawn --use_mpi)."""
    return _env_int(("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"), 0)


def world_size() -> int:
    """Ranks in the job under any launcher (see `global_rank`)."""
    return _env_int(("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"), 1)


def peak_memory_bytes(backend: Backend) -> int:
    """Peak memory of this process on its device: HBM on hpu/cuda, resident set on cpu."""
    if backend.device == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated())
    if backend.device == "hpu":
        import habana_frameworks.torch.hpu as hthpu  # deferred: HPU only

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
