"""The trainer adapter: one argument set, one engine, two DPO trainer APIs.

- CPU / CUDA: trl 0.22 ``DPOTrainer(args=DPOConfig, processing_class=...)``.
- HPU: optimum-habana's ``GaudiDPOTrainer`` (trl 0.9.6 keyword style); its argument mapping is in
  ``gaudi_trainer.py``.

The trainer classes run the loop (optimizer, DeepSpeed, HPU graphs, checkpoints, logging).
``EngineTrainerMixin``, mixed in front of either, hands every DPO computation to the engine
(``engine.py``): the batches (collator, bucket and packed-total sampler), the policy and reference
log-probs and the loss with its metrics. The reference comes from the cached log-probs in the
batch (``refcache.py``), the adapter-disabled policy (LoRA) or a second model.

Hand-written here, beyond the mapping: the reference-strategy rule, real-token counting for tokens/s,
and the fix for the empty-param-group crash (LoRA + torch>=2.10 + DeepSpeed, fixed upstream in
transformers after 4.55).

trl 0.22 configurations the engine does not reproduce (``--no_chunked_logps``; trl-only options such
as ``rpo_alpha`` or ``padding_free`` that ``dpo_dist.dpo`` does not pass) fall back to trl's own
forward and loss.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from dpo_dist.data.bucketing import (
    BucketBatchSampler,
    PackedBatchSampler,
    choose_buckets,
    fed_tokens,
    padding_fraction,
    pair_packed_lengths,
    pair_row_lengths,
    unpadded_tokens,
)
from dpo_dist.train import gaudi_trainer
from dpo_dist.train.deepspeed import check_bf16, weights_bf16, zero_stage_of
from dpo_dist.train.engine import EngineCollator, EngineConfig, forward_logps, loss_and_metrics
from dpo_dist.train.recorder import _dist_reduce
from dpo_dist.train.refcache import attach_reference_cache
from dpo_dist.train.reference import resolve_reference
from dpo_dist.util.errors import ArgumentError
from dpo_dist.util.tracking import report_to_value

logger = logging.getLogger(__name__)


def count_real_tokens(batch: dict) -> int:
    """Unpadded tokens the policy sees in one batch (trl 0.22 / engine layout): (prompt + chosen) + (prompt + rejected)."""
    total = 0
    if "prompt_attention_mask" in batch:
        total += 2 * int(batch["prompt_attention_mask"].sum())
    for key in ("chosen_attention_mask", "rejected_attention_mask"):
        if key in batch:
            total += int(batch[key].sum())
    return total


def engine_config(backend, train_args, pad_token_id: int) -> EngineConfig:
    """The engine's settings from the project's arguments and the backend's row of the table."""
    return EngineConfig(
        max_length=train_args.max_length, max_prompt_length=train_args.max_prompt_length,
        max_completion_length=train_args.max_completion_length, pad_token_id=int(pad_token_id),
        loss_type=train_args.loss_type, beta=float(train_args.beta), label_smoothing=float(train_args.label_smoothing),
        chunked=bool(train_args.chunked_logps), packing=bool(train_args.packing),
        packing_attention=backend.packing_attention, static_shapes=backend.static_shapes,
        forward_kwargs=dict(backend.forward_kwargs), share_prompt=bool(train_args.packing and train_args.share_prompt),
    )


