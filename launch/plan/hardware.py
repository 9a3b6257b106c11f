"""The hardware the planner sizes for: card figures, and the published and measured points they are calibrated on.

A ``Hardware`` row holds what belongs to the card model: usable memory, peak FLOPs, links, cards per node, host
RAM, precision, and the overhead / MFU the memory and speed models apply. What the ranks do on its device (fused
attention, how packed rows keep attention apart, static shapes, ZeRO-0 as DDP) is the device's, not the card's: it
lives once, in the ranks' backend table (``dpo_dist.backend``), and ``Hardware.backend`` is that row.

Overhead (memory): what the runtime holds beyond the formulas (launch/plan/memory.py), in parts: ``overhead`` × the
formula total (scales with the plan: its parameters' states and its activations), ``runtime_gib`` per card (fixed),
``runtime_bytes_per_param`` per parameter the rank loads, ``runtime_bytes_per_trainable`` per trainable parameter and
``runtime_bytes_per_trainable_zero3`` more per trainable parameter under ZeRO-3.

Gaudi: CALIBRATED on the one measured single-card DPO point (``CALIBRATION_POINT``): Llama-2-7B, LoRA r8 (q_proj,
v_proj), separate bf16 reference, max_length 1024, micro-batch 1, no gradient checkpointing, no DeepSpeed,
optimum-habana's non-fused attention: 87 GiB on Gaudi2 where the formulas give 46.2 GiB (25.1 of it the policy's and
the reference's parameters). One point cannot separate a fixed part from a proportional one, so the fixed part is
ASSUMED, ``HPU_RUNTIME_GIB`` = 2 GiB per card (the runtime's own workspace: a guess, not measured), and the
proportional part is MEASURED as what it leaves of the point: ``HPU_OVERHEAD`` = (87 − 2) / 46.2 − 1 ≈ 0.84, which
grows with the parameters a card holds (and shrinks with ZeRO-3 sharding, as they do). No per-parameter reserve: a
term per parameter of the whole model would not shrink with sharding and, at 7B's 6 bytes per parameter, would put a
70B plan out of any card. Plans keep their size either way: moving 1 GiB from one part to the other changes the 70B
LoRA plan on 8 Gaudi2 cards (about 56 GiB of 94.62) by under 1 GiB. The plan notes say which part is measured. The
test ``test_hpu_overhead_reproduces_measured_point`` pins the point. The CUDA overhead is a rule of thumb (allocator
fragmentation, context), not calibrated.

CPU (peak RSS per rank) is CALIBRATED by ``make bench-planner`` (bench/planner.py: the points, the fit and the plot
in bench/results/planner.*; tests/launch/plan/test_cpu_calibration.py pins these constants to them): 16 configurations
of real 2-rank runs, max_length 256, on random-init Llama 10.6M / 26.4M / 100.7M and Gemma 3 270M (its real config:
vocab 262,144, 268M parameters), full fine-tuning and LoRA, ZeRO 0, 1 and 3, the planner's micro-batch (4 to 16);
measured = the larger peak RSS (max over ranks) of two runs, which differ by up to 20% on the small models.
Non-negative least squares on the relative error, with the 100.7M model and LoRA under ZeRO-1 held out, finds:
``runtime_gib`` = 0.76 (about 0.44 of it measured before any model loads: Python, torch, DeepSpeed, tokenizer,
data), ``runtime_bytes_per_trainable_zero3`` = 23.2 (ZeRO-3 full fine-tunes peak ~0.3-1 GiB above ZeRO-0 where the
formulas have them below: DeepSpeed's fp32 flat partitions and buffers per trainable parameter, and what the
reference-cache pass's ZeRO-3 engine leaves in the heap; LoRA under ZeRO-3 needs none of it), and 0 for ``overhead``,
``runtime_bytes_per_param`` and ``runtime_bytes_per_trainable``: the formulas (fp32 weights, 16 bytes per trainable
parameter, the LoRA adapters' activations, the largest packed micro-batch) already cover the rest. (The earlier
single-model fit's 28 bytes per parameter and +30% charged every plan, LoRA's frozen base included: +89% / +109% on
Gemma 3 270M.) Every point, fitted or held out, is within 15% of its plan (largest: 9.4% fitted, 13.3% held out).
Fitted at 2 ranks, max_length 256 and fp32: a calibration, not a law.

MFU (speed, launch/plan/speed.py): ``Hardware.mfu`` for Gaudi2/Gaudi3 is calibrated on optimum-habana's published
DPO baselines (``PUBLISHED_DPO_BASELINES``: llama-7b LoRA r8, max_length 1024, bs 1, GA 4, 8 cards, DDP: 13.5 and
15.1 samples/s); the CUDA value is an uncalibrated guess. CPU (fp32 matmuls, 2 ranks of one thread, ZeRO-3, packed,
precomputed reference) is CALIBRATED on two measured step times, one per unknown, so fitted exactly and not checked on
a third point: ``make demo``'s DPO step (205k-parameter Llama, micro-batch 32 x 1, 132 real tokens per pair:
0.217 s steady, on a quiet machine) and the bench's B-fp32 (26.4M Llama, micro-batch 16 x 2, 268 tokens per pair:
19.6 s per step, reference pass included) give ``mfu`` = 0.13 of the nominal 1 TFLOP/s and ``micro_step_overhead_s``
= 0.13 s
(tests/launch/plan/test_throughput.py pins both). CPU --bf16 (autocast) runs faster than this fp32 figure.
"""

from __future__ import annotations

