"""Speed model for DPO under DeepSpeed ZeRO: model FLOPs, MFU and the estimated step time.

Used to rank plans that fit (``est_step_time_s`` / ``est_tokens_per_s``). Pure: no torch, no I/O.

compute = hardware FLOPs / (peak · mfu · t/(t + 512)), t = tokens per card per micro-step: 2 x max_length per
pair, or with packing and the data's measured tokens per pair (``PlanOptions.pair_tokens``) that mean, as a
packed row carries real tokens only (``micro_step_tokens``; bigger micro-batches help, with diminishing
returns); each micro-step adds the hardware's fixed ``micro_step_overhead_s``; gradient checkpointing adds one
more policy forward; ZeRO-3 pays 10% for its hooks and exposes half of its all-gathers /
reduce-scatters over the intra-node (one node) or inter-node link; offload pays the host
link and CPU Adam, then 10% (optimizer) or 50% (optimizer+params) for host synchronisation;
a precomputed reference moves its forward before training (the same FLOPs in one epoch, without
the per-micro-step all-gather of a sharded reference), and at equal speed the reference that
holds less memory wins (``launch.plan.search.REFERENCE_PREFERENCE``): on the bench the cache's pass
measured no slower than the in-loop reference it replaces (bench/README.md). ``Hardware.mfu`` and how
it is calibrated: launch/plan/hardware.py. The score ranks options; the absolute figure is an estimate.
"""

from __future__ import annotations

from dpo_dist.train.reference import REFERENCES
from launch.plan.hardware import Hardware
from launch.plan.memory import packed_tokens, precision_bytes
from launch.plan.specs import ModelSpec
from launch.plan.types import PlanOptions

TOKENS_HALF_EFFICIENCY = 512  # tokens per micro-step at which kernels reach half their peak efficiency
ZERO3_HOOK_PENALTY = 1.10
COMM_EXPOSED = 0.5
CPU_ADAM_PARAMS_PER_S = 1e9  # DeepSpeed CPUAdam, per rank (rough)
# Offload also synchronises with the host and rarely reaches link speed; rough slowdowns
# on top of the transfer and CPU-Adam time (ZeRO-Offload / ZeRO-Infinity experience).
OFFLOAD_PENALTY = {"none": 1.0, "optimizer": 1.1, "optimizer+params": 1.5}


def _matmul_params(spec: ModelSpec) -> int:
    """Parameters that take part in a token's matmuls: the text decoder's active ones (a mixture of experts: the
    routed experts only) minus the embedding lookup (the tied matrix still does the lm_head matmul)."""
    return spec.active_text_params - (0 if spec.tie_word_embeddings else spec.vocab_size * spec.hidden_size)


def _forward_flops(spec: ModelSpec, tokens: float, seq_len: int | None) -> float:
    attn = 4 * spec.num_hidden_layers * spec.q_dim * seq_len if seq_len else 0  # QK^T and AV
    return (2 * _matmul_params(spec) + attn) * tokens


def dpo_step_flops(spec: ModelSpec, tokens: float, use_peft: bool, reference: str,
                   seq_len: int | None = None) -> float:
    """Model FLOPs for one DPO step over ``tokens`` tokens (chosen + rejected, padded).

    Policy: forward F + backward 2F for a full fine-tune (6NT); with LoRA the weight
    gradients vanish but activation gradients remain, 4NT (attention has no weights, its
    backward stays 2x); N counts the parameters a token goes through (a mixture of experts: its routed
    experts, not all of them). Reference: one forward (2NT) unless precomputed. Totals: full ≈ 8NT,
    LoRA ≈ 6NT, minus 2NT when precomputed. The attention term, 4·L·d·s per token
    per forward (12 for forward+backward, PaLM-style, no causal halving, no sliding-window
    discount: an upper bound where a window is shorter than the row), is added when ``seq_len`` is given. Recompute from gradient
    checkpointing is not model FLOPs and is not counted here.
    """
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
    fwd = _forward_flops(spec, tokens, seq_len)
    linear = 2 * _matmul_params(spec) * tokens
    attn = fwd - linear
    policy = (2 * linear + 3 * attn) if use_peft else 3 * fwd
    return policy + (0.0 if reference == "precomputed" else fwd)


