"""The model card (``README.md``) of a merged folder: what was merged, how it was verified, the training metrics.

Only allow-listed training metrics (`CARD_METRICS`) are shown, and the text is redacted, so nothing from the
environment (tokens) can leak into a folder that may be pushed to the hub.
"""

from __future__ import annotations

import time
from typing import Any

from dpo_dist.model.loader import looks_like_path
from dpo_dist.util.layout import METRICS_FILE
from dpo_dist.util.logs import redact

# Training metrics shown in the model card: an allow-list, so nothing else (env, tokens) can leak in.
CARD_METRICS = (
    "model", "backend", "world_size", "zero_stage", "reference", "use_peft", "loss_type", "beta", "steps",
    "pairs_trained", "first_train_loss", "last_train_loss", "eval_loss", "eval_reward_accuracy",
    "eval_reward_margin", "pairs_per_s", "tokens_per_s", "peak_memory_gib_per_rank_max", "train_seconds",
)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def model_card(report: dict, metrics: dict | None) -> str:
    """The card's text, from the merge report and the run's training_metrics.json (None when there is none)."""
    lines = ["---", "library_name: transformers", "tags:", "- dpo", "- trl", "- dpo-dist"]
    base = report.get("base_model")
    if base and not looks_like_path(base) and base.count("/") == 1:
        lines.append(f"base_model: {base}")
    lines += ["---", "", "# DPO fine-tuned model (merged by dpo-dist)", ""]
    lines.append(f"Merged with `python -m dpo_dist.merge` from a **{report['kind']}** input. Weights: "
                 f"{report['dtype']}, {report['params']:,} parameters, {report['tensors']} tensors.")
    if base:
        lines.append(f"Base model: `{base}`.")
    if report.get("zero_checkpoint"):
        lines.append(f"Weights gathered from the DeepSpeed ZeRO checkpoint `{report['zero_checkpoint']}` with "
                     "DeepSpeed's `get_fp32_state_dict_from_zero_checkpoint`.")
    lines.append(f"Merged on {time.strftime('%Y-%m-%d %H:%M:%S %Z')}.")
    for note in report.get("notes", []):
        lines.append(f"\nNote: {note}.")
    lines += ["", "## Verification", ""]
    v = report.get("verification")
    if v:
        lines.append(f"Reloaded with `AutoModelForCausalLM.from_pretrained`; fp32 logits on a fixed batch differ from "
                     f"the {report['reference']} by at most {v['max_logit_diff']:.3g} "
                     f"(tolerance {v['tolerance']:.3g} = {v['tolerance_rule']}). No size-0 tensors; parameter count "
                     f"equals the base model's; tied embeddings: {v['tied_embeddings']}.")
    else:
        lines.append("Verification was skipped (--no_verify).")
    lines += ["", "## Training metrics", ""]
    if metrics:
        lines += ["| metric | value |", "|---|---|"]
        for k in CARD_METRICS:
            if k in metrics and isinstance(metrics[k], (int, float, str, bool)) and metrics[k] is not None:
                lines.append(f"| {k} | {_fmt(metrics[k])} |")
    else:
        lines.append(f"No {METRICS_FILE} was found next to the checkpoint.")
    lines += ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "model = AutoModelForCausalLM.from_pretrained(PATH)", "tokenizer = AutoTokenizer.from_pretrained(PATH)",
              "```", ""]
    return redact("\n".join(lines))