from dataclasses import dataclass

from dpo_dist.backend import BACKENDS, Backend


@dataclass(frozen=True)
class Hardware:
    name: str
    card_memory_gib: float  # usable per card
    peak_bf16_tflops: float
    # Cards in one node. Gaudi: the server's fixed GAUDI_NODE_CARDS, and no more per node can be asked for (the
    # launch command's DEVICE_LAUNCH["hpu"].max_cards is the same constant; plan and train both apply it).
    # CUDA / CPU: a typical node, the planner's node size when only a card count is given.
    cards_per_node: int
    overhead: float  # fraction of the formula total added for runtime overhead
    runtime_gib: float = 0.0  # fixed per-rank reserve (interpreter, libraries, data) outside the formulas
    runtime_bytes_per_param: float = 0.0  # per-rank reserve per parameter the rank loads (all of them)
    runtime_bytes_per_trainable: float = 0.0  # per-rank reserve per trainable parameter (LoRA: the adapter's)
    runtime_bytes_per_trainable_zero3: float = 0.0  # more per trainable parameter under ZeRO-3
    bf16: bool = True
    mfu: float = 0.4  # fraction of peak reached on large micro-batches
    # Fixed seconds per micro-step outside the FLOPs model (Python, ZeRO-3's hooks, collective latency): what a
    # small model's step is made of. CPU: calibrated (see the module docstring); elsewhere not measured, 0.
    micro_step_overhead_s: float = 0.0
    intra_node_gbs: float = 100.0  # GB/s per card, collectives inside a node
    inter_node_gbs: float = 25.0  # GB/s per card, collectives across nodes
    host_link_gbs: float = 25.0  # GB/s per card, card <-> host (offload)
    offload_supported: bool = True
    host_memory_gib: float = 1024.0  # host RAM per node, bounds offload (typical 8-card server)
    device: str = "cpu"  # the ranks' --device: its row of the backend table says what the ranks do there

    def __post_init__(self) -> None:
        if self.device not in BACKENDS:
            raise ValueError(f"{self.name}: device must be one of {', '.join(BACKENDS)}, got {self.device!r}")

    @property
    def backend(self) -> Backend:
        """What the ranks do on this hardware's device (fused_sdpa, packing_attention, static_shapes,
        ddp_without_deepspeed, ...): the ranks' own row for it, not the Gaudi twin's."""
        return BACKENDS[self.device]


GAUDI_NODE_CARDS = 8  # a Gaudi2 / Gaudi3 server (HLS-Gaudi2, HLS-Gaudi3) holds 8 cards, no more and no fewer
# The HPU overhead (module docstring): a fixed part per card, ASSUMED, and a part proportional to the formula total,
# MEASURED as what the fixed part leaves of CALIBRATION_POINT: (87 - 2) / 46.22 - 1 = 0.84.
HPU_RUNTIME_GIB = 2.0
HPU_OVERHEAD = 0.84

HARDWARE: dict[str, Hardware] = {
    # Gaudi2: 96 GB HBM, 94.62 GiB usable (measured), ~432 TFLOPS bf16, 8 cards/node;
    # 21 x 100 GbE scale-up ports per card, 3 x 100 GbE scale-out, PCIe Gen4 x16.
    "gaudi2": Hardware(
        "gaudi2", 94.62, 432.0, GAUDI_NODE_CARDS, overhead=HPU_OVERHEAD, runtime_gib=HPU_RUNTIME_GIB, mfu=0.42,
        intra_node_gbs=262.5, inter_node_gbs=37.5, host_link_gbs=25.0, device="hpu",
    ),
    # Gaudi3: 128 GB HBM; usable scaled by Gaudi2's measured ratio (94.62/96), not
    # measured. ~1835 TFLOPS bf16; 21 x 200 GbE scale-up, 3 x 200 GbE scale-out, PCIe Gen5.
    # Overhead assumed equal to Gaudi2's (same software stack).
    "gaudi3": Hardware(
        "gaudi3", round(128 * 94.62 / 96, 2), 1835.0, GAUDI_NODE_CARDS, overhead=HPU_OVERHEAD, runtime_gib=HPU_RUNTIME_GIB,
        mfu=0.11,
        intra_node_gbs=525.0, inter_node_gbs=75.0, host_link_gbs=50.0, device="hpu",
    ),
    # CUDA: an 80 GB H100-class card by default (override card_memory_gib in PlanOptions),
    # in a DGX-class node with 2 TiB of host RAM.
    "cuda": Hardware(
        "cuda", 80.0, 989.0, 8, overhead=0.10, mfu=0.40,
        intra_node_gbs=450.0, inter_node_gbs=50.0, host_link_gbs=50.0, host_memory_gib=2048.0, device="cuda",
    ),
    # CPU ranks (gloo): fp32, "card" memory is host RAM per rank (peak RSS; pass card_memory_gib),
    # no offload; a host runs as many ranks as asked, so the per-node limit is loose. Overhead and
    # runtime reserve CALIBRATED by `make bench-planner` (see the module docstring).
    "cpu": Hardware(
        "cpu", 16.0, 1.0, 64, overhead=0.0, bf16=False, mfu=0.13, micro_step_overhead_s=0.13, runtime_gib=0.76,
        runtime_bytes_per_param=0.0,
        runtime_bytes_per_trainable=0.0, runtime_bytes_per_trainable_zero3=23.2,
        intra_node_gbs=10.0, inter_node_gbs=1.0, host_link_gbs=10.0, offload_supported=False, device="cpu",
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
