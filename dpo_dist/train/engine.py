"""The DPO engine: tokenised pairs → batches → policy log-probs → loss and metrics, the same on every backend.

The trainer classes (trl 0.22's ``DPOTrainer`` on CPU/CUDA, optimum-habana's ``GaudiDPOTrainer`` on
HPU) keep what they are good at: the training loop, the optimizer, DeepSpeed, HPU graphs and
checkpoints. What a DPO step computes comes from here, so a Gaudi user gets the same features and
the same numbers as a CPU user:

- ``tokenize_pair`` / ``collate``: trl 0.22's row layout (prompt ids, completion ids + EOS; prompt
  left-padded, completions right-padded), also on the trl 0.9.6 path, which tokenises differently.
- ``forward_logps``: chunked log-probs (``logprobs.py``: never the full ``[2b, s, V]`` logits), rows
  padded to a bucket length (``bucketing.py``) or all rows of a micro-batch packed into one row
  (``packing.py``), padded to a bucket total.
- ``loss_and_metrics``: the loss from ``losses.py`` (every loss type on every backend) and trl 0.22's
  metric names, averaged over all ranks.

Packing has two attention modes. ``varlen`` (CPU/CUDA): transformers' attention interface runs
each row's slice on its own (flash SDPA, no score matrix). ``block_mask`` (HPU): optimum-habana's
Gaudi models call their own attention (FusedSDPA or matmuls) and ignore transformers' interface,
but take a 4D attention mask; the packed row gets a block-diagonal causal mask (plus the sliding
band for Gemma 3's local layers), so attention still stays inside each row. It computes the full
T x T scores of the packed row, which the planner counts.

Hand-written because neither trainer exposes these seams in one shape; each piece is checked
against the library it mirrors (tests/dpo_dist/train/test_engine.py: trl 0.22's tokenize_row and collator,
tests/dpo_dist/train/test_losses.py: trl 0.22's dpo_loss).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from dpo_dist.data.bucketing import bucket_of, packed_pair_length, row_lengths, shares_prompt
from dpo_dist.train.losses import LENGTH_NORMALISED, dpo_losses

PACKING_ATTENTION = ("varlen", "block_mask")


@dataclass(frozen=True)
class EngineConfig:
    """What a DPO step needs to know, from the project's own arguments (no trainer attribute names)."""

    max_length: int | None
    max_prompt_length: int | None
    max_completion_length: int | None
    pad_token_id: int
    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    truncation_mode: str = "keep_end"
    chunked: bool = True
    packing: bool = False
    # How attention is kept inside a row for models that run their own attention code: "varlen" (transformers'
    # attention interface, per-row kernels; packed rows only) or "block_mask" (prepared 4D masks, see packing.py).
    packing_attention: str = "varlen"
    # Static-shape device (HPU graphs): no step may produce a new tensor shape (logprobs.py, static mode).
    static_shapes: bool = False
    # Extra keywords for every model forward (HPU: use_flash_attention=True, so Gaudi attention takes FusedSDPA).
    forward_kwargs: dict = field(default_factory=dict)
    # Packed rows: a pair whose rows keep their whole prompt runs it once, prompt + chosen + rejected
    # (dpo_dist/model/packing.py ``pack_pairs``; which pairs: dpo_dist/data/bucketing.py ``shares_prompt``).
    share_prompt: bool = False

    def __post_init__(self):
        if self.packing_attention not in PACKING_ATTENTION:
            raise ValueError(f"packing_attention must be one of {PACKING_ATTENTION}, got {self.packing_attention!r}")

    @property
    def length_normalised(self) -> bool:
        return self.loss_type in LENGTH_NORMALISED

    @property
    def needs_nll(self) -> bool:
        return self.loss_type == "sft"


# --------------------------------------------------------------------------- data


def tokenize_pair(row: dict, tokenizer, max_prompt_length: int | None, max_completion_length: int | None) -> dict:
    """trl 0.22's ``DPOTrainer.tokenize_row`` for decoder-only models: no special tokens added to the
    prompt (the data step puts BOS in the text), EOS appended to each completion, the prompt cut
    from the left, completions from the right."""
    enc = {k: tokenizer(row[k], add_special_tokens=False)["input_ids"] for k in ("prompt", "chosen", "rejected")}
    eos = tokenizer.eos_token_id
    prompt = enc["prompt"][-max_prompt_length:] if max_prompt_length is not None else enc["prompt"]
    out = {"prompt_input_ids": prompt}
    for k in ("chosen", "rejected"):
        ids = enc[k] + [eos]
        out[f"{k}_input_ids"] = ids[:max_completion_length] if max_completion_length is not None else ids
    return out