class EngineTrainerMixin:
    """Mixed in front of either trainer class (DPOTrainer or GaudiDPOTrainer): DPO steps come from the engine."""

    dpodist_engine: EngineConfig | None = None  # None: the trainer's own forward and loss (trl 0.22 fallback)
    dpodist_buckets: list | None = None  # bucket lengths (or packed totals) of the training batches
    real_tokens_seen: int = 0
    pairs_seen: int = 0
    fed_tokens_seen: int = 0  # real + padding tokens of the policy forwards (padding fraction)
    unpadded_tokens_seen: int = 0  # the policy forwards' tokens without padding (a shared prompt counted once)
    shapes_seen: set | None = None  # (static shapes) batch shapes met so far: a new one is a graph compile
    new_shape_steps: int = 0  # micro-steps that met a new shape
    _dpodist_ref_cached_init: bool = False

    # Both trainers refuse ref_model=None without PEFT or their own precompute. With the engine's cache the
    # log-probs arrive as dataset columns, so during __init__ only, report "no separate reference needed".
    @property
    def is_peft_model(self):
        return self.__dict__.get("_is_peft_model", False) or self._dpodist_ref_cached_init

    @is_peft_model.setter
    def is_peft_model(self, value):
        self.__dict__["_is_peft_model"] = value

    def concatenated_forward(self, model, batch, is_ref_model: bool = False):
        if self.dpodist_engine is None:
            if any(k in batch for k in ("chosen_pad_to", "packed_pad_to", "packed_input_ids")):
                raise RuntimeError("length buckets and packing need the engine (--chunked_logps); this configuration "
                                   "falls back to TRL's forward")
            return super().concatenated_forward(model, batch, is_ref_model=is_ref_model)
        return forward_logps(model, batch, self.dpodist_engine)

    def dpodist_reference_logps(self, batch):
        """(chosen, rejected) reference log-probs of ``batch``: cached in the batch, the adapter-disabled policy,
        or the separate reference model."""
        if "ref_chosen_logps" in batch and "ref_rejected_logps" in batch:
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        import torch

        with torch.no_grad():
            if self.ref_model is None:
                with self.null_ref_context():
                    out = forward_logps(self.model, batch, self.dpodist_engine)
            else:
                out = forward_logps(self.ref_model, batch, self.dpodist_engine)
        return out["chosen_logps"], out["rejected_logps"]

    def get_batch_loss_metrics(self, model, batch, train_eval="train"):
        if self.dpodist_engine is None:
            return super().get_batch_loss_metrics(model, batch, train_eval=train_eval)
        policy = forward_logps(model, batch, self.dpodist_engine)
        ref_chosen, ref_rejected = self.dpodist_reference_logps(batch)
        return loss_and_metrics(policy, ref_chosen, ref_rejected, self.dpodist_engine,
                                gather=self.accelerator.gather_for_metrics, train_eval=train_eval,
                                running=getattr(self, "running", None))

    def get_train_dataloader(self):
        if not self.dpodist_buckets:
            return super().get_train_dataloader()
        from torch.utils.data import DataLoader

        sampler = self._dpodist_sampler()

        class _Loader(DataLoader):
            def set_epoch(self, epoch):
                sampler.set_epoch(epoch)

        return _Loader(self.train_dataset, batch_sampler=sampler, collate_fn=self.data_collator,
                       num_workers=self.args.dataloader_num_workers)

    def _dpodist_sampler(self):
        """This rank's batch sampler for --length_buckets: grouped by row bucket, or balanced packed totals."""

        e = self.dpodist_engine
        kw = dict(num_replicas=self.args.world_size, rank=self.args.process_index, seed=self.args.seed)
        if e.packing:
            return PackedBatchSampler(pair_packed_lengths(self.train_dataset, e.max_length, e.share_prompt),
                                      self.args.per_device_train_batch_size, **kw)
        chosen, rejected = pair_row_lengths(self.train_dataset, e.max_length)
        return BucketBatchSampler(chosen, rejected, self.dpodist_buckets, self.args.per_device_train_batch_size, **kw)

    def _dpodist_epochs(self, batches_per_epoch: int) -> int:
        """Epochs the run will draw batches from (the bucket totals must cover every one of them)."""
        import math

        a = self.args
        if a.max_steps and a.max_steps > 0:
            return max(1, math.ceil(a.max_steps * a.gradient_accumulation_steps / max(1, batches_per_epoch)))
        return max(1, math.ceil(a.num_train_epochs))

    def dpodist_choose_buckets(self, k: int) -> tuple[list, float]:
        """(bucket lengths, padding fraction they give) for this run's data: row lengths, or with
        packing the packed totals of every batch the sampler will form (all ranks, all epochs)."""

        if self.dpodist_engine.packing:
            sampler = self._dpodist_sampler()
            lengths = sampler.totals(self._dpodist_epochs(len(sampler)))
        else:
            chosen, rejected = pair_row_lengths(self.train_dataset, self.dpodist_engine.max_length)
            lengths = chosen + rejected
        buckets = choose_buckets(lengths, k)
        return buckets, padding_fraction(lengths, buckets)

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        # LoRA leaves the no-decay group empty; DeepSpeed drops empty groups and the LR scheduler
        # then zips mismatched lists. Drop them here, before either sees them.
        opt = getattr(optimizer, "optimizer", optimizer)
        opt.param_groups[:] = [g for g in opt.param_groups if len(g["params"]) > 0]
        return optimizer

    _dpodist_log_mark: tuple | None = None  # (time, pairs, real tokens, fed, unpadded) at the last training log

    def dpodist_interval_figures(self) -> dict:
        """Throughput and padding since the previous training log, summed over ranks: pairs/s, real tokens/s, the
        padding fraction of the policy forwards and seconds per optimizer step. Every rank calls it at the same
        log (the loss is all-reduced there too), so the one all-reduce here is matched."""
        now = (time.perf_counter(), self.pairs_seen, self.real_tokens_seen, self.fed_tokens_seen,
               self.unpadded_tokens_seen)
        mark, self._dpodist_log_mark = self._dpodist_log_mark, now
        step = self.state.global_step
        last_step, self._dpodist_log_step = getattr(self, "_dpodist_log_step", 0), step
        if mark is None:
            return {}
        pairs, tokens, fed, unpadded = _dist_reduce([float(a - b) for a, b in zip(now[1:], mark[1:])], "sum",
                                                    self.accelerator.device)
        secs = max(now[0] - mark[0], 1e-9)
        out = {"pairs_per_s": pairs / secs, "tokens_per_s": tokens / secs}
        if fed:
            out["padding_fraction"] = 1.0 - unpadded / fed
        if step > last_step:
            out["step_time_s"] = secs / (step - last_step)
        return out

    def log(self, logs, *args, **kwargs):
        """dpo-dist's figures join each training log (and so the trackers, the console and the log history): pairs/s,
        tokens/s (real tokens), padding fraction and step time over the interval since the previous log."""
        if "loss" in logs:  # a training log: every rank is here
            logs.update({k: round(v, 6) for k, v in self.dpodist_interval_figures().items()})
        return super().log(logs, *args, **kwargs)

    def compute_loss(self, model, inputs, *args, **kwargs):
        if model.training and self._dpodist_log_mark is None:  # the first interval starts with the first step
            self._dpodist_log_mark = (time.perf_counter(), self.pairs_seen, self.real_tokens_seen,
                                      self.fed_tokens_seen, self.unpadded_tokens_seen)
            self._dpodist_log_step = self.state.global_step
        if model.training:

            self.real_tokens_seen += count_real_tokens(inputs)
            max_length = self.dpodist_engine.max_length if self.dpodist_engine else getattr(self, "max_length", None)
            self.fed_tokens_seen += fed_tokens(inputs, max_length)
            self.unpadded_tokens_seen += unpadded_tokens(inputs, max_length)
            ids = inputs.get("chosen_input_ids")
            self.pairs_seen += int(ids.shape[0]) if ids is not None else 0
            if self.shapes_seen is not None:
                shape = batch_shape(inputs)
                if shape not in self.shapes_seen:
                    self.shapes_seen.add(shape)
                    self.new_shape_steps += 1
        return super().compute_loss(model, inputs, *args, **kwargs)


