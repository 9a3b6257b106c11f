"""The LoRA target modules the ranks train by default, per model family.

One rule for the ranks (``dpo_dist.model.loader.lora_config``, when ``--lora_target_modules`` is not given)
and the launcher's planner (which sizes the adapter the ranks will train and prints the list). Torch-free: the
launcher imports it.

Targets are leaf module names, as peft matches them (a name matches every module whose path ends in it): each
family's attention and MLP projections by name. For a mixture of experts they are the experts' projections (every
expert's) and, in Qwen2-MoE, the shared expert's; never the router (``gate``, which routes tokens) or
``shared_expert_gate``, which peft's ``all-linear`` would wrap too.
"""

from __future__ import annotations

_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")

LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": _ATTENTION + _MLP,
    "mistral": _ATTENTION + _MLP,
    "qwen2": _ATTENTION + _MLP,
    "qwen3": _ATTENTION + _MLP,
    "gemma": _ATTENTION + _MLP,
    "gemma2": _ATTENTION + _MLP,
    "gemma3": _ATTENTION + _MLP,
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),  # fused q/k/v and gate/up projections
    "mixtral": _ATTENTION + ("w1", "w3", "w2"),  # each expert's gate (w1), up (w3) and down (w2) projections
    "qwen2_moe": _ATTENTION + _MLP,  # the experts' and the shared expert's projections
    "qwen3_moe": _ATTENTION + _MLP,  # the experts' projections
}
# peft's keyword for every linear layer but the output head: the default for a family without a row above (the
# planner refuses such families; a rank started on one directly still trains).
ALL_LINEAR = "all-linear"


def default_lora_targets(family: str) -> list[str] | str:
    """The modules LoRA adapts for a model ``family`` (the model_type, ``gemma3_text`` as ``gemma3``: see
    ``loader.family_of``) when none are given: its row of ``LORA_TARGETS`` (a new list, as peft's
    ``target_modules`` takes it), or ``ALL_LINEAR``."""
    targets = LORA_TARGETS.get(family)
    return list(targets) if targets is not None else ALL_LINEAR
