"""Rank entry: arguments → data → models → trainer → train → save → metrics.

Run one process per card under `deepspeed`, `torchrun`, optimum-habana's `gaudi_spawn.py`,
or plain `python -m dpo_dist.dpo` for one process. The launcher (`python -m launch train`)
builds that command for you.

    deepspeed --num_accelerators 2 --module dpo_dist.dpo \
        --model_name_or_path .cache/dpo-dist/tiny-v3/llama --dataset_name .cache/dpo-dist/tiny-v3/data \
        --deepspeed ds_configs/zero3.json --output_dir runs/x
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from dpo_dist.args import ARG_DATACLASSES
from dpo_dist.backend import apply_env, get_backend
from dpo_dist.data.preference import apply_length_policy, load_preference_splits, with_bos
from dpo_dist.model.loader import load_model, load_tokenizer, lora_config
from dpo_dist.model.moe import mark_moe_leaves
from dpo_dist.train.deepspeed import weights_bf16
from dpo_dist.train.recorder import RunRecorder, _dist_reduce, collect_metrics, current_rss_bytes
from dpo_dist.train.reshard import finish_reshard, prepare_reshard, watch_reshard
from dpo_dist.train.runtime import exit_now, rank_main
from dpo_dist.train.trl_trainer import build_trainer, build_training_setup
from dpo_dist.util.atomic import write_json_atomic
from dpo_dist.util.checkpoint import resolve_checkpoint
from dpo_dist.util.layout import DIAGNOSTICS_FILE, METRICS_FILE

logger = logging.getLogger("dpo_dist")


def run(model_args, data_args, train_args) -> dict:
    wall_start = time.perf_counter()
    from transformers import set_seed  # heavy: transformers loads torch

    backend = get_backend(train_args.device)
    apply_env(backend)
    checkpoint = resolve_checkpoint(train_args)
    reshard = prepare_reshard(checkpoint, train_args)  # saved by another number of ranks: accumulation, DS config
    # The trainer config comes first: under ZeRO-3 (and on Gaudi) it hooks from_pretrained.
    setup = build_training_setup(backend, model_args, data_args, train_args)
    finish_reshard(reshard, setup.args)  # rank 0 converts to DeepSpeed's universal checkpoint, the others wait
    logger.info("backend=%s world_size=%d zero_stage=%d reference=%s", backend.device, setup.args.world_size,
                setup.zero_stage, setup.reference)

    tokenizer = load_tokenizer(model_args)
    with setup.args.main_process_first(desc="dataset"):
        train, held_out = load_preference_splits(data_args, train_args.seed, tokenizer)
        train, held_out = with_bos(train, tokenizer), with_bos(held_out, tokenizer)
        lengths = dict(max_length=train_args.max_length, max_prompt_length=train_args.max_prompt_length,
                       max_completion_length=train_args.max_completion_length, mode=data_args.overlong)
        train, _ = apply_length_policy(train, tokenizer, **lengths, split_name="train")
        held_out, _ = apply_length_policy(held_out, tokenizer, **lengths, split_name="test")
    logger.info("data: %d training pairs, %d held-out pairs", len(train), len(held_out))

    set_seed(train_args.seed)
    rss_before_model = current_rss_bytes()  # the process before any model: baseline for the planner check
    varlen = train_args.packing and backend.packing_attention == "varlen"
    def load():  # every model: policy, sharded reference, the reference cache's
        model, family = load_model(model_args, device=backend.device, bf16=weights_bf16(backend, train_args.bf16),
                                   extra_kwargs=setup.model_load_kwargs, packing=varlen)
        mark_moe_leaves(model, family, setup.zero_stage)  # before DeepSpeed wraps it (dpo_dist/model/moe.py)
        return model, family
    model, family = load()
    ref_model = None
    if setup.reference in ("sharded", "replicated"):
        ref_model, _ = load()
    peft_config = lora_config(model_args, family) if model_args.use_peft else None
    if train_args.gradient_checkpointing:
        model.config.use_cache = False

    recorder = RunRecorder(train_args.diagnostics)
    recorder.warmup_steps = train_args.throughput_warmup_steps
    set_seed(train_args.seed)  # PEFT creates the adapter inside the trainer: seed right before it
    trainer = build_trainer(
        setup, backend=backend, model_args=model_args, data_args=data_args, train_args=train_args, model=model, ref_model=ref_model,
        tokenizer=tokenizer, train_dataset=train, eval_dataset=held_out, peft_config=peft_config,
        callbacks=[recorder.callback],
        load_reference=lambda: load()[0],
    )
    recorder.trainer = trainer
    watch_reshard(reshard, trainer)

    trainer.train(resume_from_checkpoint=checkpoint)
    eval_metrics = trainer.evaluate()
    trainer.save_model(train_args.output_dir)
    metrics = collect_metrics(
        trainer=trainer, setup=setup, backend=backend, model_args=model_args, train_args=train_args,
        eval_metrics=eval_metrics, recorder=recorder, wall_start=wall_start,
    )
    (metrics["rss_before_model_gib_max"],) = [x / 2**30 for x in _dist_reduce(
        [float(rss_before_model)], "max", trainer.accelerator.device)]
    if trainer.is_world_process_zero():
        out = Path(train_args.output_dir)
        write_json_atomic(out / METRICS_FILE, metrics)
        if train_args.diagnostics:
            write_json_atomic(out / DIAGNOSTICS_FILE, recorder.diag)
        logger.info(
            "done: %d steps, loss %.4f -> %.4f, held-out reward accuracy %.3f, %.2f pairs/s, metrics in %s",
            metrics["steps"], metrics["first_train_loss"] or float("nan"), metrics["last_train_loss"] or float("nan"),
            metrics["eval_reward_accuracy"] or float("nan"), metrics["pairs_per_s"], out / METRICS_FILE,
        )
    trainer.accelerator.wait_for_everyone()
    return metrics


def main(argv: list[str] | None = None) -> int:
    return rank_main("dpo_dist.dpo", argv, ARG_DATACLASSES, run)



if __name__ == "__main__":
    exit_now(main())
