"""The trainer adapter: one argument set onto two DPO trainer APIs.

- CPU / CUDA: trl 0.22 `DPOTrainer(args=DPOConfig, processing_class=...)`.
- HPU: optimum-habana's `GaudiDPOTrainer` (trl 0.9.6 keyword style), in `trainers_gaudi.py`.

TRL does the DPO. What is hand-written here is small: the mapping of our arguments, the
reference-strategy resolution, real-token counting for tokens/s, the forward that shapes batches
(chunked log-probs, per-row buckets or one packed row: logprobs.py, bucketing.py, packing.py),
and the fix for the empty-param-group crash (DESIGN.md §6: LoRA + torch>=2.10 + DeepSpeed, fixed
upstream in transformers after 4.55).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Optional

from dpo_dist.args import ArgumentError

logger = logging.getLogger(__name__)


def read_ds_config(ds_config) -> Optional[dict]:
    """The --deepspeed config as a dict (a JSON file path, a JSON string or a dict); None without DeepSpeed."""
    if ds_config in (None, ""):
        return None
    if isinstance(ds_config, dict):
        cfg, name = ds_config, "config"
    else:
        name = str(ds_config)
        try:
            if name.lstrip().startswith("{"):
                cfg = json.loads(name)
            else:
                with open(name) as fh:
                    cfg = json.load(fh)
        except OSError as e:
            raise ArgumentError(f"--deepspeed {name}: cannot read it ({e.strerror}).") from e
        except json.JSONDecodeError as e:
            raise ArgumentError(
                f"--deepspeed {name}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}). "
                "Start from a template in ds_configs/."
            ) from e
    if not isinstance(cfg, dict):
        raise ArgumentError(
            f"--deepspeed {name}: expected a JSON object ({{...}}), got a JSON {type(cfg).__name__}. "
            "Start from a template in ds_configs/."
        )
    zero = cfg.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ArgumentError(
            f"--deepspeed {name}: zero_optimization must be an object such as {{\"stage\": 3}}, "
            f"got {zero!r}. Start from a template in ds_configs/."
        )
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ArgumentError(
            f"--deepspeed {name}: zero_optimization.stage must be 0, 1, 2 or 3 (got {stage!r}). "
            "Fix the number (3 shards parameters, gradients and optimizer state), or start from ds_configs/zero3.json."
        )
    return cfg


def zero_stage_of(ds_config) -> int:
    """ZeRO stage named in the --deepspeed config (0 when no DeepSpeed)."""
    cfg = read_ds_config(ds_config)
    return int(cfg.get("zero_optimization", {}).get("stage", 0)) if cfg else 0


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
    fed_tokens_seen: int = 0  # real + padding tokens of the policy forwards (padding fraction)
    token_counter = staticmethod(count_real_tokens)
    # Set by build_trainer (trl path): chunked log-probs, packing, length buckets, reference from the cache.
    dpodist_chunked_logps: bool = False
    dpodist_packing: bool = False
    dpodist_buckets: Optional[list] = None
    _dpodist_ref_cached_init: bool = False

    # trl 0.22 refuses ref_model=None without PEFT or its own precompute (and refuses its
    # precompute under ZeRO-3). With our reference cache the log-probs arrive as dataset columns,
    # so during __init__ only, report "no separate reference needed" (see build_trainer).
    @property
    def is_peft_model(self):
        return self.__dict__.get("_is_peft_model", False) or self._dpodist_ref_cached_init

    @is_peft_model.setter
    def is_peft_model(self, value):
        self.__dict__["_is_peft_model"] = value

    def _dpodist_chunked_ok(self) -> bool:
        """The configurations the chunked forward reproduces; anything else goes to TRL's."""
        a = self.args
        return (self.dpodist_chunked_logps and not self.is_encoder_decoder and not self.is_vision_model
                and not self.padding_free and not self.aux_loss_enabled and not self.use_weighting
                and a.rpo_alpha is None and a.ld_alpha is None and "sft" not in self.loss_type
                and not a.use_liger_loss and not self.use_logits_to_keep)

    def concatenated_forward(self, model, batch, is_ref_model: bool = False):
        if not self._dpodist_chunked_ok():
            if "chosen_pad_to" in batch or "packed_pad_to" in batch:
                raise RuntimeError("length buckets need the chunked forward (--chunked_logps); this configuration "
                                   "falls back to TRL's forward")
            return super().concatenated_forward(model, batch, is_ref_model=is_ref_model)
        import torch

        from dpo_dist.logprobs import build_rows, sequence_logps

        n = batch["prompt_input_ids"].shape[0]
        kw = dict(max_length=self.max_length, truncation_mode=self.truncation_mode, pad_value=self.padding_value)

        def key_rows(key, pad_to=None):  # the chosen (or rejected) rows: prompt + that completion
            return build_rows(batch["prompt_input_ids"], batch["prompt_attention_mask"], batch[f"{key}_input_ids"],
                              batch[f"{key}_attention_mask"], pad_to=pad_to, **kw)

        if self.dpodist_packing:  # all 2n rows in one packed row, padded once to its bucket total
            from dpo_dist.logprobs import packed_sequence_logps
            from dpo_dist.packing import pack_rows

            pad_to = int(batch["packed_pad_to"]) if "packed_pad_to" in batch else None
            packed = pack_rows([key_rows("chosen"), key_rows("rejected")], pad_to=pad_to, pad_value=self.padding_value)
            logps, sums, ntok = packed_sequence_logps(model, packed)
        elif "chosen_pad_to" in batch:  # bucketed: chosen and rejected rows each padded to their own bucket
            parts = [sequence_logps(model, *key_rows(key, int(batch[f"{key}_pad_to"]))) for key in ("chosen", "rejected")]
            logps, sums, ntok = (torch.cat(x) for x in zip(*parts))
        else:
            cat = self.concatenated_inputs(batch, padding_value=self.padding_value)
            rows = build_rows(cat["prompt_input_ids"], cat["prompt_attention_mask"], cat["completion_input_ids"],
                              cat["completion_attention_mask"], **kw)
            logps, sums, ntok = sequence_logps(model, *rows)
        if "ipo" in self.loss_type:
            logps = logps / ntok
        from dpo_dist.logprobs import causal_lm_parts

        vocab = causal_lm_parts(model)[1].out_features
        denom = lambda t: (t.sum() * vocab).clamp(min=1)  # noqa: E731
        return {
            "chosen_logps": logps[:n],
            "rejected_logps": logps[n:],
            "mean_chosen_logits": sums[:n].sum() / denom(ntok[:n]),
            "mean_rejected_logits": sums[n:].sum() / denom(ntok[n:]),
        }

    def get_train_dataloader(self):
        if not self.dpodist_buckets:
            return super().get_train_dataloader()
        from torch.utils.data import DataLoader

        from dpo_dist.bucketing import BucketCollator

        sampler = self._dpodist_sampler()

        class _Loader(DataLoader):
            def set_epoch(self, epoch):
                sampler.set_epoch(epoch)

        return _Loader(self.train_dataset, batch_sampler=sampler,
                       collate_fn=BucketCollator(self.data_collator, self.dpodist_buckets, self.max_length,
                                                 packed=self.dpodist_packing),
                       num_workers=self.args.dataloader_num_workers)

    def _dpodist_sampler(self):
        """This rank's batch sampler for --length_buckets: grouped by row bucket, or balanced packed totals."""
        from dpo_dist.bucketing import BucketBatchSampler, PackedBatchSampler, pair_row_lengths

        chosen, rejected = pair_row_lengths(self.train_dataset, self.max_length)
        kw = dict(num_replicas=self.args.world_size, rank=self.args.process_index, seed=self.args.seed)
        if self.dpodist_packing:
            return PackedBatchSampler([c + r for c, r in zip(chosen, rejected)],
                                      self.args.per_device_train_batch_size, **kw)
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
        from dpo_dist.bucketing import choose_buckets, padding_fraction, pair_row_lengths

        if self.dpodist_packing:
            sampler = self._dpodist_sampler()
            lengths = sampler.totals(self._dpodist_epochs(len(sampler)))
        else:
            chosen, rejected = pair_row_lengths(self.train_dataset, self.max_length)
            lengths = chosen + rejected
        buckets = choose_buckets(lengths, k)
        return buckets, padding_fraction(lengths, buckets)

    def dpodist_fed_tokens(self, inputs) -> int:
        """Real + padding tokens the policy forward gets for this trl-0.22 batch."""
        from dpo_dist.bucketing import fed_tokens

        return fed_tokens(inputs, getattr(self, "max_length", None)) if "prompt_attention_mask" in inputs else 0

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
            self.fed_tokens_seen += self.dpodist_fed_tokens(inputs)
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
        # "precomputed" is dpo-dist's reference cache (dpo_dist/refcache.py), not TRL's own
        # precompute (which refuses ZeRO-3 and keeps the reference model in memory).
        precompute_ref_log_probs=False,
        force_use_ref_model=model_args.use_peft and reference in ("sharded", "replicated"),
    )