def batch_shape(batch: dict) -> tuple:
    """The padded shape(s) the model sees for ``batch``: what a graph-compiling device compiles per."""
    if "packed_input_ids" in batch:
        return ("packed", int(batch["packed_input_ids"].shape[1]))
    if "chosen_pad_to" in batch:
        return ("rows", int(batch["chosen_pad_to"]), int(batch["rejected_pad_to"]), int(batch["chosen_input_ids"].shape[0]))
    return ("raw", tuple(int(batch[k].shape[1]) for k in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")))


@dataclass
class TrainingSetup:
    """What must exist before the model loads (DeepSpeed ZeRO-3 and Gaudi both hook from_pretrained)."""

    api: str  # "trl" | "gaudi"
    args: Any  # DPOConfig, or Gaudi training args
    zero_stage: int
    reference: str
    gaudi_config: Any = None
    model_load_kwargs: dict | None = None


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
        report_to=report_to_value(t.report_to),  # several trackers: a list (transformers reads a string as one)
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
        # "precomputed" is dpo-dist's reference cache (dpo_dist/train/refcache.py), not TRL's own
        # precompute (which refuses ZeRO-3 and keeps the reference model in memory).
        precompute_ref_log_probs=False,
        force_use_ref_model=model_args.use_peft and reference in ("sharded", "replicated"),
    )


def build_training_setup(backend, model_args, data_args, train_args) -> TrainingSetup:
    """Build the trainer's config object. Call this BEFORE loading any model."""
    zero_stage = zero_stage_of(train_args.deepspeed)
    reference = resolve_reference(train_args.reference, model_args.use_peft, zero_stage)
    if backend.trainer_api == "gaudi":
        args, gaudi_config = gaudi_trainer.build_gaudi_training_args(model_args, data_args, train_args, backend,
                                                                          reference)
        return TrainingSetup(
            "gaudi", args, zero_stage, reference, gaudi_config, gaudi_trainer.model_load_kwargs_gaudi(train_args)
        )
    from trl import DPOConfig

    check_bf16(backend, train_args.bf16, train_args.deepspeed)
    kwargs = dpo_config_kwargs(model_args, data_args, train_args, reference=reference)
    kwargs["bf16"] = weights_bf16(backend, train_args.bf16)
    args = DPOConfig(**kwargs)
    return TrainingSetup("trl", args, zero_stage, reference, None, {})


def build_trainer(setup: TrainingSetup, *, backend, model_args, data_args, train_args, model, ref_model, tokenizer,
                  train_dataset, eval_dataset, peft_config, callbacks, load_reference=None):
    cached = setup.reference == "precomputed"
    packing = bool(train_args.packing)
    if packing and backend.packing_attention == "varlen":
        from dpo_dist.model.packing import packable  # deferred: torch (ranks only)

        if not packable(model):
            raise ArgumentError("--packing needs the model loaded with dpo-dist's varlen attention (dpo_dist.dpo does "
                                "this unless --attn_implementation names another one): drop --attn_implementation "
                                "or --packing.")
    engine = engine_config(backend, train_args, tokenizer.pad_token_id) if train_args.chunked_logps else None
    if engine is None and (packing or train_args.length_buckets or setup.api == "gaudi"):
        raise ArgumentError("--no_chunked_logps turns the engine off, and --packing, --length_buckets and the HPU "
                            "trainer need it: drop --no_chunked_logps.")
    attrs = {"dpodist_engine": engine, "_dpodist_ref_cached_init": cached,
             "shapes_seen": set() if backend.static_shapes else None}
    collator = EngineCollator(engine) if engine is not None else None
    if setup.api == "gaudi":
        trainer = gaudi_trainer.build_gaudi_trainer(
            training_args=setup.args, gaudi_config=setup.gaudi_config, model=model, ref_model=ref_model,
            tokenizer=tokenizer, train_dataset=train_dataset, eval_dataset=eval_dataset, peft_config=peft_config,
            callbacks=callbacks, data_collator=collator, mixin=EngineTrainerMixin, attrs=attrs,
            model_args=model_args, train_args=train_args, reference=setup.reference,
        )
    else:
        from trl import DPOTrainer

        cls = type("DpoDistDPOTrainer", (EngineTrainerMixin, DPOTrainer), attrs)
        trainer = cls(
            model=model, ref_model=None if cached else ref_model, args=setup.args, data_collator=collator,
            train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=tokenizer,
            peft_config=peft_config, callbacks=callbacks,
        )
    type(trainer)._dpodist_ref_cached_init = False  # only __init__'s checks see the cached reference as "no model"
    k = int(train_args.length_buckets or 0)
    if k == 0 and backend.static_shapes:
        k = 1  # one shape at most max_length long: what GaudiDPOTrainer itself pads every batch to
    if k > 0:
        trainer.dpodist_buckets, frac = trainer.dpodist_choose_buckets(k)
        collator.buckets = trainer.dpodist_buckets
        logger.info("length buckets (%d): %s; padding %.1f%% (%s)", len(trainer.dpodist_buckets),
                    trainer.dpodist_buckets, 100 * frac,
                    "packed batch totals padded to their bucket" if packing else "rows padded to their bucket")
    if cached:

        if load_reference is None:
            raise ArgumentError("--reference precomputed: no way to load the reference model (load_reference)")
        trainer.dpodist_ref_cache = attach_reference_cache(
            trainer, model_path=model_args.model_name_or_path, load_model=load_reference,
            cache_dir=getattr(train_args, "ref_cache_dir", None), bf16=bool(train_args.bf16))
    return trainer