def _pad(seqs, value: int, left: bool = False):
    """Rows of token ids as one [n, longest] tensor, padded with ``value`` on the right (or the left)."""
    import torch

    width = max((len(x) for x in seqs), default=0)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, x in enumerate(seqs):
        start = width - len(x) if left else 0
        out[i, start:start + len(x)] = torch.as_tensor(x, dtype=torch.long)
    return out


def collate(examples: list[dict], pad_token_id: int) -> dict:
    """trl 0.22's ``DataCollatorForPreference``: prompts left-padded, completions right-padded, masks, and the
    cached reference log-probs when the rows carry them."""
    import torch

    out = {}
    for key, left in (("prompt", True), ("chosen", False), ("rejected", False)):
        ids = [e[f"{key}_input_ids"] for e in examples]
        out[f"{key}_input_ids"] = _pad(ids, pad_token_id, left)
        out[f"{key}_attention_mask"] = _pad([[1] * len(x) for x in ids], 0, left)
    if "ref_chosen_logps" in examples[0] and "ref_rejected_logps" in examples[0]:
        out["ref_chosen_logps"] = torch.tensor([e["ref_chosen_logps"] for e in examples])
        out["ref_rejected_logps"] = torch.tensor([e["ref_rejected_logps"] for e in examples])
    return out


@dataclass
class EngineCollator:
    """The trainers' data collator: ``collate``, then the batch's shape.

    With ``buckets`` the batch carries the bucket its rows (``chosen_pad_to`` / ``rejected_pad_to``) or, packed,
    its packed total (``packed_pad_to``) is padded to. With ``cfg.packing`` the batch is also packed here, on
    the host (``packed_*`` tensors): the model then sees one fixed-shape row, which a static-shape device needs
    and any device prefers to index-heavy packing on the device.
    """

    cfg: EngineConfig
    buckets: Sequence[int] | None = None

    def __call__(self, examples):
        import torch


        out = collate(examples, self.cfg.pad_token_id)
        if self.buckets:
            p = [len(e["prompt_input_ids"]) for e in examples]
            c = [row_lengths(a, len(e["chosen_input_ids"]), self.cfg.max_length) for a, e in zip(p, examples)]
            r = [row_lengths(a, len(e["rejected_input_ids"]), self.cfg.max_length) for a, e in zip(p, examples)]
            if self.cfg.packing:
                total = sum(packed_pair_length(len(e["prompt_input_ids"]), len(e["chosen_input_ids"]),
                                               len(e["rejected_input_ids"]), self.cfg.max_length, self.cfg.share_prompt)
                            for e in examples)
                out["packed_pad_to"] = torch.tensor(max(total, bucket_of(total, self.buckets)))
            else:
                out["chosen_pad_to"] = torch.tensor(bucket_of(max(c), self.buckets))
                out["rejected_pad_to"] = torch.tensor(bucket_of(max(r), self.buckets))
        if self.cfg.packing:
            out.update({f"packed_{k}": v for k, v in pack_batch(out, self.cfg).items()})
        return out


# --------------------------------------------------------------------------- forward


def build_rows(prompt_ids, prompt_mask, completion_ids, completion_mask, *, max_length: int | None,
               truncation_mode: str = "keep_end", pad_to: int | None = None, pad_value: int = 0):
    """trl 0.22's row layout (``concatenated_forward``, decoder-only): prompt (left-padded) + completion
    (right-padded), truncated to max_length, flushed left; then right-padded to ``pad_to`` (a bucket length)
    when given. Right padding with attention 0 changes no log-prob of a causal LM. Returns (input_ids,
    attention_mask, loss_mask)."""
    import torch
    import torch.nn.functional as F

    input_ids = torch.cat((prompt_ids, completion_ids), dim=1)
    attention_mask = torch.cat((prompt_mask, completion_mask), dim=1)
    loss_mask = torch.cat((torch.zeros_like(prompt_mask), completion_mask), dim=1)
    if max_length is not None and max_length < attention_mask.size(1):
        if truncation_mode == "keep_start":
            attention_mask, input_ids, loss_mask = _flush_left(attention_mask, input_ids, loss_mask)
            attention_mask, input_ids, loss_mask = (t[:, :max_length] for t in (attention_mask, input_ids, loss_mask))
        elif truncation_mode == "keep_end":
            attention_mask, input_ids, loss_mask = _flush_right(attention_mask, input_ids, loss_mask)
            attention_mask, input_ids, loss_mask = (t[:, -max_length:] for t in (attention_mask, input_ids, loss_mask))
            attention_mask, input_ids, loss_mask = _flush_left(attention_mask, input_ids, loss_mask)
        else:
            raise ValueError(f"unknown truncation mode {truncation_mode!r}")
    else:
        attention_mask, input_ids, loss_mask = _flush_left(attention_mask, input_ids, loss_mask)
    if pad_to is not None and pad_to > input_ids.shape[1]:
        extra = pad_to - input_ids.shape[1]
        input_ids = F.pad(input_ids, (0, extra), value=pad_value)
        attention_mask = F.pad(attention_mask, (0, extra), value=0)
        loss_mask = F.pad(loss_mask, (0, extra), value=0)
    return input_ids, attention_mask, loss_mask


