"""Per-card memory model for DPO under DeepSpeed ZeRO.

Hand-written: no library estimates *DPO* memory (policy + reference + two sequences per
pair + fp32 logits) across ZeRO stages, offload and reference strategies. DeepSpeed's
``estimate_zero2/3_model_states_mem_needs_all_cold`` cover only the model states; they are
the reference that ``model_state_bytes`` is tested against (tests/launch/plan/test_plan.py, within 5%).
Everything here is pure: no torch, no I/O.

Memory per card (bytes; Ψ parameters, N data-parallel cards, p = 2 bytes in bf16, 4 in fp32)
----------------------------------------------------------------------------------------
Model states follow the ZeRO paper plus the fp32 copy of the gradient partition
that DeepSpeed makes for the optimizer step, as DeepSpeed's own estimators count it
(``18 = 2 grads16 + 4 grads32 + 4 params32 + 8 optimizer``)::

    stage 0: 2Ψ + 2Ψ + 4Ψ + 12Ψ       = 20Ψ        (paper: 16Ψ)
    stage 1: 2Ψ + 2Ψ + 16Ψ/N          = 4Ψ + 16Ψ/N (paper: 4Ψ + 12Ψ/N)
    stage 2: 2Ψ + 18Ψ/N                            (paper: 2Ψ + 14Ψ/N)
    stage 3: 2Ψ/N + 4Ψ/N + 12Ψ/N + 4·largest_layer (paper: 16Ψ/N + live params)

For ZeRO-3 the gradients count 4 bytes per parameter per rank, as in DeepSpeed's
``estimate_zero3_model_states_mem_needs`` (18Ψ/N + 4·largest layer): the bf16 partition
plus the fp32 copy DeepSpeed makes one sub-group (``sub_group_size``) at a time. The
estimator does not list the bf16 parameter partition; we do (2Ψ/N) and count 2 bytes less
for the per-sub-group fp32 copy, so the totals agree.

Offload "optimizer" moves the fp32 master, Adam moments and fp32 grads to the host (and,
from stage 2, the bf16 gradient partition); "optimizer+params" (stage 3) also the bf16
parameter partition. Offloaded states must fit the host: 16 bytes per offloaded trainable
parameter (+ p per offloaded parameter) per card, x1.5 for DeepSpeed's buffers, summed over
the node's cards, within ``safety_margin`` of ``host_memory_gib``. LoRA: the frozen base
costs pΨ (pΨ/N under ZeRO-3, 0 with param offload); only the adapter carries gradients and
optimizer state.

Reference: "sharded" pΨ/N (ZeRO-3; 0 when params are offloaded, because TRL hands the
reference the policy's ZeRO-3 config), "replicated" pΨ, "adapter" and "precomputed" 0.

Activations (Korthikanti et al. 2022) per layer: s·b·h·(34 + 5·a·s/h) bytes at p = 2, with
b = 2 × micro-batch (chosen + rejected). Fused SDPA (HPU FusedSDPA, CUDA flash/SDPA: the device's
``Backend.fused_sdpa``) drops the 5as²b term; on CPU unpacked plans keep it (the bench model's measured
peak matched only with it, 2026-11; on 2026-12-01 torch 2.13's CPU SDPA was seen taking its flash kernel
even with a mask, so the term more likely stands in for Korthikanti's undercount of a SwiGLU MLP: kept as
a conservative figure, not re-measured). Packed plans use ``packed_layer_elements``, counted from the
modeling code and checked against the bench. Full recomputation keeps 2sbh per layer plus one layer's
activations. LoRA adds what its adapters keep for backward, per token and adapted linear (peft applies
its own dropout in each): the dropout's output (fan_in elements), its mask (fan_in bytes) and lora_A's
output (r): ``lora_activation_bytes``, every layer's (one layer's with recomputation). With all seven
projections adapted that is ~50% more than the base layer's activations; measured on CPU, LoRA peaks
above full fine-tuning at the same micro-batch despite 12 fewer bytes of states per parameter.

Logits, n = b·s·V elements: the policy keeps its bf16 lm_head output (p), the fp32 cast
optimum-habana / TRL 0.9.6 make (4) and log_softmax's fp32 output saved for backward (4);
an in-loop reference (adapter / replicated / sharded) adds its p + 4 while the policy's
graph is alive. Precomputed log-probs add nothing.

Buffers: DeepSpeed's reduce bucket (h² elements, double-buffered with overlap_comm) and,
for ZeRO-3, the prefetch bucket (0.9·h²): the sizes launch/dsconfig.py writes.

Overhead: ``Hardware.overhead`` × the sum above, plus the hardware's runtime reserve: ``runtime_gib``
(fixed), ``runtime_bytes_per_param`` per parameter the rank loads (every rank loads the whole model),
``runtime_bytes_per_trainable`` per trainable parameter (LoRA: the adapter's only, the frozen base
carries no optimizer state) and ``runtime_bytes_per_trainable_zero3`` more per trainable parameter
under ZeRO-3. How each is calibrated, and which are measured or assumed, is in launch/plan/hardware.py.
"""

