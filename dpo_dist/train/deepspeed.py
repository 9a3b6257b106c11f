"""The --deepspeed config as the ranks read it: one reader, checked, with errors that name the fix."""

from __future__ import annotations

import json

from dpo_dist.util.errors import ArgumentError


def read_ds_config(ds_config) -> dict | None:
    """The --deepspeed config as a dict (a JSON file path, a JSON string or a dict); None without DeepSpeed."""
    if ds_config in (None, ""):
        return None
    if isinstance(ds_config, dict):
        cfg, name = ds_config, "config"
    else:
        name = str(ds_config)
        try:
            if name.lstrip().startswith("{"):
                cfg = json.loads(name)
            else:
                with open(name) as fh:
                    cfg = json.load(fh)
        except OSError as e:
            raise ArgumentError(f"--deepspeed {name}: cannot read it ({e.strerror}).") from e
        except json.JSONDecodeError as e:
            raise ArgumentError(
                f"--deepspeed {name}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}). "
                "Start from a template in ds_configs/."
            ) from e
    if not isinstance(cfg, dict):
        raise ArgumentError(
            f"--deepspeed {name}: expected a JSON object ({{...}}), got a JSON {type(cfg).__name__}. "
            "Start from a template in ds_configs/."
        )
    zero = cfg.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ArgumentError(
            f"--deepspeed {name}: zero_optimization must be an object such as {{\"stage\": 3}}, "
            f"got {zero!r}. Start from a template in ds_configs/."
        )
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ArgumentError(
            f"--deepspeed {name}: zero_optimization.stage must be 0, 1, 2 or 3 (got {stage!r}). "
            "Fix the number (3 shards parameters, gradients and optimizer state), or start from ds_configs/zero3.json."
        )
    return cfg


def weights_bf16(backend, bf16: bool) -> bool:
    """Whether --bf16 loads the weights in bf16 (and turns on the HF Trainer's bf16): not where the backend runs bf16
    as DeepSpeed's torch_autocast over fp32 weights (CPU; ``Backend.bf16_autocast``)."""
    return bool(bf16) and not backend.bf16_autocast


def check_bf16(backend, bf16: bool, ds_config) -> None:
    """--bf16 on a backend that runs it as DeepSpeed's torch_autocast needs that section in the --deepspeed config
    (the launcher writes it); without it the run would silently train in fp32."""
    if not bf16 or not backend.bf16_autocast:
        return
    cfg = read_ds_config(ds_config)
    if not cfg or not (cfg.get("torch_autocast") or {}).get("enabled"):
        raise ArgumentError(
            f"--bf16 on {backend.device} ranks runs as DeepSpeed's torch_autocast over fp32 weights, and --deepspeed "
            f"{ds_config or '(none)'} has no enabled torch_autocast section. Fix: launch with `python -m launch train "
            "--bf16 true`, which writes it, or add \"torch_autocast\": {\"enabled\": true, \"dtype\": \"bfloat16\"} "
            "to the config, or drop --bf16.")


def zero_stage_of(ds_config) -> int:
    """ZeRO stage named in the --deepspeed config (0 when no DeepSpeed)."""
    cfg = read_ds_config(ds_config)
    return int(cfg.get("zero_optimization", {}).get("stage", 0)) if cfg else 0