def _flush_left(mask, *tensors):
    """trl 0.22's ``flush_left`` (not in trl 0.9.6): roll each row so its first 1 in ``mask`` is at column 0,
    then cut the columns from the first all-zero one on (the same moves applied to ``tensors``)."""
    import torch

    m = mask.shape[1]
    idx = (torch.arange(m, device=mask.device)[None, :] + mask.argmax(dim=1)[:, None]) % m
    rolled = [t.gather(1, idx) for t in (mask, *tensors)]
    empty = rolled[0].sum(dim=0) == 0
    cut = int(empty.to(torch.int8).argmax()) if empty.any() else m
    return tuple(t[:, :cut] for t in rolled)


def _flush_right(mask, *tensors):
    """trl 0.22's ``flush_right``: the mirror image of ``_flush_left``."""
    flipped = _flush_left(mask.flip(1), *(t.flip(1) for t in tensors))
    return tuple(t.flip(1) for t in flipped)


def _key_rows(batch: dict, key: str, cfg: EngineConfig, pad_to: int | None = None):
    """The chosen (or rejected) rows: prompt + that completion."""
    return build_rows(batch["prompt_input_ids"], batch["prompt_attention_mask"], batch[f"{key}_input_ids"],
                      batch[f"{key}_attention_mask"], max_length=cfg.max_length, truncation_mode=cfg.truncation_mode,
                      pad_to=pad_to, pad_value=cfg.pad_token_id)


def pack_batch(batch: dict, cfg: EngineConfig) -> dict:
    """The 2b rows of a collated batch packed into one row (``packing.pack_pairs``), padded to ``packed_pad_to``
    when the batch has it. Tensors only (the row bounds as a tensor), so it travels with the batch."""
    import torch

    from dpo_dist.model.packing import pack_pairs  # deferred: torch (ranks only)

    pad_to = int(batch["packed_pad_to"]) if "packed_pad_to" in batch else None
    share = None
    if cfg.share_prompt:
        lens = [batch[f"{k}_attention_mask"].sum(-1).tolist() for k in ("prompt", "chosen", "rejected")]
        share = [shares_prompt(p, c, r, cfg.max_length) for p, c, r in zip(*lens)]
    packed = pack_pairs(_key_rows(batch, "chosen", cfg), _key_rows(batch, "rejected", cfg), share, pad_to=pad_to,
                        pad_value=cfg.pad_token_id)
    if "blocks" in packed:
        packed["blocks"] = torch.tensor(packed["blocks"], dtype=torch.long).reshape(-1, 4)
    packed["cu_seqlens"] = torch.tensor(packed["cu_seqlens"], dtype=torch.long)
    del packed["n_seqs"]  # 2b: the batch knows it
    return packed


def _packed_from_batch(batch: dict, cfg: EngineConfig) -> dict:
    """The packed row of ``batch``: packed by the collator, or packed now."""
    packed = ({k[len("packed_"):]: v for k, v in batch.items() if k.startswith("packed_") and k != "packed_pad_to"}
              if "packed_input_ids" in batch else pack_batch(batch, cfg))
    packed["cu_seqlens"] = [int(x) for x in packed["cu_seqlens"].tolist()]
    if "blocks" in packed:
        packed["blocks"] = [tuple(int(x) for x in blk) for blk in packed["blocks"].tolist()]
    packed["n_seqs"] = 2 * batch["prompt_input_ids"].shape[0]
    return packed


def packed_logps(model, packed: dict, *, attention: str = "varlen", chunk_tokens: int | None = None,
                 **forward_kwargs):
    """``sequence_logps`` over one packed row (``packing.pack_pairs``): one value per packed sequence."""
    from dpo_dist.model.logprobs import sequence_logps  # deferred: torch (ranks only)
    from dpo_dist.model.packing import packed_model_inputs  # deferred: torch (ranks only)

    mask, extra = packed_model_inputs(model, packed, attention)
    return sequence_logps(model, packed["input_ids"], mask, packed["loss_mask"], chunk_tokens=chunk_tokens,
                          seq_ids=packed["seq_ids"], n_seqs=packed["n_seqs"], prev_index=packed.get("prev_index"),
                          **extra, **forward_kwargs)


