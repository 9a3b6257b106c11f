"""The hardware the planner sizes for: card figures, and the published and measured points they are calibrated on.

A ``Hardware`` row holds what belongs to the card model: usable memory, peak FLOPs, links, cards per node, host
RAM, precision, and the overhead / MFU the memory and speed models apply. What the ranks do on its device (fused
attention, how packed rows keep attention apart, static shapes, ZeRO-0 as DDP) is the device's, not the card's: it
lives once, in the ranks' backend table (``dpo_dist.backend``), and ``Hardware.backend`` is that row.

Overhead (memory): ``Hardware.overhead`` × the formula total (launch/plan/memory.py). For Gaudi it is CALIBRATED on
the one measured single-card DPO point (``CALIBRATION_POINT``): Llama-2-7B, LoRA r8 (q_proj, v_proj), separate
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

MFU (speed, launch/plan/speed.py): ``Hardware.mfu`` for Gaudi2/Gaudi3 is calibrated on optimum-habana's published
DPO baselines (``PUBLISHED_DPO_BASELINES``: llama-7b LoRA r8, max_length 1024, bs 1, GA 4, 8 cards, DDP: 13.5 and
15.1 samples/s); CUDA/CPU values are uncalibrated guesses.
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
    runtime_bytes_per_param: float = 0.0  # per-rank reserve per model parameter outside the formulas
    bf16: bool = True
    mfu: float = 0.4  # fraction of peak reached on large micro-batches
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

HARDWARE: dict[str, Hardware] = {
    # Gaudi2: 96 GB HBM, 94.62 GiB usable (measured), ~432 TFLOPS bf16, 8 cards/node;
    # 21 x 100 GbE scale-up ports per card, 3 x 100 GbE scale-out, PCIe Gen4 x16.
    "gaudi2": Hardware(
        "gaudi2", 94.62, 432.0, GAUDI_NODE_CARDS, overhead=0.95, mfu=0.42,
        intra_node_gbs=262.5, inter_node_gbs=37.5, host_link_gbs=25.0, device="hpu",
    ),
    # Gaudi3: 128 GB HBM; usable scaled by Gaudi2's measured ratio (94.62/96), not
    # measured. ~1835 TFLOPS bf16; 21 x 200 GbE scale-up, 3 x 200 GbE scale-out, PCIe Gen5.
    # Overhead assumed equal to Gaudi2's (same software stack).
    "gaudi3": Hardware(
        "gaudi3", round(128 * 94.62 / 96, 2), 1835.0, GAUDI_NODE_CARDS, overhead=0.95, mfu=0.11,
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
    # runtime reserve CALIBRATED on the bench (see the module docstring).
    "cpu": Hardware(
        "cpu", 16.0, 1.0, 64, overhead=0.30, bf16=False, mfu=0.3, runtime_gib=0.53, runtime_bytes_per_param=28.0,
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
