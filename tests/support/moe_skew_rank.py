"""A ``dpo_dist.dpo`` rank with forced MoE routing (tests only): ``python -m tests.support.moe_skew_rank ARGS``.

With ``DPO_DIST_TEST_MOE_SKEW=<rank>:<expert>[:<after>]`` (tests.support.moe_twins.SKEW_ENV), global rank <rank>
adds -1e4 to that expert's router logit in every sparse MoE block of every model it builds (policy and reference),
from each router's call <after>+1 on (default: its first call): the rank never routes a token to the expert, the
other ranks do. Deterministic, whatever the data: it stands in for a batch
that happens to skip an expert on one rank, the case that desynchronises ZeRO-3 without the leaf-module flag.
"""

from __future__ import annotations

import os

from dpo_dist.model.moe import MOE_BLOCKS
from tests.support.moe_twins import SKEW_ENV

# family -> the transformers module that defines its block (MOE_BLOCKS has the class names)
_MODULES = {
    "mixtral": "transformers.models.mixtral.modeling_mixtral",
    "qwen2_moe": "transformers.models.qwen2_moe.modeling_qwen2_moe",
    "qwen3_moe": "transformers.models.qwen3_moe.modeling_qwen3_moe",
}


def _mask_expert(expert: int, after: int):
    calls = [0]

    def hook(module, args, out):
        calls[0] += 1
        if calls[0] <= after:  # this router's first `after` calls route as they would
            return out
        out = out.clone()
        out[..., expert] = -1e4
        return out

    return hook


def install_skew(spec: str, rank: int) -> bool:
    """Patch every MoE block class so that, on global rank ``rank`` == the spec's rank, its router never picks the
    spec's expert. True when this rank is the skewed one."""
    import importlib

    skew_rank, expert, *rest = (int(x) for x in spec.split(":"))
    after = rest[0] if rest else 0
    if rank != skew_rank:
        return False
    for family, module_name in _MODULES.items():
        cls = getattr(importlib.import_module(module_name), MOE_BLOCKS[family])
        original = cls.__init__

        def __init__(self, *args, _original=original, **kwargs):
            _original(self, *args, **kwargs)
            self.gate.register_forward_hook(_mask_expert(expert, after))

        cls.__init__ = __init__
    return True


def main() -> int:
    spec = os.environ.get(SKEW_ENV)
    if spec and install_skew(spec, int(os.environ.get("RANK", "0"))):
        print(f"[moe_skew_rank] rank {os.environ.get('RANK')}: expert {spec.split(':')[1]} never routed to", flush=True)
    from dpo_dist.dpo import main as dpo_main  # deferred: torch and transformers, after the patch

    return dpo_main()


if __name__ == "__main__":
    from dpo_dist.train.runtime import exit_now

    exit_now(main())
