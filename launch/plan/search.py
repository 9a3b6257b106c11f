"""Plan search for DPO under DeepSpeed ZeRO: the fastest configuration that fits, or the leanest with a suggestion.

Every ZeRO stage x offload x reference x gradient checkpointing x micro-batch is sized by the memory
model (launch/plan/memory.py) and timed by the speed model (launch/plan/speed.py). The micro-batch stays
at most global batch / cards (and the rank's share of the training pairs, when known); a candidate fits
when its per-card total is within ``safety_margin`` of the card memory and its offloaded states within
``safety_margin`` of the node's host RAM. The fastest fitting candidate wins; ties go to the simpler plan
(lower stage, no offload, no recompute, then ``REFERENCE_PREFERENCE``). When nothing fits, the leanest is
shown with a ``Suggestion``: allow offload, or the smallest world size (up to ``MAX_SUGGESTED_NODES`` nodes)
that fits. Pure: no torch, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from dpo_dist.train.reference import candidate_references, reference_problem
from launch.plan.hardware import Hardware
from launch.plan.memory import card_memory, host_gib
from launch.plan.report import format_count
from launch.plan.specs import ModelSpec
from launch.plan.speed import step_time, with_throughput
from launch.plan.types import OFFLOADS, STAGES, Memory, Plan, PlanOptions, Suggestion

# Equal estimated speed: the reference that holds less memory wins (the cache also makes restarts and
# sweeps over beta / lr on the same data skip the reference entirely).
REFERENCE_PREFERENCE = ("adapter", "precomputed", "sharded", "replicated")
MAX_SUGGESTED_NODES = 64


@dataclass(frozen=True)
class _Candidate:
    stage: int
    offload: str
    mb: int
    gc: bool
    reference: str
    memory: Memory
    host_gib: float  # host RAM per node that offload needs
    ga: int
    step_time: float
    tokens_per_s: float


def _references(hw: Hardware, opts: PlanOptions, stage: int) -> tuple[str, ...]:
    # "precomputed" only when asked for, or with reference_cache (dpo-dist's cache frees the reference during
    # training, under any ZeRO stage).
    if opts.reference != "auto":
        return (opts.reference,) if reference_problem(opts.reference, opts.use_peft, stage) is None else ()
    return candidate_references(opts.use_peft, stage, cache=opts.cached_reference)


def _offloads(hw: Hardware, opts: PlanOptions, stage: int) -> tuple[str, ...]:
    if stage == 0 or not (opts.allow_offload and hw.offload_supported):
        return ("none",)
    return ("none", "optimizer", "optimizer+params") if stage == 3 else ("none", "optimizer")


def _nodes(hw: Hardware, opts: PlanOptions) -> int:
    return opts.node_count(hw.cards_per_node)


def _candidates(spec: ModelSpec, hw: Hardware, opts: PlanOptions) -> list[_Candidate]:
    N, nodes = opts.cards, _nodes(hw, opts)
    # Keep the global batch near its target: no micro-batch beyond global_batch / N (but >= 1).
    mb_cap = max(1, opts.global_batch_size // N)
    if opts.train_pairs:
        mb_cap = min(mb_cap, max(1, -(-opts.train_pairs // N)))
    mbs = sorted({m for m in opts.micro_batch_sizes if m <= mb_cap} or {min(opts.micro_batch_sizes)})
    out = []
    for stage in STAGES if opts.zero_stage is None else (opts.zero_stage,):
        for offload in _offloads(hw, opts, stage):
            for reference in _references(hw, opts, stage):
                for gc in (False, True):
                    for mb in mbs:
                        mem = card_memory(spec, hw, opts, stage, offload, mb, gc, reference)
                        ga = math.ceil(opts.global_batch_size / (mb * N))
                        t = step_time(spec, hw, opts, nodes, stage, offload, mb, gc, reference, ga)
                        out.append(_Candidate(stage, offload, mb, gc, reference, mem,
                                              host_gib(spec, hw, opts, offload, reference), ga, t,
                                              ga * mb * N * 2 * opts.max_length / t))
    return out


def _budget_gib(hw: Hardware, opts: PlanOptions) -> float:
    return (opts.card_memory_gib or hw.card_memory_gib) * opts.safety_margin


def _host_budget_gib(hw: Hardware, opts: PlanOptions) -> float:
    return (opts.host_memory_gib or hw.host_memory_gib) * opts.safety_margin


def _speed_key(c: _Candidate):
    # Fastest first; ties go to the simpler plan (lower stage, no offload, no recompute).
    return (-round(c.tokens_per_s, 3), c.stage, OFFLOADS.index(c.offload), c.gc, REFERENCE_PREFERENCE.index(c.reference),
            c.mb)


def _best(spec: ModelSpec, hw: Hardware, opts: PlanOptions) -> tuple[bool, _Candidate]:
    cands = _candidates(spec, hw, opts)
    budget, host_budget = _budget_gib(hw, opts), _host_budget_gib(hw, opts)
    fitting = [c for c in cands if c.memory.total <= budget and c.host_gib <= host_budget]
    if fitting:
        return True, min(fitting, key=_speed_key)
    return False, min(cands, key=lambda c: (c.host_gib > host_budget, c.memory.total, _speed_key(c)))


def _world_sizes_above(cards: int, per_node: int) -> list[int]:
    sizes = [2**k for k in range(1, 8) if cards < 2**k < per_node]
    sizes += [k * per_node for k in range(1, MAX_SUGGESTED_NODES + 1) if k * per_node > cards]
    return sizes


def _suggest(spec: ModelSpec, hw: Hardware, opts: PlanOptions, best: _Candidate) -> Suggestion:
    budget = _budget_gib(hw, opts)
    head = (f"Does not fit on {opts.cards} {hw.name} card(s): the leanest plan needs {best.memory.total:.1f} GiB "
            f"per card, the budget is {budget:.1f} GiB ({opts.safety_margin:.0%} of "
            f"{opts.card_memory_gib or hw.card_memory_gib:.2f} GiB).")
    on_card = [c for c in _candidates(spec, hw, opts) if c.memory.total <= budget]
    if on_card:
        c = min(on_card, key=lambda c: c.host_gib)
        head += (f" ZeRO-{c.stage} with offload={c.offload} would fit the cards but needs {c.host_gib:.0f} GiB "
                 f"of host RAM per node (budget {_host_budget_gib(hw, opts):.0f} GiB).")
    if not opts.allow_offload and hw.offload_supported:
        ok, c = _best(spec, hw, replace(opts, allow_offload=True))
        if ok:
            return Suggestion(f"{head} Allow offload: ZeRO-{c.stage} with offload={c.offload} fits on "
                              f"{opts.cards} card(s).", cards=opts.cards, nodes=_nodes(hw, opts),
                              offload=c.offload, zero_stage=c.stage)
    for n in _world_sizes_above(opts.cards, hw.cards_per_node):
        bigger = replace(opts, cards=n, nodes=None)
        ok, c = _best(spec, hw, bigger)
        if ok:
            nodes = _nodes(hw, bigger)
            where = f"{nodes} nodes x {hw.cards_per_node}" if nodes > 1 else "1 node"
            return Suggestion(f"{head} Smallest fit: {n} {hw.name} cards ({where}) with ZeRO-{c.stage}, "
                              f"offload={c.offload}.", cards=n, nodes=nodes, offload=c.offload, zero_stage=c.stage)
    return Suggestion(f"{head} No size up to {MAX_SUGGESTED_NODES} nodes fits: lower max_length "
                      f"(per-card activations and logits do not shrink with more cards) or use LoRA.")


def _notes(spec: ModelSpec, hw: Hardware, opts: PlanOptions, c: _Candidate, fits: bool) -> tuple[str, ...]:
    N = opts.cards
    per_node = N // _nodes(hw, opts)
    notes = [f"model: {format_count(spec.num_params)} parameters ({spec.source} spec, {spec.family} family)"
             + (f", of which {format_count(spec.extra_params)} outside the text decoder" if spec.extra_params else "")]
    if spec.is_moe:
        notes.append(f"mixture of experts: {spec.num_experts} experts in {spec.moe_layers} of "
                     f"{spec.num_hidden_layers} layers, {spec.num_experts_per_tok} routed per token; memory counts "
                     f"all {spec.num_params / 1e9:.2f}B parameters, FLOPs the {spec.active_text_params / 1e9:.2f}B "
                     "a token goes through")
    if spec.sliding_window and spec.sliding_window < opts.max_length:
        notes.append(f"sliding-window attention ({spec.sliding_window} tokens) on some or all layers: attention "
                     f"memory and FLOPs are counted over whole rows of up to {opts.max_length} tokens (an upper bound)")
    if hw.device == "hpu" and spec.family_row.gaudi != "adapted":
        notes.append(f"optimum-habana 1.21.2 does not adapt {spec.family} models: on Gaudi they run on transformers' "
                     "own modeling code, unoptimised (no fused RoPE, RMSNorm or FusedSDPA kernels), so expect "
                     "less than the estimated throughput")
    if opts.use_peft:  # the modules the ranks adapt: their default for the family unless given
        notes.append(f"LoRA r={opts.lora_r} on {', '.join(opts.lora_targets(spec))}: "
                     f"{format_count(opts.trainable_params(spec))} trainable parameters")
    if c.stage == 3:
        notes.append(f"ZeRO-3 shards parameters, gradients and optimizer state over {N} card(s)")
    elif c.stage > 0:
        what = "optimizer state and gradients" if c.stage == 2 else "optimizer state"
        notes.append(f"ZeRO-{c.stage}: {what} sharded over {N} cards")
    ref_note = {
        "adapter": "reference = the policy with adapters disabled (no extra memory)",
        "sharded": "separate bf16 reference, sharded by ZeRO-3",
        "replicated": "separate bf16 reference replicated on every card",
        "precomputed": "reference log-probs precomputed before training (no reference in memory)",
    }[c.reference]
    notes.append(ref_note)
    if c.stage == 0 and hw.backend.ddp_without_deepspeed:
        notes.append("ZeRO-0 runs as plain DDP (gaudi_spawn --use_mpi, no DeepSpeed), which keeps Habana's fused "
                     "AdamW, as optimum-habana's own DPO baseline runs")
    if c.offload != "none":
        notes.append(f"offload={c.offload}: needs about {c.host_gib:.0f} GiB of host RAM per node "
                     f"(budget {_host_budget_gib(hw, opts):.0f} GiB)")
    if c.gc:
        notes.append("gradient checkpointing on: recomputing activations (one extra forward) buys the memory "
                     "for this micro-batch")
    if c.mb * N >= opts.global_batch_size and c.mb > 1:
        notes.append(f"micro-batch capped so the global batch stays near {opts.global_batch_size} pairs")
    if hw.device == "hpu":
        notes.append(f"HPU overhead calibrated on one measured Gaudi2 point (Llama-2-7B LoRA + separate bf16 "
                     f"reference: 87 GiB): +{hw.overhead:.0%} of the formula total, the part that scales with the "
                     f"parameters (measured: what the fixed part leaves of that point), + {hw.runtime_gib:g} GiB fixed "
                     f"per card (assumed: one point cannot separate the two)")
    if not opts.fused_attention:
        notes.append("non-fused attention: activations include the 5·a·s²·b score term")
    if per_node > hw.cards_per_node:
        notes.append(f"{per_node} cards per node exceeds the {hw.cards_per_node} a {hw.name} node has")
    if not fits:
        notes.append("no configuration fits; the leanest one is shown")
    return tuple(notes)


def make_plan(spec: ModelSpec, hardware: Hardware, options: PlanOptions) -> Plan:
    """Search stage x offload x checkpointing x micro-batch x reference; return the fastest
    plan under the safety margin, or the leanest one with ``fits=False`` and a suggestion. Its throughput counts the
    tokens the ranks measure: real tokens where the data's are known (``speed.with_throughput``; the search ranks by
    step time per pair, which that does not change)."""
    if options.bf16 is not None and options.bf16 != hardware.bf16 and not hardware.backend.bf16_autocast:
        raise ValueError(f"{hardware.name} ranks train in {'bf16' if hardware.bf16 else 'fp32'} weights: bf16="
                         f"{options.bf16} is not available there (only CPU ranks run bf16 as autocast). Fix: leave "
                         "--bf16 out.")
    fits, c = _best(spec, hardware, options)
    nodes = _nodes(hardware, options)
    plan = Plan(
        fits=fits,
        zero_stage=c.stage,
        offload=c.offload,
        micro_batch_size=c.mb,
        gradient_accumulation_steps=c.ga,
        gradient_checkpointing=c.gc,
        reference=c.reference,
        world_size=options.cards,
        nodes=nodes,
        cards_per_node=options.cards // nodes,
        card_memory_gib=options.card_memory_gib or hardware.card_memory_gib,
        hardware=hardware.name,
        model=spec.name,
        use_peft=options.use_peft,
        max_length=options.max_length,
        max_prompt_length=options.max_prompt_length,
        memory_gib=Memory(**{k: round(v, 2) for k, v in asdict(c.memory).items()}),
        est_step_time_s=round(c.step_time, 3),
        est_tokens_per_s=round(c.tokens_per_s, 1),
        notes=_notes(spec, hardware, options, c, fits),
        suggestion=None if fits else _suggest(spec, hardware, options, c),
        length_buckets=options.length_buckets,
        packing=options.packed,
        chunked_logps=options.chunked,
        packing_attention=hardware.backend.packing_attention,
        static_shapes=hardware.backend.static_shapes,
        uses_deepspeed=c.stage > 0 or not hardware.backend.ddp_without_deepspeed,
        bf16=hardware.bf16 if options.bf16 is None else options.bf16,
        model_params=int(spec.num_params),
    )
    return with_throughput(plan, options)
