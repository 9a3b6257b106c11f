"""Per-card memory model and plan search for DPO under DeepSpeed ZeRO.

Hand-written: no library estimates *DPO* memory (policy + reference + two sequences per
pair + fp32 logits) across ZeRO stages, offload and reference strategies. DeepSpeed's
``estimate_zero2/3_model_states_mem_needs_all_cold`` cover only the model states; they are
the reference that ``model_state_bytes`` is tested against (tests/test_plan.py, within 5%).
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
b = 2 × micro-batch (chosen + rejected). Fused SDPA (HPU FusedSDPA, CUDA flash/SDPA) drops
the 5as²b term; on CPU unpacked plans keep it (the bench model's measured peak matched only with
it, 2026-11; on 2026-12-01 torch 2.13's CPU SDPA was seen taking its flash kernel even with a
mask, so the term more likely stands in for Korthikanti's undercount of a SwiGLU MLP: kept as a
conservative figure, not re-measured). Packed plans use ``packed_layer_elements``, counted from
the modeling code and checked against the bench. Full recomputation keeps 2sbh per layer plus one
layer's activations.

Logits, n = b·s·V elements: the policy keeps its bf16 lm_head output (p), the fp32 cast
optimum-habana / TRL 0.9.6 make (4) and log_softmax's fp32 output saved for backward (4);
an in-loop reference (adapter / replicated / sharded) adds its p + 4 while the policy's
graph is alive. Precomputed log-probs add nothing.

Buffers: DeepSpeed's reduce bucket (h² elements, double-buffered with overlap_comm) and,
for ZeRO-3, the prefetch bucket (0.9·h²): the sizes launch/dsconfig.py writes.

Overhead: ``Hardware.overhead`` × the sum above. For Gaudi it is CALIBRATED on the one
measured single-card DPO point (``CALIBRATION_POINT``): Llama-2-7B, LoRA r8 (q_proj, v_proj), separate
bf16 reference, max_length 1024, micro-batch 1, no gradient checkpointing, no DeepSpeed,
optimum-habana's non-fused attention: 87 GiB on Gaudi2 where the formulas give 44.7 GiB, so
overhead = 87 / 44.7 − 1 ≈ 0.95. One point cannot separate a fixed runtime reserve from a
proportional one; proportional is the conservative choice for large plans. The test
``test_hpu_overhead_reproduces_measured_point`` pins it. The CUDA overhead is a rule of thumb
(allocator fragmentation, context), not calibrated.

CPU (peak RSS per rank) is CALIBRATED on the bench model (26M Llama, 2 ranks, ZeRO-3, full
fine-tuning, packed, measured 2026-12-01 at micro-batch 2 / 8 / 16: 1.76 / 2.60 / 3.33-3.45 GiB):
``runtime_gib`` = 0.53 (measured before any model loads: Python, torch, DeepSpeed, tokenizer,
data), ``runtime_bytes_per_param`` = 28 (fitted: what does not scale with the micro-batch, about
0.69 GiB here: the loader's full fp32 state dict, DeepSpeed's flat fp32 partitions and gathered
parameters beyond the model-state formulas, resident after they are freed) and ``overhead`` = 30%
of the formulas (glibc keeps freed pages, and packed rows change length every step, so peak RSS
grows past the live peak: +0.5 GiB from step 1 to step 2 at micro-batch 16). Formulas + these:
1.83 / 2.48 / 3.44 GiB, within 5%. Fitted at 2 ranks on one model: a reserve, not a law.

Speed (``est_step_time_s`` / ``est_tokens_per_s``, used to rank plans that fit)
-------------------------------------------------------------------------------
compute = hardware FLOPs / (peak · mfu · t/(t + 512)), t = tokens per card per micro-step
(bigger micro-batches help, with diminishing returns); gradient checkpointing adds one more
policy forward; ZeRO-3 pays 10% for its hooks and exposes half of its all-gathers /
reduce-scatters over the intra-node (one node) or inter-node link; offload pays the host
link and CPU Adam, then 10% (optimizer) or 50% (optimizer+params) for host synchronisation;
a precomputed reference moves its forward before training (the same FLOPs in one epoch, without
the per-micro-step all-gather of a sharded reference), and at equal speed the reference that
holds less memory wins (``REFERENCE_PREFERENCE``): on the bench the cache's pass measured no
slower than the in-loop reference it replaces (bench/README.md). ``Hardware.mfu`` for Gaudi2/Gaudi3 is
calibrated on optimum-habana's published DPO baselines (llama-7b LoRA r8, max_length 1024, bs 1, GA 4,
8 cards, DDP: 13.5 and 15.1 samples/s); CUDA/CPU values are uncalibrated guesses. The
score ranks options; the absolute figure is an estimate.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from launch.plan.specs import ModelSpec

GIB = 1024**3
STAGES = (0, 1, 2, 3)
OFFLOADS = ("none", "optimizer", "optimizer+params")
REFERENCES = ("adapter", "sharded", "replicated", "precomputed")

# Speed-model constants (see module docstring).
TOKENS_HALF_EFFICIENCY = 512  # tokens per micro-step at which kernels reach half their peak efficiency
ZERO3_HOOK_PENALTY = 1.10
COMM_EXPOSED = 0.5
CPU_ADAM_PARAMS_PER_S = 1e9  # DeepSpeed CPUAdam, per rank (rough)
# Equal estimated speed: the reference that holds less memory wins (the cache also makes restarts and
# sweeps over beta / lr on the same data skip the reference entirely).
REFERENCE_PREFERENCE = ("adapter", "precomputed", "sharded", "replicated")
# Offload also synchronises with the host and rarely reaches link speed; rough slowdowns
# on top of the transfer and CPU-Adam time (ZeRO-Offload / ZeRO-Infinity experience).
OFFLOAD_PENALTY = {"none": 1.0, "optimizer": 1.1, "optimizer+params": 1.5}
MAX_SUGGESTED_NODES = 64


@dataclass(frozen=True)
class Hardware:
    name: str
    card_memory_gib: float  # usable per card
    peak_bf16_tflops: float
    cards_per_node: int
    overhead: float  # fraction of the formula total added for runtime overhead
    runtime_gib: float = 0.0  # fixed per-rank reserve (interpreter, libraries, data) outside the formulas
    runtime_bytes_per_param: float = 0.0  # per-rank reserve per model parameter outside the formulas
    bf16: bool = True
    mfu: float = 0.4  # fraction of peak reached on large micro-batches
    intra_node_gbs: float = 100.0  # GB/s per card, collectives inside a node
    inter_node_gbs: float = 25.0  # GB/s per card, collectives across nodes
    host_link_gbs: float = 25.0  # GB/s per card, card <-> host (offload)
    offload_supported: bool = True
    host_memory_gib: float = 1024.0  # host RAM per node, bounds offload (typical 8-card server)
    # What the ranks do on this hardware (dpo_dist/backend.py holds the same facts for the ranks):
    device: str = "cpu"  # the ranks' --device
    fused_sdpa: bool = True  # the DPO forward's attention keeps no s x s score matrix (flash / fused SDPA)
    packing_attention: str = "varlen"  # packed rows: per-row kernels ("varlen") or a T x T block mask ("block_mask")
    static_shapes: bool = False  # graph-compiling device: a few fixed batch shapes (buckets) matter
    ddp_without_deepspeed: bool = False  # a ZeRO-0 plan runs plain DDP (gaudi_spawn --use_mpi), not DeepSpeed


# Gaudi ranks: optimum-habana's models, FusedSDPA (the engine passes use_flash_attention=True), packed rows through
# a block-diagonal mask (Gaudi attention ignores transformers' attention interface), graph compiles (static shapes),
# and ZeRO-0 as DDP, as optimum-habana's own DPO baseline runs.
_GAUDI = dict(device="hpu", packing_attention="block_mask", static_shapes=True, ddp_without_deepspeed=True)

HARDWARE: dict[str, Hardware] = {
    # Gaudi2: 96 GB HBM, 94.62 GiB usable (measured), ~432 TFLOPS bf16, 8 cards/node;
    # 21 x 100 GbE scale-up ports per card, 3 x 100 GbE scale-out, PCIe Gen4 x16.
    "gaudi2": Hardware(
        "gaudi2", 94.62, 432.0, 8, overhead=0.95, mfu=0.42,
        intra_node_gbs=262.5, inter_node_gbs=37.5, host_link_gbs=25.0, **_GAUDI,
    ),
    # Gaudi3: 128 GB HBM; usable scaled by Gaudi2's measured ratio (94.62/96), not
    # measured. ~1835 TFLOPS bf16; 21 x 200 GbE scale-up, 3 x 200 GbE scale-out, PCIe Gen5.
    # Overhead assumed equal to Gaudi2's (same software stack).
    "gaudi3": Hardware(
        "gaudi3", round(128 * 94.62 / 96, 2), 1835.0, 8, overhead=0.95, mfu=0.11,
        intra_node_gbs=525.0, inter_node_gbs=75.0, host_link_gbs=50.0, **_GAUDI,
    ),
    # CUDA: an 80 GB H100-class card by default (override card_memory_gib in PlanOptions),
    # in a DGX-class node with 2 TiB of host RAM.
    "cuda": Hardware(
        "cuda", 80.0, 989.0, 8, overhead=0.10, mfu=0.40,
        intra_node_gbs=450.0, inter_node_gbs=50.0, host_link_gbs=50.0, host_memory_gib=2048.0, device="cuda",
    ),
    # CPU ranks (gloo): fp32, "card" memory is host RAM per rank (peak RSS; pass card_memory_gib),
    # no offload; a host runs as many ranks as asked, so the per-node limit is loose. Overhead and
    # runtime reserve CALIBRATED on the bench (see the module docstring).
    "cpu": Hardware(
        "cpu", 16.0, 1.0, 64, overhead=0.30, bf16=False, mfu=0.3, runtime_gib=0.53, runtime_bytes_per_param=28.0,
        intra_node_gbs=10.0, inter_node_gbs=1.0, host_link_gbs=10.0, offload_supported=False, fused_sdpa=False,
    ),
}

# optimum-habana's published DPO throughput (its test baselines): huggyllama/llama-7b (6.74B parameters), LoRA r8,
# max_length 1024 (every pair padded to 2 x 1024 tokens), micro-batch 1, gradient accumulation 4, 8 cards, DDP.
# Hardware.mfu is calibrated on them; `launch selfcheck` compares a node's measured figures with them.
PUBLISHED_DPO_BASELINES = {
    "gaudi2": dict(pairs_per_s=13.5, cards=8, params=6_738_415_616, tokens_per_pair=2 * 1024),
    "gaudi3": dict(pairs_per_s=15.1, cards=8, params=6_738_415_616, tokens_per_pair=2 * 1024),
}

# The measured Gaudi2 point the HPU overhead is calibrated on.
CALIBRATION_POINT = dict(
    model="meta-llama/Llama-2-7b-hf", hardware="gaudi2", measured_gib=87.0,
    lora_r=8, lora_target_modules=("q_proj", "v_proj"), max_length=1024, micro_batch_size=1,
    zero_stage=0, offload="none", gradient_checkpointing=False, reference="replicated",
    fused_attention=False, chunked_logps=False, packing=False,  # GaudiDPOTrainer's own forward: full fp32 logits
)


@dataclass(frozen=True)
class PlanOptions:
    cards: int = 1  # world size: total cards over all nodes
    nodes: int | None = None  # None: ceil(cards / cards_per_node)
    max_length: int = 1024
    max_prompt_length: int = 512
    use_peft: bool = True
    lora_r: int = 16
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    card_memory_gib: float | None = None  # None: the hardware's usable memory
    host_memory_gib: float | None = None  # None: the hardware's host RAM per node
    safety_margin: float = 0.9  # plan against this fraction of card memory
    allow_offload: bool = True
    reference: str = "auto"  # "auto" | one of REFERENCES
    zero_stage: int | None = None  # None: the planner chooses
    micro_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    global_batch_size: int = 64  # preference pairs per optimizer step (target)
    fused_attention: bool = True
    # The engine's features (dpo_dist/train/engine.py), on every hardware. None: on.
    # Chunked log-probs (dpo_dist/model/logprobs.py): no [2b, s, V] logits, only one chunk's.
    chunked_logps: bool | None = None
    # The reference log-prob cache (dpo_dist/train/refcache.py): "auto" may pick "precomputed" (no reference model in
    # memory during training, cache reused on resume), under any ZeRO stage.
    reference_cache: bool | None = None
    # Packing (dpo_dist/model/packing.py): a micro-batch's rows in one row, attention kept inside each row, per row
    # (varlen: no score matrix) or through a block-diagonal mask (Gaudi: a T x T mask). Needs chunked_logps.
    packing: bool | None = None
    # Padding shapes (dpo_dist/data/bucketing.py): rows (or, packed, micro-batch totals) padded to at most
    # this many lengths chosen from the data; 0 = off (a static-shape device then pads to one length).
    # Memory is planned for the largest shape, max_length (unpacked) or the largest packed total.
    length_buckets: int = 8
    # (mean, max) tokens per pair (chosen + rejected rows, truncated) of the training data, measured by
    # the launcher (dpo_dist.data.preference.pair_token_stats). Packed micro-batches are sized by them; None:
    # the worst case, every row max_length tokens.
    pair_tokens: tuple[float, float] | None = None
    # Training pairs, when known: no micro-batch beyond this rank's share (it would repeat pairs).
    train_pairs: int | None = None

    def __post_init__(self) -> None:
        if self.cards < 1:
            raise ValueError(f"cards must be >= 1, got {self.cards}")
        if self.nodes is not None and (self.nodes < 1 or self.cards % self.nodes):
            raise ValueError(f"cards ({self.cards}) must be a positive multiple of nodes ({self.nodes})")
        if not 0 < self.max_prompt_length < self.max_length:
            raise ValueError(f"need 0 < max_prompt_length ({self.max_prompt_length}) < max_length ({self.max_length})")
        if not 0 < self.safety_margin <= 1:
            raise ValueError(f"safety_margin must be in (0, 1], got {self.safety_margin}")
        if self.reference not in ("auto", *REFERENCES):
            raise ValueError(f"reference must be auto or one of {', '.join(REFERENCES)}, got {self.reference!r}")
        if self.reference == "adapter" and not self.use_peft:
            raise ValueError("reference 'adapter' (adapter-disabled forward) needs use_peft")
        if self.zero_stage is not None:
            if self.zero_stage not in STAGES:
                raise ValueError(f"zero_stage must be one of {STAGES} or None, got {self.zero_stage}")
            if (self.reference == "sharded") != (self.zero_stage == 3) and self.reference in ("sharded", "replicated"):
                raise ValueError(f"reference {self.reference!r} does not exist under ZeRO-{self.zero_stage} "
                                 "(ZeRO-3 shards a separate reference, stages 0-2 replicate it)")
        if not self.micro_batch_sizes or min(self.micro_batch_sizes) < 1:
            raise ValueError(f"micro_batch_sizes must be positive, got {self.micro_batch_sizes}")
        if self.global_batch_size < 1 or self.lora_r < 1:
            raise ValueError("global_batch_size and lora_r must be >= 1")
        if self.pair_tokens is not None and not 0 < self.pair_tokens[0] <= self.pair_tokens[1]:
            raise ValueError(f"pair_tokens must be (mean, max) with 0 < mean <= max, got {self.pair_tokens}")

    @property
    def world_size(self) -> int:
        return self.cards


@dataclass(frozen=True)
class Memory:
    """Per-card memory in GiB."""
    params: float
    grads: float
    optimizer: float
    reference: float
    activations: float
    logits: float
    buffers: float
    overhead: float
    total: float


@dataclass(frozen=True)
class Suggestion:
    text: str
    cards: int | None = None
    nodes: int | None = None
    offload: str | None = None
    zero_stage: int | None = None


@dataclass(frozen=True)
class Plan:
    fits: bool
    zero_stage: int
    offload: str
    micro_batch_size: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    reference: str
    world_size: int
    nodes: int
    cards_per_node: int
    card_memory_gib: float
    hardware: str
    model: str
    use_peft: bool
    max_length: int
    max_prompt_length: int
    memory_gib: Memory
    est_step_time_s: float
    est_tokens_per_s: float
    notes: tuple[str, ...] = ()
    suggestion: Suggestion | None = None
    # How batches are shaped and run (dpo_dist/train/engine.py: bucketing.py, packing.py, logprobs.py), on every hardware.
    length_buckets: int = 0
    packing: bool = False
    chunked_logps: bool = False
    packing_attention: str = "varlen"
    static_shapes: bool = False
    # False: a ZeRO-0 plan on hardware that runs it as plain DDP (Gaudi: gaudi_spawn --use_mpi, no DeepSpeed).
    uses_deepspeed: bool = True

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps * self.world_size


def plan_to_dict(plan: Plan) -> dict:
    d = asdict(plan)
    d["notes"] = list(plan.notes)
    return d


# --------------------------------------------------------------------------- #
# Memory model
# --------------------------------------------------------------------------- #

def _p(bf16: bool) -> int:
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
    p = _p(bf16)
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


def _memory(spec: ModelSpec, hw: Hardware, opts: PlanOptions, stage: int, offload: str, micro_batch_size: int,
            gradient_checkpointing: bool, reference: str) -> Memory:
    _check_combo(stage, offload)
    N, p = opts.cards, _p(hw.bf16)
    lora = spec.lora_params(opts.lora_r, opts.lora_target_modules) if opts.use_peft else 0
    params, grads, optim = _model_states(spec, stage, offload, N, opts.use_peft, lora, hw.bf16)

    if reference == "replicated":
        ref = p * spec.num_params
    elif reference == "sharded":
        ref = 0.0 if offload == "optimizer+params" else p * spec.num_params / N
    else:  # adapter, precomputed
        ref = 0.0

    s, h, L = opts.max_length, spec.hidden_size, spec.num_hidden_layers
    b = 2 * micro_batch_size  # chosen + rejected
    packed = _packing(hw, opts) and _chunked(hw, opts)
    if packed:  # one row of the micro-batch's tokens: s·b becomes that row's length
        s, b = packed_tokens(opts, micro_batch_size), 1
    # CPU, unpacked: the score term stays (see the module docstring); packed: the modeling-code count.
    fused = packed or opts.fused_attention and hw.fused_sdpa
    attn = 0.0 if fused else 5 * spec.num_attention_heads * s / h
    if packed:
        layer = s * packed_layer_elements(spec) * p
        outer = s * 3 * h * p  # embedding output and the final norm's saved tensors
        if hw.packing_attention == "block_mask":  # the T x T mask and the model's inverted copy (Gemma 3: 2 masks)
            outer += 2 * s * s * p
        acts = (L * s * h * p + layer + outer) if gradient_checkpointing else L * layer + outer
    else:
        layer = s * b * h * (34 + attn) * p / 2
        acts = (L * 2 * s * b * h * p / 2 + layer) if gradient_checkpointing else L * layer

    n = b * s * spec.vocab_size
    cast = 4 if p == 2 else 0
    if _chunked(hw, opts):
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
    over = hw.overhead * subtotal + hw.runtime_gib * GIB + hw.runtime_bytes_per_param * spec.num_params
    g = lambda x: x / GIB  # noqa: E731
    return Memory(g(params), g(grads), g(optim), g(ref), g(acts), g(logits), g(buffers), g(over), g(subtotal + over))


def _chunked(hw: Hardware, opts: PlanOptions) -> bool:
    return opts.chunked_logps if opts.chunked_logps is not None else True


def packed_layer_elements(spec: ModelSpec) -> int:
    """Elements one decoder layer keeps for backward per token in dpo-dist's packed forward (per-row
    flash SDPA, no score matrix), counted from the HF modeling code rather than Korthikanti's GPT
    figure (whose 4h GELU MLP undercounts a SwiGLU MLP): each RMSNorm its input and normalised
    output (2h); the q/k/v and MLP projections their (shared) input (h each); SDPA q, k, v and its
    output, o_proj its input (3q + 2kv); the gated MLP gate, activation, up and product (4i).
    Gemma 3: four norms per layer, plus q_norm / k_norm over q and k (2q + 2kv)."""
    h, q, kv, i = spec.hidden_size, spec.q_dim, spec.kv_dim, spec.intermediate_size
    norms = 4 * 2 * h + 2 * (q + kv) if spec.family == "gemma3" else 2 * 2 * h
    return norms + 2 * h + 3 * q + 2 * kv + 4 * i


def packed_tokens(opts: PlanOptions, micro_batch_size: int) -> float:
    """Tokens of the largest packed micro-batch. dpo_dist.data.bucketing.PackedBatchSampler balances the
    totals: the largest is about mb·mean + (max − mean)/mb (on the bench data, mb = 1..16, within 8% of
    the measured one). Without data, the worst case: every row max_length."""
    worst = 2 * micro_batch_size * opts.max_length
    if opts.pair_tokens is None:
        return worst
    mean, mx = opts.pair_tokens
    return min(worst, micro_batch_size * mean + (mx - mean) / micro_batch_size)


def _packing(hw: Hardware, opts: PlanOptions) -> bool:
    return opts.packing if opts.packing is not None else _chunked(hw, opts)


def _reference_cache(hw: Hardware, opts: PlanOptions) -> bool:
    return opts.reference_cache if opts.reference_cache is not None else True


def _chunk_tokens(vocab_size: int) -> int:
    """As dpo_dist.model.logprobs.default_chunk_tokens (kept torch-free here): ~256 MiB of fp32 logits."""
    return max(256, 256 * 2**20 // (4 * max(1, vocab_size)))


def estimate_memory(spec: ModelSpec, hardware: Hardware, options: PlanOptions, zero_stage: int, offload: str,
                    micro_batch_size: int, gradient_checkpointing: bool, reference: str) -> dict:
    """Per-card memory breakdown in GiB (keys: params, grads, optimizer, reference,
    activations, logits, buffers, overhead, total) for one concrete configuration."""
    return asdict(_memory(spec, hardware, options, zero_stage, offload, micro_batch_size,
                          gradient_checkpointing, reference))


# --------------------------------------------------------------------------- #
# FLOPs and speed
# --------------------------------------------------------------------------- #

def _matmul_params(spec: ModelSpec) -> int:
    """Parameters that take part in matmuls: the text decoder minus the embedding lookup
    (the tied matrix still does the lm_head matmul)."""
    return spec.text_params - (0 if spec.tie_word_embeddings else spec.vocab_size * spec.hidden_size)


def _forward_flops(spec: ModelSpec, tokens: float, seq_len: int | None) -> float:
    attn = 4 * spec.num_hidden_layers * spec.q_dim * seq_len if seq_len else 0  # QK^T and AV
    return (2 * _matmul_params(spec) + attn) * tokens


def dpo_step_flops(spec: ModelSpec, tokens: float, use_peft: bool, reference: str,
                   seq_len: int | None = None) -> float:
    """Model FLOPs for one DPO step over ``tokens`` tokens (chosen + rejected, padded).

    Policy: forward F + backward 2F for a full fine-tune (6NT); with LoRA the weight
    gradients vanish but activation gradients remain, 4NT (attention has no weights, its
    backward stays 2x). Reference: one forward (2NT) unless precomputed. Totals: full ≈ 8NT,
    LoRA ≈ 6NT, minus 2NT when precomputed. The attention term, 4·L·d·s per token
    per forward (12 for forward+backward, PaLM-style, no causal halving, no sliding-window
    discount for Gemma 3), is added when ``seq_len`` is given. Recompute from gradient
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


