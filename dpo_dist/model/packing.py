"""Packing: the 2b rows of a DPO micro-batch (b chosen, b rejected) in ONE row, no padding between them.

Why: padding each row to one of K bucket lengths still pads ~12% on long-tailed hh-rlhf-like data
(the best any 8 row lengths can do there; tests/dpo_dist/data/test_bucketing.py). Packed back to back, a
micro-batch pads only once, from its total to one of K bucket totals: a few % (bench/README.md).

Hand-written, because no library has it for this case: TRL's ``padding_free`` flattens a batch
the same way but needs flash-attention 2 (CUDA only) and pads nothing, so every batch is a new
shape (a recompile on static-shape devices). Here:

- ``pack_rows``: each row's real tokens back to back, position ids restarting at 0 per row (RoPE
  sees the same positions as unpacked), right-padded to a bucket total (static shapes). The first
  token of every row counts no loss, so no position predicts across a row boundary.
- ``varlen`` attention: a function registered with transformers' ``AttentionInterface`` runs
  transformers' own SDPA attention on each row's slice with ``is_causal`` (torch's flash kernel
  on CPU and CUDA: no T x T score matrix is kept, and no attention is computed across rows or on
  the padding tail). Models load with it under the name ``dpo_dist_varlen_<sdpa|eager>``; calls
  without ``dpodist_cu_seqlens`` (generation, evaluation, the unpacked forwards) go to the
  model's usual sdpa/eager attention with the usual masks, registered under the same name.
  Gemma 3's sliding-window layers get a banded mask on rows longer than the window.
- ``block_mask`` attention (``block_attention_mask``): for models that run their own attention and
  ignore transformers' interface (optimum-habana's Gaudi models), the packed row gets a 4D mask in
  which each position sees only the earlier positions of its own row (and, for sliding-window
  layers, only the last ``window`` of them). Padding positions see only themselves, so no softmax
  row is empty. The scores are computed for the whole T x T square: attention costs more than
  ``varlen``, the padding saved does not change.

The packed log-probs equal the unpacked ones (forward and gradients: tests/dpo_dist/model/test_packing.py).
"""

from __future__ import annotations

import sys

import torch

from dpo_dist.model.logprobs import causal_lm_parts

VARLEN_PREFIX = "dpo_dist_varlen_"
BASES = ("sdpa", "eager")
CU_KEY = "dpodist_cu_seqlens"  # forward kwarg: row boundaries [0, n_0, n_0 + n_1, ..., real total]


def varlen_name(base: str) -> str:
    if base not in BASES:
        raise ValueError(f"packing runs on top of sdpa or eager attention, not {base!r}")
    return VARLEN_PREFIX + base


def base_of(attn_implementation: str | None) -> str | None:
    """'sdpa' / 'eager' for a varlen name, None for any other implementation."""
    if attn_implementation and attn_implementation.startswith(VARLEN_PREFIX):
        return attn_implementation[len(VARLEN_PREFIX):]
    return None


def _base_attention(base: str, module):
    if base == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward
    # Each modeling file has its own eager attention (Gemma 3's adds soft-capping): use the module's.
    return sys.modules[type(module).__module__].eager_attention_forward


def _sliding_mask(n: int, window: int, device) -> torch.Tensor:
    """Causal and within ``window`` (as transformers' sliding_window_overlay: kv > q - window)."""
    q = torch.arange(n, device=device)[:, None]
    k = torch.arange(n, device=device)[None, :]
    return ((k <= q) & (k > q - window))[None, None]


def _make_varlen(base: str):
    def varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        cu = kwargs.pop(CU_KEY, None)
        if cu is None:
            return _base_attention(base, module)(module, query, key, value, attention_mask, dropout=dropout,
                                                 scaling=scaling, **kwargs)
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if query.shape[0] != 1:
            raise ValueError(f"packed attention expects one packed row, got a batch of {query.shape[0]}")
        softcap = getattr(getattr(module, "config", None), "attn_logit_softcapping", None)
        if softcap:
            raise ValueError("packing cannot reproduce attention logit soft-capping; run without --packing")
        window = kwargs.get("sliding_window")
        outs = []
        for s, e in zip(cu[:-1], cu[1:]):
            n = e - s
            mask = _sliding_mask(n, window, query.device) if window and n > window else None
            o, _ = sdpa_attention_forward(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], mask,
                                          dropout=dropout, scaling=scaling, is_causal=mask is None)
            outs.append(o)  # [1, n, heads, head_dim]
        tail = query.shape[2] - cu[-1]
        if tail:  # the padding tail: no loss, no attention, zeros
            outs.append(query.new_zeros(1, tail, query.shape[1], query.shape[3]))
        return torch.cat(outs, dim=1), None

    return varlen_attention


def register_varlen_attention() -> None:
    """Register ``dpo_dist_varlen_sdpa`` / ``_eager`` with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    for base in BASES:
        name = varlen_name(base)
        if name not in AttentionInterface._global_mapping:
            AttentionInterface.register(name, _make_varlen(base))
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[base])


def _segments(packed: dict, device):
    """[1, T] row id of every position of a packed row; each padding position gets an id of its own."""
    cu = packed["cu_seqlens"]
    total = packed["input_ids"].shape[1]
    lens = torch.tensor([e - s for s, e in zip(cu[:-1], cu[1:])], device=device)
    seg = torch.repeat_interleave(torch.arange(len(lens), device=device), lens)
    tail = total - cu[-1]
    return torch.cat([seg, len(lens) + torch.arange(tail, device=device)])[None]


def _row_segments(attention_mask):
    """[B, T] segment ids of right-padded rows: 0 for a row's tokens, an id of its own for each padding position."""
    t = attention_mask.shape[1]
    own = 1 + torch.arange(t, device=attention_mask.device)[None].expand_as(attention_mask)
    return torch.where(attention_mask.bool(), torch.zeros_like(own), own)