from __future__ import annotations

from dataclasses import asdict

from launch.plan.hardware import Hardware
from launch.plan.specs import ModelSpec
from launch.plan.types import GIB, OFFLOADS, STAGES, Memory, PlanOptions


def precision_bytes(bf16: bool) -> int:
    """p: bytes per parameter / activation element."""
    return 2 if bf16 else 4


def _trainable_states(n: int, stage: int, offload: str, world_size: int, p: int) -> tuple[float, float, float]:
    """(params, grads, optimizer) bytes per card for n trainable parameters."""
    N = world_size
    mixed = p == 2
    optim = ((4 if mixed else 0) + 8) * n  # fp32 master weights + Adam m, v
    params = p * n / N if stage == 3 else p * n
    if stage == 3:
        # As DeepSpeed's ZeRO-3 estimator: 4 bytes per parameter per rank for the gradient
        # partition and the fp32 copy the step makes of it (one sub-group at a time).
        grads = 4 * n / N
    else:
        grads_lp = p * n / N if stage == 2 else p * n
        grad32 = (4 * n if mixed else 0) / (N if stage >= 1 else 1)  # fp32 copy for the step
        grads = grads_lp + grad32
    if stage >= 1:
        optim /= N
    if offload != "none":
        optim = 0.0
        grads = 0.0 if stage >= 2 else p * n  # ZeRO-1 still holds the full low-precision grads
    if offload == "optimizer+params":
        params = 0.0
    return params, grads, optim


def _model_states(spec: ModelSpec, stage: int, offload: str, world_size: int, use_peft: bool,
                  lora_params: int, bf16: bool) -> tuple[float, float, float]:
    p = precision_bytes(bf16)
    if use_peft:
        frozen = p * spec.num_params
        frozen = 0.0 if offload == "optimizer+params" else (frozen / world_size if stage == 3 else frozen)
        params, grads, optim = _trainable_states(lora_params, stage, offload, world_size, p)
        params += frozen
    else:
        params, grads, optim = _trainable_states(spec.num_params, stage, offload, world_size, p)
    if stage == 3:  # gathered live parameters (DeepSpeed's estimator: 4 x largest layer at bf16)
        params += 2 * p * spec.largest_layer_params
    return params, grads, optim


def _check_combo(stage: int, offload: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"zero_stage must be one of {STAGES}, got {stage}")
    if offload not in OFFLOADS:
        raise ValueError(f"offload must be one of {OFFLOADS}, got {offload!r}")
    if offload != "none" and stage == 0:
        raise ValueError("offload needs ZeRO stage >= 1")
    if offload == "optimizer+params" and stage != 3:
        raise ValueError("parameter offload needs ZeRO stage 3")


def model_state_bytes(spec: ModelSpec, stage: int, world_size: int, offload: str = "none",
                      use_peft: bool = False, lora_params: int = 0, bf16: bool = True) -> float:
    """Params + grads + optimizer state (+ ZeRO-3 live params) per card, in bytes, on the
    device. Comparable to the GPU column of DeepSpeed's ``estimate_zero{2,3}_*_all_cold``."""
    _check_combo(stage, offload)
    return sum(_model_states(spec, stage, offload, world_size, use_peft, lora_params, bf16))