def _step_time(spec: ModelSpec, hw: Hardware, opts: PlanOptions, nodes: int, stage: int, offload: str,
               mb: int, gc: bool, reference: str, ga: int) -> float:
    N, p, s = opts.cards, _p(hw.bf16), opts.max_length
    t = 2 * mb * s
    # Attention span: a row, or with a block mask the whole packed row (its T x T scores are all computed).
    span = packed_tokens(opts, mb) if hw.packing_attention == "block_mask" and _packing(hw, opts) else s
    in_loop_ref = "replicated" if reference == "precomputed" else reference  # moved, not removed
    flops = dpo_step_flops(spec, t, opts.use_peft, in_loop_ref, span)
    if gc:
        flops += _forward_flops(spec, t, span)
    compute = flops / (hw.peak_bf16_tflops * 1e12 * hw.mfu * t / (t + TOKENS_HALF_EFFICIENCY))
    if stage == 3:
        compute *= ZERO3_HOOK_PENALTY

    psi = spec.num_params
    trainable = spec.lora_params(opts.lora_r, opts.lora_target_modules) if opts.use_peft else psi
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
    micro = compute + COMM_EXPOSED * micro_bytes / bw
    step = COMM_EXPOSED * step_bytes / bw
    host = hw.host_link_gbs * 1e9
    if offload != "none":
        step += 2 * p * trainable / N / host + trainable / N / CPU_ADAM_PARAMS_PER_S
    if offload == "optimizer+params":
        micro += COMM_EXPOSED * gathers * p * psi / N / host
    return (ga * micro + step) * OFFLOAD_PENALTY[offload]


