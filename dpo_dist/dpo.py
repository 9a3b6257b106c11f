"""Rank entry: arguments → data → models → trainer → train → save → metrics.

Run one process per card under `deepspeed`, `torchrun`, optimum-habana's `gaudi_spawn.py`,
or plain `python -m dpo_dist.dpo` for one process. The launcher (`python -m launch train`)
builds that command for you.

    deepspeed --num_accelerators 2 --module dpo_dist.dpo \
        --model_name_or_path .cache/dpo-dist/tiny-v1/llama --dataset_name .cache/dpo-dist/tiny-v1/data \
        --deepspeed ds_configs/zero3.json --output_dir runs/x
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional

from dpo_dist.args import ArgumentError, UserError, parse_args, validate
from dpo_dist.logging_utils import setup_logging

logger = logging.getLogger("dpo_dist")

METRICS_FILE = "training_metrics.json"
DIAGNOSTICS_FILE = "diagnostics.json"


def check_output_dir(train_args) -> None:
    """Refuse a non-empty output_dir (unless overwriting or resuming) and one we cannot write. Creates nothing."""
    out = Path(train_args.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ArgumentError(f"--output_dir {out}: exists and is not a folder; choose another path.")
    if out.is_dir() and any(out.iterdir()) and not (train_args.overwrite_output_dir or train_args.resume_from_checkpoint):
        raise ArgumentError(
            f"--output_dir {out}: exists and is not empty. Nothing was changed. Pass --overwrite_output_dir to write "
            "into it (existing files are kept unless replaced), --resume_from_checkpoint latest to continue, or choose "
            "a new folder."
        )
    merged = Path(str(out).rstrip("/") + "_merged")
    if not train_args.no_merge and merged.is_dir() and any(merged.iterdir()) and not train_args.overwrite_output_dir:
        raise ArgumentError(
            f"{merged} (where the merged model goes) exists and is not empty. Nothing was changed. Pass "
            "--overwrite_output_dir to replace it after a successful merge, --no_merge to skip the merge, or choose "
            "a new --output_dir."
        )
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ArgumentError(f"--output_dir {out}: {parent} is not writable; choose a folder you can write to.")


def resolve_checkpoint(train_args) -> Optional[str]:
    value = train_args.resume_from_checkpoint
    if not value:
        return None
    from transformers.trainer_utils import get_last_checkpoint

    if value == "latest":
        last = get_last_checkpoint(train_args.output_dir) if os.path.isdir(train_args.output_dir) else None
        if last is None:
            raise ArgumentError(
                f"--resume_from_checkpoint latest: no checkpoint-* folder in {train_args.output_dir}; "
                "start without --resume_from_checkpoint or point it at a checkpoint folder."
            )
        return last
    if not os.path.isfile(os.path.join(value, "trainer_state.json")):
        raise ArgumentError(
            f"--resume_from_checkpoint {value}: not a checkpoint folder (no trainer_state.json); the checkpoint is "
            "missing or partial. Use another checkpoint-* folder or 'latest'."
        )
    return value


def _dist_reduce(values: list[float], op: str, device) -> list[float]:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def _gather_objects(obj) -> list:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shard_report(module, world_size: int) -> dict:
    """What this rank holds of each parameter. Under ZeRO-3 a parameter's local partition is `ds_tensor`
    and `param.data` is empty between forwards unless it is below the persistence threshold."""
    rows = []
    for name, p in module.named_parameters():
        full = int(getattr(p, "ds_numel", p.numel()))
        part = int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else full
        rows.append({"name": name, "full": full, "partition": part, "materialized": int(p.data.numel())})
    return {"world_size": world_size, "params": rows}


class RunRecorder:
    """Trainer callback: timing, plus (with --diagnostics) reference log-probs before/after and shard sizes."""

    def __init__(self, diagnostics: bool):
        from transformers import TrainerCallback

        self.diagnostics = diagnostics
        self.trainer = None
        self.t_train = None
        self.train_seconds = 0.0
        self.diag: dict = {}
        recorder = self

        class _CB(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                if recorder.diagnostics:
                    recorder.diag["reference_logps_before"] = recorder.reference_logps()
                recorder.t_train = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                if recorder.diagnostics and "shards" not in recorder.diag:
                    recorder.diag["shards"] = recorder.shards()

            def on_train_end(self, args, state, control, **kw):
                recorder.train_seconds = time.perf_counter() - recorder.t_train
                if recorder.diagnostics:
                    recorder.diag["reference_logps_after"] = recorder.reference_logps()

        self.callback = _CB()

    def reference_logps(self) -> dict:
        trainer = self.trainer
        batch = next(iter(trainer.get_eval_dataloader()))
        batch = trainer._prepare_inputs(batch)
        # trl 0.22 names it compute_ref_log_probs; trl 0.9.6 (Gaudi) compute_reference_log_probs.
        compute = getattr(trainer, "compute_ref_log_probs", None) or trainer.compute_reference_log_probs
        chosen, rejected = compute(batch)
        return {"chosen": chosen.float().cpu().tolist(), "rejected": rejected.float().cpu().tolist()}

    def shards(self) -> dict:
        trainer = self.trainer
        world = trainer.args.world_size
        policy = _gather_objects(shard_report(trainer.model, world))
        ref = trainer.ref_model
        ref = getattr(ref, "module", ref)
        reference = _gather_objects(shard_report(ref, world)) if ref is not None else None
        return {"policy": policy, "reference": reference}


def train_losses(log_history: list[dict]) -> list[float]:
    return [h["loss"] for h in log_history if "loss" in h and "eval_loss" not in h]


def collect_metrics(*, trainer, setup, backend, model_args, train_args, eval_metrics, recorder, wall_start) -> dict:
    from dpo_dist.backend import peak_memory_bytes

    device = trainer.accelerator.device
    pairs, tokens = _dist_reduce([float(trainer.pairs_seen), float(trainer.real_tokens_seen)], "sum", device)
    (peak,) = _dist_reduce([float(peak_memory_bytes(backend))], "max", device)
    losses = train_losses(trainer.state.log_history)
    secs = max(recorder.train_seconds, 1e-9)
    return {
        "backend": backend.device,
        "dist_backend": backend.dist_backend,
        "trainer_api": setup.api,
        "world_size": trainer.args.world_size,
        "zero_stage": setup.zero_stage,
        "reference": setup.reference,
        "use_peft": model_args.use_peft,
        "model": model_args.model_name_or_path,
        "loss_type": train_args.loss_type,
        "beta": train_args.beta,
        "steps": trainer.state.global_step,
        "pairs_trained": int(pairs),
        "first_train_loss": losses[0] if losses else None,
        "last_train_loss": losses[-1] if losses else None,
        "train_losses": losses,
        "eval_reward_accuracy": eval_metrics.get("eval_rewards/accuracies"),
        "eval_reward_margin": eval_metrics.get("eval_rewards/margins"),
        "eval_loss": eval_metrics.get("eval_loss"),
        "pairs_per_s": pairs / secs,
        "tokens_per_s": tokens / secs,
        "real_tokens": int(tokens),
        "peak_memory_gib_per_rank_max": peak / 2**30,
        "train_seconds": recorder.train_seconds,
        "wall_seconds": time.perf_counter() - wall_start,
    }


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def run(model_args, data_args, train_args) -> dict:
    wall_start = time.perf_counter()
    from transformers import set_seed

    from dpo_dist.backend import apply_env, get_backend
    from dpo_dist.data import apply_length_policy, load_preference_splits, with_bos
    from dpo_dist.modeling import load_model, load_tokenizer, lora_config
    from dpo_dist.trainers import build_trainer, build_training_setup

    backend = get_backend(train_args.device)
    apply_env(backend)
    checkpoint = resolve_checkpoint(train_args)
    # The trainer config comes first: under ZeRO-3 (and on Gaudi) it hooks from_pretrained.
    setup = build_training_setup(backend, model_args, data_args, train_args)
    logger.info("backend=%s world_size=%d zero_stage=%d reference=%s", backend.device, setup.args.world_size,
                setup.zero_stage, setup.reference)

    tokenizer = load_tokenizer(model_args)
    with setup.args.main_process_first(desc="dataset"):
        train, held_out = load_preference_splits(data_args, train_args.seed)
        train, held_out = with_bos(train, tokenizer), with_bos(held_out, tokenizer)
        train, _ = apply_length_policy(train, tokenizer, max_length=train_args.max_length, mode=data_args.overlong, split_name="train")
        held_out, _ = apply_length_policy(held_out, tokenizer, max_length=train_args.max_length, mode=data_args.overlong, split_name="test")
    logger.info("data: %d training pairs, %d held-out pairs", len(train), len(held_out))

    set_seed(train_args.seed)
    model, family = load_model(model_args, device=backend.device, bf16=train_args.bf16, extra_kwargs=setup.model_load_kwargs)
    ref_model = None
    if setup.reference in ("sharded", "replicated"):
        ref_model, _ = load_model(model_args, device=backend.device, bf16=train_args.bf16, extra_kwargs=setup.model_load_kwargs)
    peft_config = lora_config(model_args, family) if model_args.use_peft else None
    if train_args.gradient_checkpointing:
        model.config.use_cache = False

    recorder = RunRecorder(train_args.diagnostics)
    set_seed(train_args.seed)  # PEFT creates the adapter inside the trainer: seed right before (DESIGN.md §6)
    trainer = build_trainer(
        setup, model_args=model_args, data_args=data_args, train_args=train_args, model=model, ref_model=ref_model,
        tokenizer=tokenizer, train_dataset=train, eval_dataset=held_out, peft_config=peft_config,
        callbacks=[recorder.callback],
    )
    recorder.trainer = trainer

    trainer.train(resume_from_checkpoint=checkpoint)
    eval_metrics = trainer.evaluate()
    trainer.save_model(train_args.output_dir)
    metrics = collect_metrics(
        trainer=trainer, setup=setup, backend=backend, model_args=model_args, train_args=train_args,
        eval_metrics=eval_metrics, recorder=recorder, wall_start=wall_start,
    )
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


def shutdown_distributed() -> None:
    """Barrier, then destroy the process group: avoids gloo teardown aborts (DESIGN.md §6)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    except Exception:  # best effort at exit
        pass


