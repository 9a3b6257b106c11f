"""Where the reference model lives: the one rule, for every backend and for the planner.

``adapter``: the LoRA policy with its adapters disabled (no memory). ``sharded``: a second model,
partitioned by ZeRO-3, no optimizer. ``replicated``: a second full copy per card (below ZeRO-3).
``precomputed``: dpo-dist's reference log-prob cache (``refcache.py``), no reference in memory while
training, under any ZeRO stage.
"""

from __future__ import annotations

from dpo_dist.util.errors import ArgumentError

REFERENCES = ("adapter", "sharded", "replicated", "precomputed")
REFERENCE_CHOICES = ("auto", *REFERENCES)


def reference_problem(reference: str, use_peft: bool, zero_stage: int | None) -> str | None:
    """Why `reference` cannot hold the reference for this run (None: it can). `zero_stage` None: not known yet,
    only the stage-independent rules apply."""
    if reference not in REFERENCES:
        return f"--reference {reference!r}: expected one of {', '.join(REFERENCE_CHOICES)}."
    if reference == "adapter" and not use_peft:
        return "--reference adapter needs --use_peft (the reference is the adapter-disabled model)."
    if reference == "sharded" and zero_stage is not None and zero_stage != 3:
        return (f"--reference sharded needs a ZeRO-3 --deepspeed config (this one is stage {zero_stage}); "
                "use ds_configs/zero3.json or --reference replicated.")
    if reference == "replicated" and zero_stage == 3:
        return "--reference replicated is not possible under ZeRO-3 (it shards every model); use sharded."
    return None


def candidate_references(use_peft: bool, zero_stage: int, cache: bool) -> tuple[str, ...]:
    """The references `auto` may pick for this run, best first: the adapter with LoRA, else a second model
    (sharded under ZeRO-3, replicated below it); the cache too when it may be used."""
    wanted = ("adapter",) if use_peft else ("sharded", "replicated")
    wanted += ("precomputed",) if cache else ()
    return tuple(r for r in wanted if reference_problem(r, use_peft, zero_stage) is None)


def resolve_reference(reference: str, use_peft: bool, zero_stage: int) -> str:
    """The reference a run uses: `auto` → the first candidate without the cache; otherwise `reference`, when it
    can hold the reference here (an ArgumentError naming the fix when it cannot)."""
    if reference == "auto":
        return candidate_references(use_peft, zero_stage, cache=False)[0]
    problem = reference_problem(reference, use_peft, zero_stage)
    if problem:
        raise ArgumentError(problem)
    return reference