def _rows_logps(model, input_ids, attention_mask, loss_mask, cfg: EngineConfig, chunk, kw):
    """``sequence_logps`` over right-padded rows, with the attention mask the backend's models need."""
    from dpo_dist.model.logprobs import sequence_logps  # deferred: torch (ranks only)
    from dpo_dist.model.packing import rows_attention_mask  # deferred: torch (ranks only)

    mask = rows_attention_mask(model, attention_mask, cfg.packing_attention)
    return sequence_logps(model, input_ids, mask, loss_mask, chunk_tokens=chunk, static=cfg.static_shapes, **kw)


def forward_logps(model, batch: dict, cfg: EngineConfig) -> dict:
    """The policy's (or reference's) sequence log-probs of one batch of pairs.

    Returns ``chosen_logps`` / ``rejected_logps`` [b] (sums over completion tokens; means with a
    length-normalised loss), ``mean_chosen_logits`` / ``mean_rejected_logits`` (trl's logged metrics) and,
    when the loss needs it, ``nll_loss`` (mean NLL of the chosen completion tokens).
    """
    import torch

    from dpo_dist.model.logprobs import causal_lm_parts  # deferred: torch (ranks only)

    n = batch["prompt_input_ids"].shape[0]
    chunk = None if cfg.chunked else 1 << 62  # unchunked: one chunk holds every completion position
    kw = dict(cfg.forward_kwargs)
    if cfg.packing:  # all 2n rows in one packed row, padded once to its bucket total
        logps, sums, ntok = packed_logps(model, _packed_from_batch(batch, cfg), attention=cfg.packing_attention,
                                         chunk_tokens=chunk, static=cfg.static_shapes, **kw)
    elif "chosen_pad_to" in batch:  # bucketed: chosen and rejected rows each padded to their own bucket
        parts = [_rows_logps(model, *_key_rows(batch, key, cfg, int(batch[f"{key}_pad_to"])), cfg, chunk, kw)
                 for key in ("chosen", "rejected")]
        logps, sums, ntok = (torch.cat(x) for x in zip(*parts))
    else:  # one forward over 2n rows, padded to the longest (trl 0.22's concatenated layout)
        rows = [_key_rows(batch, key, cfg) for key in ("chosen", "rejected")]
        width = max(r[0].shape[1] for r in rows)
        rows = [_key_rows(batch, key, cfg, width) for key in ("chosen", "rejected")]
        logps, sums, ntok = _rows_logps(model, *(torch.cat(x) for x in zip(*rows)), cfg, chunk, kw)
    out = {}
    if cfg.needs_nll:
        out["nll_loss"] = -logps[:n].sum() / ntok[:n].sum().clamp(min=1)
    if cfg.length_normalised:
        logps = logps / ntok.clamp(min=1)
    vocab = causal_lm_parts(model)[1].out_features
    denom = lambda t: (t.sum() * vocab).clamp(min=1)  # noqa: E731
    out.update(chosen_logps=logps[:n], rejected_logps=logps[n:],
               mean_chosen_logits=sums[:n].sum() / denom(ntok[:n]), mean_rejected_logits=sums[n:].sum() / denom(ntok[n:]))
    return out


# --------------------------------------------------------------------------- loss


def loss_and_metrics(policy: dict, ref_chosen, ref_rejected, cfg: EngineConfig, *, gather, train_eval: str = "train",
                     running=None):
    """(mean loss, metrics) with trl 0.22's metric names. ``gather`` collects a tensor from every rank
    (``accelerator.gather_for_metrics``), so the metrics are means over all ranks on every backend. Each metric
    is a 0-d CPU tensor: trl 0.22 and trl 0.9.6 both average them in ``log``, and trl 0.9.6's
    ``prediction_step`` needs tensors."""
    losses, chosen_rewards, rejected_rewards = dpo_losses(
        policy["chosen_logps"], policy["rejected_logps"], ref_chosen, ref_rejected, cfg.loss_type, beta=cfg.beta,
        label_smoothing=cfg.label_smoothing, nll_loss=policy.get("nll_loss"), running=running)
    p = "eval_" if train_eval == "eval" else ""
    mean = lambda t: gather(t.detach().reshape(-1)).float().mean().cpu()  # noqa: E731
    metrics = {
        f"{p}rewards/chosen": mean(chosen_rewards),
        f"{p}rewards/rejected": mean(rejected_rewards),
        f"{p}rewards/accuracies": mean((chosen_rewards > rejected_rewards).float()),
        f"{p}rewards/margins": mean(chosen_rewards - rejected_rewards),
        f"{p}logps/chosen": mean(policy["chosen_logps"]),
        f"{p}logps/rejected": mean(policy["rejected_logps"]),
        f"{p}logits/chosen": mean(policy["mean_chosen_logits"]),
        f"{p}logits/rejected": mean(policy["mean_rejected_logits"]),
    }
    if "nll_loss" in policy:
        metrics[f"{p}nll_loss"] = mean(policy["nll_loss"])
    return losses.mean(), metrics