def post_step(model_args, train_args) -> int:
    """Merge into `<output_dir>_merged` on global rank 0, after the process group is gone.

    Why here and not in the launcher: it then runs the same under every launcher (deepspeed,
    torchrun, gaudi_spawn, plain python), on the node that holds rank 0's output. Why after the
    process group is torn down: a long merge (70B) cannot trip a collective timeout on the ranks
    that already finished. It runs as a fresh process so no DeepSpeed/ZeRO state of training
    (zero.Init hooks, device memory) leaks into loading and verifying the merged model.
    """
    if train_args.no_merge or int(os.environ.get("RANK", "0")) != 0:
        return 0
    import subprocess

    out = str(train_args.output_dir).rstrip("/")
    argv = [sys.executable, "-m", "dpo_dist.merge", "--checkpoint", out, "--output", out + "_merged",
            "--base_model", model_args.model_name_or_path, "--dtype", "bf16" if train_args.bf16 else "fp32"]
    if train_args.overwrite_output_dir:
        argv.append("--overwrite")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "CROSS_RANK", "CROSS_SIZE")}
    logger.info("post-step: merging %s into %s_merged", out, out)
    rc = subprocess.call(argv, env=env)
    if rc != 0:
        print(f"dpo_dist: merge failed (exit {rc}); the training output in {out} is intact. Re-run: "
              f"python -m dpo_dist.merge --checkpoint {out} --output {out}_merged", file=sys.stderr)
    return rc


def main(argv: Optional[list[str]] = None) -> int:
    setup_logging()
    try:
        model_args, data_args, train_args = parse_args(argv)
        validate(model_args, data_args, train_args)
        check_output_dir(train_args)
    except ArgumentError as e:
        print(f"dpo_dist.dpo: error: {e}", file=sys.stderr)
        return 2
    try:
        run(model_args, data_args, train_args)
    except UserError as e:
        logger.error("%s", e)
        print(f"dpo_dist.dpo: error: {e}", file=sys.stderr)
        shutdown_distributed()
        return 2 if isinstance(e, ArgumentError) else 1
    shutdown_distributed()
    return post_step(model_args, train_args)


if __name__ == "__main__":
    sys.exit(main())
