"""DeepSpeed JSON configs from the ds_configs/ templates and a Plan.

The templates (``ds_configs/zero{0,1,2,3}.json``, ``zero3_offload.json``) are usable as is
with the HF Trainer's ``--deepspeed``: batch sizes, clipping, precision and the
hidden-size-based buckets are "auto", which the Trainer fills in. They carry no
"optimizer" / "scheduler" sections on purpose: the Trainer builds them, so one config works
on HPU, CUDA and CPU.

``build_ds_config`` fills every "auto" itself, with the same rules HF uses
(``reduce_bucket_size`` = h², ``stage3_prefetch_bucket_size`` = 0.9·h²,
``stage3_param_persistence_threshold`` = 10·h), so the file written next to a run states
exactly what the planner sized the memory for. Hand-written because nothing maps a plan to
a config; the parsing check is DeepSpeed's own ``DeepSpeedConfig`` (tests/launch/test_dsconfig.py).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from dpo_dist.util.atomic import write_json_atomic
from dpo_dist.util.paths import REPO_ROOT
from launch.plan import HARDWARE, Plan
from launch.plan.specs import ModelSpec

# Source tree layout: <repo>/launch/dsconfig.py and <repo>/ds_configs/*.json. An installed
# package must ship ds_configs/ next to launch/ (or set DPO_DIST_DS_CONFIGS).
TEMPLATE_DIR = Path(os.environ.get("DPO_DIST_DS_CONFIGS") or REPO_ROOT / "ds_configs")

_OFFLOAD_CPU = {"device": "cpu", "pin_memory": True}


def template_name(zero_stage: int, offload: str) -> str:
    """The template a plan starts from: zero3_offload.json for any ZeRO-3 offload."""
    if zero_stage == 3 and offload != "none":
        return "zero3_offload.json"
    return f"zero{zero_stage}.json"


def load_template(name: str) -> dict:
    path = TEMPLATE_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed template {path} not found (TEMPLATE_DIR={TEMPLATE_DIR})")
    return json.loads(path.read_text())


def _autos(node, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _autos(v, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if node == "auto" else []


def build_ds_config(plan: Plan, spec: ModelSpec) -> dict:
    """A complete DeepSpeed config for ``plan`` (no "auto" left)."""
    cfg = copy.deepcopy(load_template(template_name(plan.zero_stage, plan.offload)))
    hw = HARDWARE.get(plan.hardware)
    autocast = plan.bf16 and hw is not None and hw.backend.bf16_autocast
    h = spec.hidden_size

    cfg["train_micro_batch_size_per_gpu"] = plan.micro_batch_size
    cfg["gradient_accumulation_steps"] = plan.gradient_accumulation_steps
    cfg["train_batch_size"] = plan.micro_batch_size * plan.gradient_accumulation_steps * plan.world_size
    cfg["gradient_clipping"] = 1.0
    cfg["bf16"] = {"enabled": plan.bf16 and not autocast}
    cfg["fp16"] = {"enabled": False}
    if autocast:  # fp32 weights, bf16 matmuls and bf16 gathers of the linear weights: DeepSpeed's own autocast
        cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}

    zo = cfg["zero_optimization"]
    zo["reduce_bucket_size"] = h * h
    if plan.zero_stage == 3:
        zo["stage3_prefetch_bucket_size"] = int(0.9 * h * h)
        zo["stage3_param_persistence_threshold"] = 10 * h
        zo["stage3_gather_16bit_weights_on_model_save"] = True
    if plan.offload == "none":
        zo.pop("offload_optimizer", None)
        zo.pop("offload_param", None)
    else:
        zo["offload_optimizer"] = dict(_OFFLOAD_CPU)
        if plan.offload == "optimizer+params":
            zo["offload_param"] = dict(_OFFLOAD_CPU)
        else:
            zo.pop("offload_param", None)

    left = _autos(cfg)
    if left:
        raise ValueError(f"template {template_name(plan.zero_stage, plan.offload)} has unfilled 'auto' keys: {left}")
    return cfg


def write_ds_config(cfg: dict, path: str | os.PathLike) -> Path:
    """Write ``cfg`` as JSON atomically (temp file in the same folder, then os.replace)."""
    return write_json_atomic(path, cfg)