# --------------------------------------------------------------------------- #
# Search
# --------------------------------------------------------------------------- #

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
    if opts.reference != "auto":
        wanted = (opts.reference,)
    # "precomputed" only when asked for, or with reference_cache (dpo-dist's cache frees the
    # reference during training, under any ZeRO stage): GaudiDPOTrainer refuses TRL's precompute
    # under ZeRO-3, and TRL's own precompute keeps the reference model in memory.
    elif opts.use_peft:
        wanted = ("adapter", "precomputed") if _reference_cache(hw, opts) else ("adapter",)
    else:
        wanted = ("sharded", "replicated", "precomputed") if _reference_cache(hw, opts) else ("sharded", "replicated")
    # Under ZeRO-3 TRL shards a separate reference; under 0-2 it is replicated.
    return tuple(r for r in wanted if not (r == "sharded" and stage != 3 or r == "replicated" and stage == 3))


def _offloads(hw: Hardware, opts: PlanOptions, stage: int) -> tuple[str, ...]:
    if stage == 0 or not (opts.allow_offload and hw.offload_supported):
        return ("none",)
    return ("none", "optimizer", "optimizer+params") if stage == 3 else ("none", "optimizer")


def _nodes(hw: Hardware, opts: PlanOptions) -> int:
    return opts.nodes if opts.nodes is not None else math.ceil(opts.cards / hw.cards_per_node)


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
                        mem = _memory(spec, hw, opts, stage, offload, mb, gc, reference)
                        ga = math.ceil(opts.global_batch_size / (mb * N))
                        t = _step_time(spec, hw, opts, nodes, stage, offload, mb, gc, reference, ga)
                        out.append(_Candidate(stage, offload, mb, gc, reference, mem,
                                              _host_gib(spec, hw, opts, offload, reference), ga, t,
                                              ga * mb * N * 2 * opts.max_length / t))
    return out