def card_memory(spec: ModelSpec, hw: Hardware, opts: PlanOptions, stage: int, offload: str, micro_batch_size: int,
                gradient_checkpointing: bool, reference: str) -> Memory:
    """The per-card breakdown (GiB) of one configuration: the module docstring's formulas."""
    _check_combo(stage, offload)
    N, p = opts.cards, precision_bytes(hw.bf16)
    lora = spec.lora_params(opts.lora_r, opts.lora_targets(spec)) if opts.use_peft else 0
    params, grads, optim = _model_states(spec, stage, offload, N, opts.use_peft, lora, hw.bf16)

    if reference == "replicated":
        ref = p * spec.num_params
    elif reference == "sharded":
        ref = 0.0 if offload == "optimizer+params" else p * spec.num_params / N
    else:  # adapter, precomputed
        ref = 0.0

    s, h, L = opts.max_length, spec.hidden_size, spec.num_hidden_layers
    b = 2 * micro_batch_size  # chosen + rejected
    packed = opts.packed
    if packed:  # one row of the micro-batch's tokens: s·b becomes that row's length
        s, b = packed_tokens(opts, micro_batch_size), 1
    # CPU, unpacked: the score term stays (see the module docstring); packed: the modeling-code count.
    fused = packed or opts.fused_attention and hw.backend.fused_sdpa
    attn = 0.0 if fused else 5 * spec.num_attention_heads * s / h
    if packed:
        layer = s * packed_layer_elements(spec) * p
        outer = s * 3 * h * p  # embedding output and the final norm's saved tensors
        if hw.backend.packing_attention == "block_mask":
            outer += 2 * s * s * p  # the T x T mask and the model's inverted copy (Gemma 3: 2 masks)
        acts = (L * s * h * p + layer + outer) if gradient_checkpointing else L * layer + outer
    else:
        layer = s * b * h * (34 + attn) * p / 2
        acts = (L * 2 * s * b * h * p / 2 + layer) if gradient_checkpointing else L * layer
    if opts.use_peft:  # the adapters' own saved tensors, per token: every layer's, or one layer's with recompute
        adapter = lora_activation_bytes(spec, opts.lora_targets(spec), opts.lora_r, p)
        acts += s * b * adapter * (1 / L if gradient_checkpointing else 1)

    n = b * s * spec.vocab_size
    cast = 4 if p == 2 else 0
    if opts.chunked:
        # One chunk of CHUNK_TOKENS positions at a time (lm_head output p, its fp32 copy when p = 2,
        # the exp of logsumexp 4),
        # plus the gathered completion hidden states [b·s, h] and their gradient; the in-loop
        # reference runs under no_grad and frees its chunk before the policy's.
        chunk = min(b * s, _chunk_tokens(spec.vocab_size)) * spec.vocab_size
        logits = chunk * (p + cast + 4) + 2 * b * s * h * p
    else:
        logits = n * (p + cast + 4)
        if reference != "precomputed":
            logits += n * (p + cast)

    buffers = p * h * h * (2 + (0.9 if stage == 3 else 0.0))
    subtotal = params + grads + optim + ref + acts + logits + buffers
    trainable = lora if opts.use_peft else spec.num_params
    per_trainable = hw.runtime_bytes_per_trainable + (hw.runtime_bytes_per_trainable_zero3 if stage == 3 else 0.0)
    over = (hw.overhead * subtotal + hw.runtime_gib * GIB + hw.runtime_bytes_per_param * spec.num_params
            + per_trainable * trainable)
    g = lambda x: x / GIB  # noqa: E731
    return Memory(g(params), g(grads), g(optim), g(ref), g(acts), g(logits), g(buffers), g(over), g(subtotal + over))


