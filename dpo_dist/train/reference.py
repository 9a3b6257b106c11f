"""Where the reference model lives: the one rule, for every backend and for the planner's words.

``adapter``: the LoRA policy with its adapters disabled (no memory). ``sharded``: a second model,
partitioned by ZeRO-3, no optimizer. ``replicated``: a second full copy per card (below ZeRO-3).
``precomputed``: dpo-dist's reference log-prob cache (``refcache.py``), no reference in memory while
training.
"""

from __future__ import annotations

from dpo_dist.args import ArgumentError


def resolve_reference(reference: str, use_peft: bool, zero_stage: int) -> str:
    """The one rule for where the reference lives, on every backend.

    auto → adapter with LoRA; otherwise a second model, sharded under ZeRO-3, replicated below it.
    ``precomputed`` (dpo-dist's cache) works under any stage.
    """
    if reference == "auto":
        if use_peft:
            return "adapter"
        return "sharded" if zero_stage == 3 else "replicated"
    if reference == "adapter" and not use_peft:
        raise ArgumentError("--reference adapter needs --use_peft (the reference is the adapter-disabled model).")
    if reference == "sharded" and zero_stage != 3:
        raise ArgumentError(
            f"--reference sharded needs a ZeRO-3 --deepspeed config (this one is stage {zero_stage}); "
            "use ds_configs/zero3.json or --reference replicated."
        )
    if reference == "replicated" and zero_stage == 3:
        raise ArgumentError("--reference replicated is not possible under ZeRO-3 (it shards every model); use sharded.")
    return reference
