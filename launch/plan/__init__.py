"""The planner: a DPO run's per-card memory, speed and best ZeRO configuration, without torch.

- ``specs``: model architecture specs (parameter counts) from a config.json, the Hub or a built-in table;
- ``hardware``: the card figures (``HARDWARE``) and the points they are calibrated on; what the ranks do on
  each device comes from the ranks' own backend table (``Hardware.backend``);
- ``types``: ``PlanOptions`` in, ``Plan`` / ``Memory`` / ``Suggestion`` out;
- ``memory``: the per-card memory model (ZeRO model states, reference, activations, logits, buffers);
- ``speed``: model FLOPs, MFU and the estimated step time;
- ``search``: the plan search, its notes and suggestions (``make_plan``);
- ``datastats``: tokens per pair of the training data; ``report``: the plan as a table.

``from launch.plan import make_plan, HARDWARE, PlanOptions, load_spec`` is the usual entry.
"""

from dpo_dist.train.reference import REFERENCES
from launch.plan.hardware import CALIBRATION_POINT, HARDWARE, PUBLISHED_DPO_BASELINES, Hardware
from launch.plan.memory import estimate_memory, model_state_bytes, packed_layer_elements, packed_tokens
from launch.plan.search import make_plan
from launch.plan.specs import ModelSpec, SpecError, load_spec
from launch.plan.speed import dpo_step_flops, mfu, step_time, tokens_per_pair, with_throughput
from launch.plan.types import GIB, OFFLOADS, STAGES, Memory, Plan, PlanOptions, Suggestion, plan_to_dict

__all__ = [
    "CALIBRATION_POINT", "GIB", "HARDWARE", "OFFLOADS", "PUBLISHED_DPO_BASELINES", "REFERENCES", "STAGES",
    "Hardware", "Memory", "ModelSpec", "Plan", "PlanOptions", "SpecError", "Suggestion",
    "dpo_step_flops", "estimate_memory", "load_spec", "make_plan", "mfu", "model_state_bytes",
    "packed_layer_elements", "packed_tokens", "plan_to_dict", "step_time", "tokens_per_pair", "with_throughput",
]