def packed_layer_elements(spec: ModelSpec) -> int:
    """Elements one decoder layer keeps for backward per token in dpo-dist's packed forward (per-row
    flash SDPA, no score matrix), counted from the HF modeling code rather than Korthikanti's GPT
    figure (whose 4h GELU MLP undercounts a SwiGLU MLP): each RMSNorm its input and normalised
    output (2h); the q/k/v and MLP projections their (shared) input (h each); SDPA q, k, v and its
    output, o_proj its input (3q + 2kv); the gated MLP gate, activation, up and product (4i, i the MLP width a
    token goes through: a mixture of experts' routed and shared experts together). Gemma 2/3: four norms per
    layer; Qwen3, Gemma 3: q_norm / k_norm over q and k (2q + 2kv)."""
    h, q, kv, i = spec.hidden_size, spec.q_dim, spec.kv_dim, spec.mlp_width
    norms = spec.family_row.layer_norms * 2 * h + (2 * (q + kv) if spec.family_row.qk_norm else 0)
    return norms + 2 * h + 3 * q + 2 * kv + 4 * i


def lora_activation_bytes(spec: ModelSpec, targets, r: int, p: int) -> float:
    """Bytes per token, over all layers, that LoRA adapters keep for backward beyond the base layers (peft's
    ``Linear.forward``: ``lora_B(lora_A(dropout(x)))`` per adapted module, each with its own dropout): the dropout's
    output (fan_in elements), its mask (1 byte each, lora_dropout > 0 as the ranks default to) and lora_A's output (r),
    for every adapted linear a token goes through (a mixture of experts' routed ones)."""
    targets = set(targets)
    total = 0.0
    for sparse, n in ((False, spec.num_hidden_layers - spec.moe_layers), (True, spec.moe_layers)):
        if n:
            total += n * sum(m.active * (m.fan_in * (p + 1) + r * p) for m in spec.linears(sparse) if m.name in targets)
    return total


def packed_tokens(opts: PlanOptions, micro_batch_size: int) -> float:
    """Tokens of the largest packed micro-batch. dpo_dist.data.bucketing.PackedBatchSampler balances the
    totals: the largest is about mb·mean + (max − mean)/mb (on the bench data, mb = 1..16, within 8% of
    the measured one). Without data, the worst case: every row max_length."""
    worst = 2 * micro_batch_size * opts.max_length
    if opts.pair_tokens is None:
        return worst
    mean, mx = opts.pair_tokens
    return min(worst, micro_batch_size * mean + (mx - mean) / micro_batch_size)


def _chunk_tokens(vocab_size: int) -> int:
    """As dpo_dist.model.logprobs.default_chunk_tokens (kept torch-free here): ~256 MiB of fp32 logits."""
    return max(256, 256 * 2**20 // (4 * max(1, vocab_size)))


def estimate_memory(spec: ModelSpec, hardware: Hardware, options: PlanOptions, zero_stage: int, offload: str,
                    micro_batch_size: int, gradient_checkpointing: bool, reference: str) -> dict:
    """Per-card memory breakdown in GiB (keys: params, grads, optimizer, reference,
    activations, logits, buffers, overhead, total) for one concrete configuration."""
    return asdict(card_memory(spec, hardware, options, zero_stage, offload, micro_batch_size,
                              gradient_checkpointing, reference))


def host_gib(spec: ModelSpec, hw: Hardware, opts: PlanOptions, offload: str, reference: str) -> float:
    """Host RAM per node for offloaded states, as DeepSpeed's estimators size it: 16 bytes
    per offloaded trainable parameter (fp32 master, Adam m/v, fp32 grads), plus p per
    offloaded parameter (and the sharded reference's) with param offload; x1.5 buffers."""
    if offload == "none":
        return 0.0
    N, p = opts.cards, precision_bytes(hw.bf16)
    per_card = 16 * opts.trainable_params(spec) / N
    if offload == "optimizer+params":
        per_card += p * spec.num_params / N * (2 if reference == "sharded" else 1)
    return per_card * (N // opts.node_count(hw.cards_per_node)) * 1.5 / GIB