def _host_gib(spec: ModelSpec, hw: Hardware, opts: PlanOptions, offload: str, reference: str) -> float:
    """Host RAM per node for offloaded states, as DeepSpeed's estimators size it: 16 bytes
    per offloaded trainable parameter (fp32 master, Adam m/v, fp32 grads), plus p per
    offloaded parameter (and the sharded reference's) with param offload; x1.5 buffers."""
    if offload == "none":
        return 0.0
    N, p = opts.cards, _p(hw.bf16)
    trainable = spec.lora_params(opts.lora_r, opts.lora_target_modules) if opts.use_peft else spec.num_params
    per_card = 16 * trainable / N
    if offload == "optimizer+params":
        per_card += p * spec.num_params / N * (2 if reference == "sharded" else 1)
    return per_card * (N // _nodes(hw, opts)) * 1.5 / GIB


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
    notes = [f"model: {spec.num_params / 1e9:.2f}B parameters ({spec.source} spec)"
             + (f", of which {spec.extra_params / 1e6:.0f}M outside the text decoder" if spec.extra_params else "")]
    if opts.use_peft:
        notes.append(f"LoRA r={opts.lora_r} on {', '.join(opts.lora_target_modules)}: "
                     f"{spec.lora_params(opts.lora_r, opts.lora_target_modules) / 1e6:.1f}M trainable parameters")
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
    if c.stage == 0 and hw.ddp_without_deepspeed:
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
        notes.append(f"HPU overhead +{hw.overhead:.0%} of the formula total, calibrated on one measured Gaudi2 "
                     f"point (Llama-2-7B LoRA + separate bf16 reference: 87 GiB)")
    if not opts.fused_attention:
        notes.append("non-fused attention: activations include the 5·a·s²·b score term")
    if per_node > hw.cards_per_node:
        notes.append(f"{per_node} cards per node exceeds the {hw.cards_per_node} a {hw.name} node has")
    if not fits:
        notes.append("no configuration fits; the leanest one is shown")
    return tuple(notes)


def make_plan(spec: ModelSpec, hardware: Hardware, options: PlanOptions) -> Plan:
    """Search stage x offload x checkpointing x micro-batch x reference; return the fastest
    plan under the safety margin, or the leanest one with ``fits=False`` and a suggestion."""
    fits, c = _best(spec, hardware, options)
    nodes = _nodes(hardware, options)
    return Plan(
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
        packing=_packing(hardware, options) and _chunked(hardware, options),
        chunked_logps=_chunked(hardware, options),
        packing_attention=hardware.packing_attention,
        static_shapes=hardware.static_shapes,
        uses_deepspeed=c.stage > 0 or not hardware.ddp_without_deepspeed,
    )