def build_training_setup(backend, model_args, data_args, train_args) -> TrainingSetup:
    """Build the trainer's config object. Call this BEFORE loading any model."""
    zero_stage = zero_stage_of(train_args.deepspeed)
    reference = resolve_reference(train_args.reference, model_args.use_peft, zero_stage)
    if backend.trainer_api == "gaudi":
        from dpo_dist import trainers_gaudi

        if getattr(train_args, "packing", False):
            raise ArgumentError("--packing is for the cpu/cuda trainer (trl 0.22): optimum-habana's Gaudi attention "
                                "does not take dpo-dist's varlen attention. Drop --packing on HPU.")

        args, gaudi_config = trainers_gaudi.build_gaudi_training_args(model_args, data_args, train_args)
        return TrainingSetup(
            "gaudi", args, zero_stage, reference, gaudi_config, trainers_gaudi.model_load_kwargs_gaudi(train_args)
        )
    from trl import DPOConfig

    args = DPOConfig(**dpo_config_kwargs(model_args, data_args, train_args, reference=reference))
    return TrainingSetup("trl", args, zero_stage, reference, None, {})


def build_trainer(setup: TrainingSetup, *, model_args, data_args, train_args, model, ref_model, tokenizer,
                  train_dataset, eval_dataset, peft_config, callbacks, load_reference=None):
    if setup.api == "gaudi":
        from dpo_dist import trainers_gaudi

        return trainers_gaudi.build_gaudi_trainer(
            training_args=setup.args, gaudi_config=setup.gaudi_config, model=model, ref_model=ref_model,
            tokenizer=tokenizer, train_dataset=train_dataset, eval_dataset=eval_dataset, peft_config=peft_config,
            callbacks=callbacks, trainer_cls_mixin=DpoDistTrainerMixin, model_args=model_args,
            data_args=data_args, train_args=train_args,
        )
    from trl import DPOTrainer

    cached = setup.reference == "precomputed"
    packing = bool(getattr(train_args, "packing", False))
    if packing:
        from dpo_dist.packing import packable

        if not packable(model):
            raise ArgumentError("--packing needs the model loaded with dpo-dist's varlen attention (dpo_dist.dpo does "
                                "this unless --attn_implementation names another one): drop --attn_implementation "
                                "or --packing.")
    cls = type("DpoDistDPOTrainer", (DpoDistTrainerMixin, DPOTrainer), {
        "dpodist_chunked_logps": bool(getattr(train_args, "chunked_logps", False)),
        "dpodist_packing": packing,
        "_dpodist_ref_cached_init": cached,
    })
    trainer = cls(
        model=model,
        ref_model=None if cached else ref_model,
        args=setup.args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    cls._dpodist_ref_cached_init = False  # only __init__'s checks see the cached reference as "no model needed"
    k = int(getattr(train_args, "length_buckets", 0) or 0)
    if (k > 0 or packing) and not trainer._dpodist_chunked_ok():
        raise ArgumentError("--length_buckets and --packing need --chunked_logps (on by default) and a plain "
                            "sigmoid/ipo-style loss without rpo_alpha/ld_alpha/liger/padding_free.")
    if k > 0:
        trainer.dpodist_buckets, frac = trainer.dpodist_choose_buckets(k)
        logger.info("length buckets (%d): %s; padding %.1f%% (%s)", len(trainer.dpodist_buckets),
                    trainer.dpodist_buckets, 100 * frac,
                    "packed batch totals padded to their bucket" if packing else "rows padded to their bucket")
    if cached:
        from dpo_dist.refcache import attach_reference_cache

        if load_reference is None:
            raise ArgumentError("--reference precomputed: no way to load the reference model (load_reference)")
        trainer.dpodist_ref_cache = attach_reference_cache(
            trainer, model_path=model_args.model_name_or_path, load_model=load_reference,
            cache_dir=getattr(train_args, "ref_cache_dir", None))
    return trainer