def block_attention_mask(seg, *, dtype, sliding_window: int | None = None, additive: bool = False):
    """[B, 1, T, T] mask from segment ids ``seg`` [B, T]: position q sees k when both have the same id and k <= q
    (and, with ``sliding_window``, q - k < window, as transformers' sliding layers). ``additive``: 0 where allowed
    and the dtype's minimum elsewhere (what attention adds to its scores); else 1 / 0 (what a model's own mask
    preparation inverts)."""
    pos = torch.arange(seg.shape[1], device=seg.device)
    q, k = pos[:, None], pos[None, :]
    allowed = (seg[:, :, None] == seg[:, None, :]) & (k <= q)
    if sliding_window:
        allowed &= (q - k) < sliding_window
    allowed = allowed[:, None]
    if additive:
        return torch.zeros(allowed.shape, dtype=dtype, device=seg.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed.to(dtype)


def _sliding_window_of(model) -> int | None:
    """The sliding window of a model with sliding-window layers (Gemma 3), else None."""
    cfg = causal_lm_parts(model)[0].config
    return cfg.sliding_window if "sliding_attention" in (getattr(cfg, "layer_types", None) or ()) else None


def _prepared_masks(model, seg):
    """The mask a model with its own attention code takes for segment ids ``seg``: one prepared (additive) mask per
    attention type for sliding-window models (``{"full_attention": ..., "sliding_attention": ...}``, the form
    transformers' and optimum-habana's Gemma 3 accept), else a 1 / 0 mask."""
    dtype = causal_lm_parts(model)[0].get_input_embeddings().weight.dtype
    window = _sliding_window_of(model)
    if window:
        return {"full_attention": block_attention_mask(seg, dtype=dtype, additive=True),
                "sliding_attention": block_attention_mask(seg, dtype=dtype, additive=True, sliding_window=window)}
    return block_attention_mask(seg, dtype=dtype)


def packed_model_inputs(model, packed: dict, attention: str = "varlen") -> tuple:
    """(attention_mask, extra forward keywords) for one packed row.

    ``varlen``: a plain mask plus the row bounds, which dpo-dist's registered attention reads. ``block_mask``:
    the 4D block-diagonal mask instead, for models with their own attention code."""
    kw = {"position_ids": packed["position_ids"]}
    if attention == "varlen":
        return packed["attention_mask"], {**kw, CU_KEY: packed["cu_seqlens"]}
    if attention != "block_mask":
        raise ValueError(f"packed attention must be varlen or block_mask, not {attention!r}")
    return _prepared_masks(model, _segments(packed, packed["input_ids"].device)), kw


def rows_attention_mask(model, attention_mask, attention: str = "varlen"):
    """The mask to give ``model`` for right-padded rows. With ``block_mask`` (a model with its own attention code)
    and sliding-window layers: the prepared masks with transformers' window (q - k < window). optimum-habana 1.21.2
    builds Gemma 3's sliding mask with the older rule (q - k <= window: one key more), so its own mask would give
    other log-probs than transformers' model (and than the packed rows) on rows longer than the window."""
    if attention == "block_mask" and _sliding_window_of(model):
        return _prepared_masks(model, _row_segments(attention_mask))
    return attention_mask


def packable(model) -> bool:
    """Whether ``model`` (any wrapper) was loaded with the varlen attention."""
    backbone = causal_lm_parts(model)[0]
    return base_of(getattr(backbone.config, "_attn_implementation", None)) is not None


def pack_rows(rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], *, pad_to: int | None = None,
              pad_value: int = 0) -> dict:
    """Rows laid out as ``build_rows`` gives them (real tokens first, then right padding), in
    order, packed into one row of ``max(total, pad_to)`` tokens.

    Returns input_ids / attention_mask / loss_mask / position_ids / seq_ids, each [1, T], and
    ``cu_seqlens`` (a list: the row boundaries) and ``n_seqs``.
    """
    flat_ids, flat_loss, pos, seq, lens, first = [], [], [], [], [], 0
    for ids, att, loss in rows:  # groups of rows may differ in width (chosen vs rejected)
        att = att.bool()
        p = (att.long().cumsum(-1) - 1)[att]
        flat_ids.append(ids[att])
        flat_loss.append(loss[att] * (p > 0))  # a row's first token predicts nothing across rows
        pos.append(p)
        seq.append((first + torch.arange(ids.shape[0], device=ids.device))[:, None].expand_as(ids)[att])
        lens.append(att.sum(-1))
        first += ids.shape[0]
    flat_ids, flat_loss, pos, seq, lens = (torch.cat(x) for x in (flat_ids, flat_loss, pos, seq, lens))
    total = int(flat_ids.shape[0])
    extra = max(0, (pad_to or 0) - total)
    if extra:
        pad = lambda t, v: torch.cat([t, t.new_full((extra,), v)])  # noqa: E731
        flat_ids, flat_loss, seq = pad(flat_ids, pad_value), pad(flat_loss, 0), pad(seq, 0)
        pos = torch.cat([pos, torch.arange(extra, device=pos.device)])
    cu = [0] + torch.cumsum(lens, 0).tolist()
    one = lambda t: t.unsqueeze(0)  # noqa: E731
    return {"input_ids": one(flat_ids), "attention_mask": torch.ones_like(one(flat_ids)), "loss_mask": one(flat_loss),
            "position_ids": one(pos), "seq_ids": one(seq), "cu_seqlens": [int(x) for x in cu],
            "n_seqs": first}
