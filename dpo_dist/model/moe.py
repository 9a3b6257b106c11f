"""Mixture-of-experts models under ZeRO-3: each family's sparse MoE block is one ZeRO-3 leaf.

ZeRO-3 gathers a module's parameters in that module's forward hook. A sparse MoE block runs only the experts its
router picked for this rank's tokens, so when one rank routes no token to some expert it never gathers that expert
while the other ranks do: the ranks' collectives no longer pair up and the run hangs (the most reported ZeRO-3
failure with MoE models). DeepSpeed's documented remedy, ``deepspeed.utils.set_z3_leaf_modules``, flags the block as
a leaf: ZeRO-3 then gathers all of the block's parameters (every expert) when the block is entered, and reduces all
of their gradients (zeros for an expert that got no token) when its backward is done, the same on every rank. It
also replaces one gather per expert by one per block.

When: after the model is built and before ``deepspeed.initialize`` wraps it (the engine reads the flag when it
installs its hooks and its gradient reduction). Under ZeRO-3 transformers' ``from_pretrained`` already partitions
the weights (``zero.Init``); the flag lives on the module, not the weights, so setting it right after loading is
in time. ``dpo_dist.dpo`` calls ``mark_moe_leaves`` on every model it loads (policy, sharded reference, the
reference of the log-prob cache), ``dpo_dist.sft`` on its model; the trainer (TRL's or optimum-habana's) wraps them later.

DeepSpeed 0.19 (requirements.txt) also flags these three classes by default (``zero_optimization.leaf_module``);
the DeepSpeed of the Gaudi image (HabanaAI/DeepSpeed) does not, so dpo-dist flags them itself, the same on every
device. The block classes are data: ``MOE_BLOCKS``, one row per MoE family the planner sizes
(``launch/plan/specs.py``).
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("dpo_dist")

# family (model_type, as dpo_dist.model.loader.family_of gives it) -> the class name of its sparse MoE block in
# transformers (4.55: transformers.models.<family>.modeling_<family>).
MOE_BLOCKS: dict[str, str] = {
    "mixtral": "MixtralSparseMoeBlock",
    "qwen2_moe": "Qwen2MoeSparseMoeBlock",
    "qwen3_moe": "Qwen3MoeSparseMoeBlock",
}

# TEST ONLY: "1" leaves the MoE blocks unflagged, so that tests/e2e/test_moe_zero3.py can show the hang the flag
# prevents. Never set it for a real run.
NO_LEAF_ENV = "DPO_DIST_TEST_NO_MOE_LEAF"


def moe_block_class(family: str) -> str | None:
    """The class name of ``family``'s sparse MoE block, or None for a dense family."""
    return MOE_BLOCKS.get(family)


def mark_moe_leaves(model, family: str, zero_stage: int) -> int:
    """Under ZeRO-3, flag every sparse MoE block of ``model`` as a ZeRO-3 leaf module; the number flagged.

    Call it after loading and before the trainer (DeepSpeed) wraps the model, for the policy and every reference
    model. Below ZeRO-3, and for a dense family, nothing is done (0). A family with a row in ``MOE_BLOCKS`` whose
    model has no such block is an error: running on unflagged would hang the first time a rank skips an expert.
    """
    if zero_stage != 3:
        return 0
    block = MOE_BLOCKS.get(family)
    if block is None:
        unknown = sorted({type(m).__name__ for m in model.modules() if "moe" in type(m).__name__.lower()
                          and type(m).__name__.lower().endswith("block")})
        if unknown:
            logger.warning("ZeRO-3: %s looks like a mixture of experts (%s) that dpo-dist has no leaf-module row for "
                           "(dpo_dist/model/moe.py MOE_BLOCKS): a rank that routes no token to an expert can hang "
                           "the run", family, ", ".join(unknown))
        return 0
    if os.environ.get(NO_LEAF_ENV) == "1":
        logger.warning("%s=1 (test only): the %s blocks are NOT ZeRO-3 leaves; a rank that routes no token to an "
                       "expert will hang the run", NO_LEAF_ENV, block)
        return 0
    from deepspeed.utils import set_z3_leaf_modules  # deferred: deepspeed loads torch (ranks only)

    flagged = set_z3_leaf_modules(model, [block], raise_if_not_found=False)
    if not flagged:
        raise RuntimeError(f"ZeRO-3: a {family} model without any {block} module (dpo_dist/model/moe.py MOE_BLOCKS): "
                           "transformers renamed the block? Without the leaf flag ZeRO-3 hangs when a rank skips an "
                           "expert; update the row.")
    logger.info("ZeRO-3: %d %s blocks are leaf modules (all experts gathered together)", len(flagged), block)
    return len(flagged)
