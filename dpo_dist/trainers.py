"""The trainer adapter: one argument set onto two DPO trainer APIs.

- CPU / CUDA: trl 0.22 `DPOTrainer(args=DPOConfig, processing_class=...)`.
- HPU: optimum-habana's `GaudiDPOTrainer` (trl 0.9.6 keyword style), in `trainers_gaudi.py`.

TRL does the DPO. What is hand-written here is small: the mapping of our arguments, the
reference-strategy resolution, real-token counting for tokens/s, and the fix for the
empty-param-group crash (DESIGN.md §6: LoRA + torch>=2.10 + DeepSpeed, fixed upstream in
transformers after 4.55).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Optional

from dpo_dist.args import ArgumentError

logger = logging.getLogger(__name__)


def zero_stage_of(ds_config_path: Optional[str]) -> int:
    """ZeRO stage named in a DeepSpeed JSON (0 when no DeepSpeed)."""
    if not ds_config_path:
        return 0
    try:
        with open(ds_config_path) as fh:
            cfg = json.load(fh)
    except OSError as e:
        raise ArgumentError(f"--deepspeed {ds_config_path}: cannot read it ({e.strerror}).") from e
    except json.JSONDecodeError as e:
        raise ArgumentError(
            f"--deepspeed {ds_config_path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}). "
            "Start from a template in ds_configs/."
        ) from e
    if not isinstance(cfg, dict):
        raise ArgumentError(f"--deepspeed {ds_config_path}: expected a JSON object.")
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ArgumentError(f"--deepspeed {ds_config_path}: zero_optimization.stage must be 0-3 (got {stage!r}).")
    return int(stage)


def resolve_reference(reference: str, use_peft: bool, zero_stage: int) -> str:
    """auto → adapter with LoRA; otherwise a second model, sharded under ZeRO-3, replicated below it."""
    if reference == "auto":
        if use_peft:
            return "adapter"
        return "sharded" if zero_stage == 3 else "replicated"
    if reference == "sharded" and zero_stage != 3:
        raise ArgumentError(
            f"--reference sharded needs a ZeRO-3 --deepspeed config (this one is stage {zero_stage}); "
            "use ds_configs/zero3.json or --reference replicated."
        )
    if reference == "replicated" and zero_stage == 3:
        raise ArgumentError("--reference replicated is not possible under ZeRO-3 (it shards every model); use sharded.")
    return reference


def count_real_tokens(batch: dict) -> int:
    """Unpadded tokens the policy sees in one trl-0.22 batch: (prompt + chosen) + (prompt + rejected)."""
    total = 0
    if "prompt_attention_mask" in batch:
        total += 2 * int(batch["prompt_attention_mask"].sum())
    for key in ("chosen_attention_mask", "rejected_attention_mask"):
        if key in batch:
            total += int(batch[key].sum())
    return total


class DpoDistTrainerMixin:
    """Mixed in front of either trainer class (DPOTrainer or GaudiDPOTrainer)."""

    real_tokens_seen: int = 0
    pairs_seen: int = 0
    token_counter = staticmethod(count_real_tokens)

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        # LoRA leaves the no-decay group empty; DeepSpeed drops empty groups and the LR scheduler
        # then zips mismatched lists (DESIGN.md §6). Drop them here, before either sees them.
        opt = getattr(optimizer, "optimizer", optimizer)
        opt.param_groups[:] = [g for g in opt.param_groups if len(g["params"]) > 0]
        return optimizer

    def compute_loss(self, model, inputs, *args, **kwargs):
        if model.training:
            self.real_tokens_seen += self.token_counter(inputs)
            ids = inputs.get("chosen_input_ids")
            self.pairs_seen += int(ids.shape[0]) if ids is not None else 0
        return super().compute_loss(model, inputs, *args, **kwargs)


@dataclass
class TrainingSetup:
    """What must exist before the model loads (DeepSpeed ZeRO-3 and Gaudi both hook from_pretrained)."""

    api: str  # "trl" | "gaudi"
    args: Any  # DPOConfig, or Gaudi training args
    zero_stage: int
    reference: str
    gaudi_config: Any = None
    model_load_kwargs: Optional[dict] = None


def dpo_config_kwargs(model_args, data_args, train_args, *, reference: str) -> dict:
    """trl 0.22 DPOConfig keywords from the project's arguments (pure)."""
    t = train_args
    return dict(
        output_dir=t.output_dir,
        overwrite_output_dir=t.overwrite_output_dir,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if t.eval_steps else "no",
        eval_steps=t.eval_steps,
        bf16=t.bf16,
        seed=t.seed,
        data_seed=t.seed,
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        deepspeed=t.deepspeed,
        report_to=t.report_to,
        remove_unused_columns=False,
        dataloader_num_workers=t.dataloader_num_workers,
        ddp_timeout=t.dist_timeout,
        # DPO
        beta=t.beta,
        loss_type=t.loss_type,
        label_smoothing=t.label_smoothing,
        max_length=t.max_length,
        max_prompt_length=t.max_prompt_length,
        max_completion_length=t.max_completion_length,
        truncation_mode="keep_end",
        precompute_ref_log_probs=reference == "precomputed",
        force_use_ref_model=model_args.use_peft and reference in ("sharded", "replicated"),
    )


def build_training_setup(backend, model_args, data_args, train_args) -> TrainingSetup:
    """Build the trainer's config object. Call this BEFORE loading any model."""
    zero_stage = zero_stage_of(train_args.deepspeed)
    reference = resolve_reference(train_args.reference, model_args.use_peft, zero_stage)
    if backend.trainer_api == "gaudi":
        from dpo_dist import trainers_gaudi

        args, gaudi_config = trainers_gaudi.build_gaudi_training_args(model_args, data_args, train_args)
        return TrainingSetup(
            "gaudi", args, zero_stage, reference, gaudi_config, trainers_gaudi.model_load_kwargs_gaudi(train_args)
        )
    from trl import DPOConfig

    args = DPOConfig(**dpo_config_kwargs(model_args, data_args, train_args, reference=reference))
    return TrainingSetup("trl", args, zero_stage, reference, None, {})


def build_trainer(setup: TrainingSetup, *, model_args, data_args, train_args, model, ref_model, tokenizer,
                  train_dataset, eval_dataset, peft_config, callbacks):
    if setup.api == "gaudi":
        from dpo_dist import trainers_gaudi

        return trainers_gaudi.build_gaudi_trainer(
            training_args=setup.args, gaudi_config=setup.gaudi_config, model=model, ref_model=ref_model,
            tokenizer=tokenizer, train_dataset=train_dataset, eval_dataset=eval_dataset, peft_config=peft_config,
            callbacks=callbacks, trainer_cls_mixin=DpoDistTrainerMixin, model_args=model_args,
            data_args=data_args, train_args=train_args,
        )
    from trl import DPOTrainer

    cls = type("DpoDistDPOTrainer", (DpoDistTrainerMixin, DPOTrainer), {})
    return cls(
        model=model,
        ref_model=ref_model,
        args=setup.args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
