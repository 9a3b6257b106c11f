"""The LoRA target modules the ranks train by default, per model family.

One rule for the ranks (``dpo_dist.model.loader.lora_config``, when ``--lora_target_modules`` is not given)
and the launcher's planner (which sizes the adapter the ranks will train). Torch-free: the launcher imports it.
"""

from __future__ import annotations

# All attention and MLP projections: the usual LoRA recipe for both families.
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gemma3": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
# peft's keyword for every linear layer but the output head: the default for a family without a row above.
ALL_LINEAR = "all-linear"


def default_lora_targets(family: str) -> list[str] | str:
    """The modules LoRA adapts for a model ``family`` (``llama``, ``gemma3``: see ``loader.family_of``) when none
    are given: its row of ``LORA_TARGETS`` (a new list, as peft's ``target_modules`` takes it), or ``ALL_LINEAR``."""
    targets = LORA_TARGETS.get(family)
    return list(targets) if targets is not None else ALL_LINEAR
