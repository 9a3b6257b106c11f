"""SFT step of the pipeline: supervised fine-tuning on the chosen responses, before DPO.

Same arguments, launcher and ZeRO configs as `dpo_dist.dpo`, less the DPO-only options, which are refused by name
(`dpo_dist.args.DPO_ONLY_OPTIONS`); TRL's `SFTTrainer` does the work
(optimum-habana's `GaudiSFTTrainer` on HPU). The result is merged into `<output_dir>_merged`
like a DPO run, and that folder is DPO's starting point (`sft_dpo_init_merged`).

    deepspeed --num_accelerators 2 --module dpo_dist.sft --model_name_or_path M \
        --dataset_name D --deepspeed ds_configs/zero3.json --output_dir runs/x/sft_dpo_init
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from dpo_dist.args import ARG_DATACLASSES, ModelArguments
from dpo_dist.backend import apply_env, get_backend
from dpo_dist.data.preference import load_preference_splits, with_bos
from dpo_dist.model.loader import load_model, load_tokenizer, lora_config
from dpo_dist.model.moe import mark_moe_leaves
from dpo_dist.train import gaudi_trainer
from dpo_dist.train.deepspeed import check_bf16, weights_bf16, zero_stage_of
from dpo_dist.train.engine import tokenize_pair
from dpo_dist.train.reshard import finish_reshard, prepare_reshard, watch_reshard
from dpo_dist.train.runtime import exit_now, rank_main
from dpo_dist.train.trl_trainer import dpo_config_kwargs
from dpo_dist.util.atomic import write_json_atomic
from dpo_dist.util.checkpoint import resolve_checkpoint
from dpo_dist.util.errors import ArgumentError
from dpo_dist.util.layout import METRICS_FILE

logger = logging.getLogger("dpo_dist.sft")


@dataclass
class SFTArguments:
    """Flags the seed's sft.py users pass, beside the shared ones."""

    split: str | None = field(default=None, metadata={"help": "Training split (alias of --dataset_train_split)."})
    max_seq_length: int | None = field(default=None, metadata={"help": "Max tokens per example (default --max_length)."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Passed to the trainer (kept for the seed's users)."})


def sft_features(row: dict, tokenizer, max_len: int) -> dict:
    """One tokenised SFT example with the loss on the response only (labels -100 on the prompt). The engine's
    tokenisation, so the response ends with EOS; a prompt too long for ``max_len`` keeps its end, as DPO's rows
    do (``prompt_cut`` says so; sft_dataset counts and removes it)."""
    ids = tokenize_pair({"prompt": row["prompt"], "chosen": row["chosen"], "rejected": ""}, tokenizer, None, max_len)
    completion = ids["chosen_input_ids"]
    prompt = ids["prompt_input_ids"][-(max_len - len(completion)):] if len(completion) < max_len else []
    return {"input_ids": prompt + completion, "attention_mask": [1] * (len(prompt) + len(completion)),
            "labels": [-100] * len(prompt) + completion, "prompt_cut": len(prompt) < len(ids["prompt_input_ids"])}


def sft_dataset(ds, tokenizer, max_len: int, *, trainer_api: str, split_name: str):
    """prompt/chosen/rejected → the tokenised rows the SFT trainer gets (sft_features), for both trainers: labels
    for the Gaudi trainer (trl 0.9.6, which would train on the whole text); input_ids + completion_mask for trl
    0.22's SFTTrainer, which takes tokenised rows as they are and puts its completion-only loss on the mask. Its
    own tokenisation would cut a long prompt-and-response at its end, so that a prompt longer than ``max_len``
    left no response to learn: here the prompt keeps its end and the response stays whole, on every backend."""
    out = ds.map(sft_features, fn_kwargs={"tokenizer": tokenizer, "max_len": max_len}, remove_columns=ds.column_names,
                 desc=f"sft features ({split_name})")
    cut = sum(out["prompt_cut"])
    if cut:
        logger.warning("%s: %d of %d prompts are left-truncated to fit max_length=%d tokens with their response (the "
                       "end is kept, as in DPO)", split_name, cut, len(out), max_len)
    out = out.remove_columns("prompt_cut")
    if trainer_api == "gaudi":
        return out
    return out.map(lambda r: {"completion_mask": [int(x != -100) for x in r["labels"]]},
                   remove_columns=["labels", "attention_mask"], desc=f"completion mask ({split_name})")


# Keywords of the trainers' DPO configs that their SFT configs do not take (max_length and remove_unused_columns
# are set for SFT below). The flags SFT refuses are dpo_dist.args.DPO_ONLY_OPTIONS.
DPO_CONFIG_KEYS = {
    "beta", "loss_type", "label_smoothing", "max_length", "max_prompt_length", "max_completion_length",
    "max_target_length", "truncation_mode", "precompute_ref_log_probs", "force_use_ref_model",
    "generate_during_eval", "disable_dropout", "remove_unused_columns",
}


def dpo_config_kwargs_common(train_args) -> dict:
    """The TrainingArguments part of the DPO mapping: one mapping of our flags, shared by SFT and DPO."""
    kw = dpo_config_kwargs(ModelArguments(), None, train_args, reference="adapter")
    return {k: v for k, v in kw.items() if k not in DPO_CONFIG_KEYS}


def run(model_args, data_args, train_args, sft_args):
    from transformers import set_seed  # heavy: transformers loads torch

    backend = get_backend(train_args.device)
    apply_env(backend)
    if sft_args.split:
        data_args.dataset_train_split = sft_args.split
    if sft_args.max_seq_length is not None and sft_args.max_seq_length < 1:
        raise ArgumentError(f"--max_seq_length must be a positive number of tokens (got {sft_args.max_seq_length}); "
                            "leave it out to use --max_length.")
    max_len = sft_args.max_seq_length or train_args.max_length
    checkpoint = resolve_checkpoint(train_args)
    reshard = prepare_reshard(checkpoint, train_args)  # saved by another number of ranks: accumulation, DS config
    if backend.trainer_api == "gaudi":
        from optimum.habana import GaudiConfig  # deferred: HPU only
        from optimum.habana.transformers.modeling_utils import adapt_transformers_to_gaudi  # deferred: HPU only
        from optimum.habana.trl import GaudiSFTConfig, GaudiSFTTrainer  # deferred: HPU only

        adapt_transformers_to_gaudi()  # before any model loads (the twin's args do not call it)
        kw = gaudi_trainer.gaudi_training_args_kwargs(model_args, data_args, train_args, reference="adapter",
                                                       twin=backend.twin)
        kw = {k: v for k, v in kw.items() if k not in DPO_CONFIG_KEYS}
        args = GaudiSFTConfig(**kw, max_seq_length=max_len, packing=False, remove_unused_columns=False)
        gaudi_config = GaudiConfig(**gaudi_trainer.gaudi_config_kwargs(train_args))
        load_kwargs = gaudi_trainer.model_load_kwargs_gaudi(train_args)
    else:
        from trl import SFTConfig, SFTTrainer  # heavy: trl loads torch

        check_bf16(backend, train_args.bf16, train_args.deepspeed)
        kw = {**dpo_config_kwargs_common(train_args), "bf16": weights_bf16(backend, train_args.bf16)}
        args = SFTConfig(**kw, max_length=max_len, completion_only_loss=True, packing=False,
                         remove_unused_columns=sft_args.remove_unused_columns)
        load_kwargs = {}

    finish_reshard(reshard, args)  # rank 0 converts to DeepSpeed's universal checkpoint, the others wait
    tokenizer = load_tokenizer(model_args)
    with args.main_process_first(desc="dataset"):
        train, held_out = load_preference_splits(data_args, train_args.seed, tokenizer)
        train, held_out = with_bos(train, tokenizer), with_bos(held_out, tokenizer)
        train = sft_dataset(train, tokenizer, max_len, trainer_api=backend.trainer_api, split_name="train")
        held_out = sft_dataset(held_out, tokenizer, max_len, trainer_api=backend.trainer_api, split_name="test")
    set_seed(train_args.seed)
    model, family = load_model(model_args, device=backend.device, bf16=weights_bf16(backend, train_args.bf16),
                               extra_kwargs=load_kwargs)
    mark_moe_leaves(model, family, zero_stage_of(train_args.deepspeed))  # before the trainer's DeepSpeed wraps it
    peft_config = lora_config(model_args, family) if model_args.use_peft else None
    set_seed(train_args.seed)
    if backend.trainer_api == "gaudi":
        from transformers import DataCollatorForSeq2Seq  # heavy: transformers loads torch

        # Padded to max_len on a static-shape device: one graph, as GaudiSFTTrainer's own padding gives.
        pad = dict(padding="max_length", max_length=max_len) if backend.static_shapes else {}
        trainer = GaudiSFTTrainer(model=model, args=args, gaudi_config=gaudi_config, train_dataset=train,
                                  eval_dataset=held_out, tokenizer=tokenizer, peft_config=peft_config,
                                  max_seq_length=max_len,
                                  data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, **pad))
    else:
        trainer = SFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=held_out,
                             processing_class=tokenizer, peft_config=peft_config)
    watch_reshard(reshard, trainer)
    trainer.train(resume_from_checkpoint=checkpoint)
    metrics = trainer.evaluate()
    trainer.save_model(train_args.output_dir)
    if trainer.is_world_process_zero():
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        write_json_atomic(Path(train_args.output_dir) / METRICS_FILE, {
            "stage": "sft", "backend": backend.device, "world_size": args.world_size, "steps": trainer.state.global_step,
            "first_train_loss": losses[0] if losses else None, "last_train_loss": losses[-1] if losses else None,
            "train_losses": losses, "eval_loss": metrics.get("eval_loss"), "model": model_args.model_name_or_path,
            "use_peft": model_args.use_peft, "trainer": type(trainer).__name__,
            "loss_token_fraction": loss_token_fraction(trainer.train_dataset),
        })
        logger.info("sft done: %d steps, loss %s -> %s, eval loss %.4f", trainer.state.global_step,
                    losses[0] if losses else None, losses[-1] if losses else None, metrics.get("eval_loss", float("nan")))
    trainer.accelerator.wait_for_everyone()


def loss_token_fraction(ds):
    """Share of the training tokens that carry loss: below 1 when the prompt is left out (response-only SFT). Read from
    the rows the trainer tokenised: labels (-100 = no loss) on the Gaudi path, trl 0.22's completion_mask elsewhere."""
    if "labels" in ds.column_names:
        rows = ds["labels"]
        return sum(sum(x != -100 for x in r) for r in rows) / max(1, sum(len(r) for r in rows))
    if "completion_mask" in ds.column_names:
        rows = ds["completion_mask"]
        return sum(sum(r) for r in rows) / max(1, sum(len(r) for r in rows))
    return None


def main(argv=None) -> int:
    return rank_main("dpo_dist.sft", argv, ARG_DATACLASSES + (SFTArguments,), run, task="sft")


if __name__ == "__main__":
    exit_now(main())