def mfu(spec: ModelSpec, tokens_per_s_per_card: float, hardware: Hardware, use_peft: bool, reference: str,
        seq_len: int | None = None) -> float:
    """Model FLOPs utilisation, counting the reference pass (a step's reference forward is real work)."""
    flops_per_token = dpo_step_flops(spec, 1.0, use_peft, reference, seq_len)
    return flops_per_token * tokens_per_s_per_card / (hardware.peak_bf16_tflops * 1e12)


def step_time(spec: ModelSpec, hw: Hardware, opts: PlanOptions, nodes: int, stage: int, offload: str,
              mb: int, gc: bool, reference: str, ga: int) -> float:
    """Seconds per optimizer step (``ga`` micro-steps of ``mb`` pairs per card), as the module docstring says."""
    N, p, s = opts.cards, precision_bytes(hw.bf16), opts.max_length
    t = micro_step_tokens(opts, mb)
    # Attention span: a row, or with a block mask the whole packed row (its T x T scores are all computed).
    span = packed_tokens(opts, mb) if hw.backend.packing_attention == "block_mask" and opts.packing_asked else s
    in_loop_ref = "replicated" if reference == "precomputed" else reference  # moved, not removed
    flops = dpo_step_flops(spec, t, opts.use_peft, in_loop_ref, span)
    if gc:
        flops += _forward_flops(spec, t, span)
    compute = flops / (hw.peak_bf16_tflops * 1e12 * hw.mfu * t / (t + TOKENS_HALF_EFFICIENCY))
    if stage == 3:
        compute *= ZERO3_HOOK_PENALTY

    psi = spec.num_params
    trainable = opts.trainable_params(spec)
    frac = (N - 1) / N
    bw = (hw.intra_node_gbs if nodes == 1 else hw.inter_node_gbs) * 1e9
    gathers = 2 + gc + (reference == "sharded")  # fwd, bwd, recompute, reference forward
    micro_bytes = step_bytes = 0.0
    if stage == 3:
        micro_bytes = (gathers * p * psi + p * trainable) * frac
    elif stage == 2:
        micro_bytes, step_bytes = p * trainable * frac, p * trainable * frac
    else:
        step_bytes = 2 * p * trainable * frac
    micro = compute + COMM_EXPOSED * micro_bytes / bw + hw.micro_step_overhead_s
    step = COMM_EXPOSED * step_bytes / bw
    host = hw.host_link_gbs * 1e9
    if offload != "none":
        step += 2 * p * trainable / N / host + trainable / N / CPU_ADAM_PARAMS_PER_S
    if offload == "optimizer+params":
        micro += COMM_EXPOSED * gathers * p * psi / N / host
    return (ga * micro + step) * OFFLOAD_PENALTY[offload]


def tokens_per_pair(opts: PlanOptions) -> tuple[float, str]:
    """(tokens a pair counts for throughput, which): ("real") the data's measured mean tokens per pair (chosen +
    rejected rows, each with its prompt: what the ranks' tokens/s counts), or ("padded") 2 x max_length when the data
    was not measured."""
    if opts.pair_tokens is not None:
        return float(opts.pair_tokens[0]), "real"
    return float(2 * opts.max_length), "padded"


def micro_step_tokens(opts: PlanOptions, mb: int) -> float:
    """Tokens a card runs per micro-step: a packed micro-batch carries the data's real tokens (its padding to the
    bucket totals is a few percent); rows padded to max_length otherwise, or when the data was not measured."""
    worst = 2 * mb * opts.max_length
    if opts.packed and opts.pair_tokens is not None:
        return min(worst, mb * float(opts.pair_tokens[0]))
    return worst


def with_throughput(plan, opts: PlanOptions):
    """``plan`` with its throughput in the tokens the ranks measure: pairs/s (global batch / step time) times the
    tokens per pair (``tokens_per_pair``: real where the data's are known, else padded, and the plan says which)."""
    import dataclasses

    per_pair, basis = tokens_per_pair(opts)
    pairs = plan.global_batch_size / plan.est_step_time_s if plan.est_step_time_s else 0.0
    return dataclasses.replace(plan, est_pairs_per_s=round(pairs, 3), est_tokens_per_s=round(pairs * per_pair, 1),
                               est_tokens_per_pair=round(per_pair, 1), est_tokens_basis=basis)
