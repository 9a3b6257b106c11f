"""What the planner takes and returns: ``PlanOptions`` in, ``Plan`` (with its ``Memory`` breakdown and, when
nothing fits, a ``Suggestion``) out, and the choices a plan is made of (ZeRO stages, offloads, references)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from dpo_dist.model.lora import default_lora_targets
from dpo_dist.train.reference import reference_problem
from launch.plan.specs import ModelSpec

GIB = 1024**3
STAGES = (0, 1, 2, 3)
OFFLOADS = ("none", "optimizer", "optimizer+params")


@dataclass(frozen=True)
class PlanOptions:
    cards: int = 1  # world size: total cards over all nodes
    nodes: int | None = None  # None: ceil(cards / cards_per_node)
    max_length: int = 1024
    max_prompt_length: int = 512
    use_peft: bool = True
    lora_r: int = 16
    # None: what the ranks train when --lora_target_modules is not given, for the model's family
    # (dpo_dist.model.lora.default_lora_targets; resolved by lora_targets).
    lora_target_modules: tuple[str, ...] | None = None
    card_memory_gib: float | None = None  # None: the hardware's usable memory
    host_memory_gib: float | None = None  # None: the hardware's host RAM per node
    safety_margin: float = 0.9  # plan against this fraction of card memory
    allow_offload: bool = True
    reference: str = "auto"  # "auto" | one of dpo_dist.train.reference.REFERENCES
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
    # bf16 matmuls. None: the hardware's precision. Only hardware whose ranks run bf16 as autocast over fp32
    # weights (CPU: dpo_dist.backend ``bf16_autocast``) may differ from it; the memory model is unchanged there.
    bf16: bool | None = None

    def __post_init__(self) -> None:
        if self.cards < 1:
            raise ValueError(f"cards must be >= 1, got {self.cards}")
        if self.nodes is not None and (self.nodes < 1 or self.cards % self.nodes):
            raise ValueError(f"cards ({self.cards}) must be a positive multiple of nodes ({self.nodes})")
        if not 0 < self.max_prompt_length < self.max_length:
            raise ValueError(f"need 0 < max_prompt_length ({self.max_prompt_length}) < max_length ({self.max_length})")
        if not 0 < self.safety_margin <= 1:
            raise ValueError(f"safety_margin must be in (0, 1], got {self.safety_margin}")
        if self.zero_stage is not None and self.zero_stage not in STAGES:
            raise ValueError(f"zero_stage must be one of {STAGES} or None, got {self.zero_stage}")
        if self.reference != "auto" and (problem := reference_problem(self.reference, self.use_peft, self.zero_stage)):
            raise ValueError(problem)
        if not self.micro_batch_sizes or min(self.micro_batch_sizes) < 1:
            raise ValueError(f"micro_batch_sizes must be positive, got {self.micro_batch_sizes}")
        if self.global_batch_size < 1 or self.lora_r < 1:
            raise ValueError("global_batch_size and lora_r must be >= 1")
        if self.lora_target_modules is not None and (
                isinstance(self.lora_target_modules, str) or not self.lora_target_modules):
            raise ValueError(f"lora_target_modules must be None or a non-empty tuple of module names, "
                             f"got {self.lora_target_modules!r}")
        if self.pair_tokens is not None and not 0 < self.pair_tokens[0] <= self.pair_tokens[1]:
            raise ValueError(f"pair_tokens must be (mean, max) with 0 < mean <= max, got {self.pair_tokens}")

    @property
    def world_size(self) -> int:
        return self.cards

    def node_count(self, cards_per_node: int) -> int:
        """``nodes``, or (None) as few nodes of ``cards_per_node`` cards as hold ``cards``."""
        return self.nodes if self.nodes is not None else math.ceil(self.cards / cards_per_node)

    # -- the engine's features, None meaning on (on every hardware) --
    @property
    def chunked(self) -> bool:
        """Chunked log-probs."""
        return self.chunked_logps if self.chunked_logps is not None else True

    @property
    def packing_asked(self) -> bool:
        """Packing asked for (None: as chunked log-probs); rows are packed only with chunked log-probs (``packed``)."""
        return self.packing if self.packing is not None else self.chunked

    @property
    def packed(self) -> bool:
        """Rows are packed: packing asked for, with the chunked log-probs it needs."""
        return self.packing_asked and self.chunked

    @property
    def cached_reference(self) -> bool:
        """The reference log-prob cache may be chosen ("precomputed")."""
        return self.reference_cache if self.reference_cache is not None else True

    # -- what LoRA trains --
    def lora_targets(self, spec: ModelSpec) -> tuple[str, ...]:
        """``lora_target_modules``, or (None) the modules the ranks adapt by default for ``spec``'s family."""
        if self.lora_target_modules is not None:
            return tuple(self.lora_target_modules)
        targets = default_lora_targets(spec.family)
        if isinstance(targets, str):  # peft's "all-linear": not a list the planner can size
            raise ValueError(f"{spec.name}: no default LoRA targets for family {spec.family!r}; "
                             "pass lora_target_modules")
        return tuple(targets)

    def trainable_params(self, spec: ModelSpec) -> int:
        """Parameters that carry gradients and optimizer state: the adapter with LoRA, else the whole model."""
        return spec.lora_params(self.lora_r, self.lora_targets(spec)) if self.use_peft else spec.num_params


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
    # How batches are shaped and run (dpo_dist/train/engine.py: bucketing.py, packing.py, logprobs.py), on every
    # hardware.
    length_buckets: int = 0
    packing: bool = False
    chunked_logps: bool = False
    packing_attention: str = "varlen"
    static_shapes: bool = False
    # False: a ZeRO-0 plan on hardware that runs it as plain DDP (Gaudi: gaudi_spawn --use_mpi, no DeepSpeed).
    uses_deepspeed: bool = True
    bf16: bool = False  # bf16 matmuls (bf16 weights, or on CPU DeepSpeed's torch_autocast over fp32 weights)
    # What est_tokens_per_s counts (launch/plan/speed.py, with_throughput): "real", the data's measured tokens per
    # pair (PlanOptions.pair_tokens), or "padded", 2 x max_length per pair when the data's are not known.
    est_pairs_per_s: float = 0.0
    est_tokens_per_pair: float = 0.0
    est_tokens_basis: str = "padded"
    model_params: int = 0  # the model's parameters (launch.plan.make_plan), printed in readable units

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps * self.world_size


def plan_to_dict(plan: Plan) -> dict:
    d = asdict(plan)
    d["notes"] = list(plan.notes)
    return d


