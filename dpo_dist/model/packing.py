"""Packing: the 2b rows of a DPO micro-batch (b chosen, b rejected) in ONE row, no padding between them.

Why: padding each row to one of K bucket lengths still pads ~12% on long-tailed hh-rlhf-like data
(the best any 8 row lengths can do there; tests/dpo_dist/data/test_bucketing.py). Packed back to back, a
micro-batch pads only once, from its total to one of K bucket totals: a few % (bench/README.md).

Hand-written, because no library has it for this case: TRL's ``padding_free`` flattens a batch
the same way but needs flash-attention 2 (CUDA only) and pads nothing, so every batch is a new
shape (a recompile on static-shape devices). Here:

- ``pack_pairs``: each row's real tokens back to back, pair by pair, position ids restarting at 0 per
  row (RoPE sees the same positions as unpacked), right-padded to a bucket total (static shapes). The
  first token of every row counts no loss, so no position predicts across a row boundary.
- ``varlen`` attention: a function registered with transformers' ``AttentionInterface`` runs
  transformers' own SDPA attention on each row's slice with ``is_causal`` (torch's flash kernel
  on CPU and CUDA: no T x T score matrix is kept, and no attention is computed across rows or on
  the padding tail). Models load with it under the name ``dpo_dist_varlen_<sdpa|eager>``; calls
  without ``dpodist_blocks`` (generation, evaluation, the unpacked forwards) go to the
  model's usual sdpa/eager attention with the usual masks, registered under the same name.
  Gemma 3's sliding-window layers get a banded mask on rows longer than the window.
- ``block_mask`` attention (``block_attention_mask``): for models that run their own attention and
  ignore transformers' interface (optimum-habana's Gaudi models), the packed row gets a 4D mask in
  which each position sees only the earlier positions of its own row (and, for sliding-window
  layers, only the last ``window`` of them). Padding positions see only themselves, so no softmax
  row is empty. The scores are computed for the whole T x T square: attention costs more than
  ``varlen``, the padding saved does not change.

Shared prompt (``pack_pairs`` with ``share``): a pair whose two rows start with the same whole prompt P runs it once,
``[P, C, R]``: C's positions continue P's, R's positions restart after P (RoPE sees the positions of the
unpacked rows). C attends to P and itself (causal, as the chosen row); R attends to P and itself, never to C
(``varlen``: a second attention call whose keys are P's then R's, lower-right causal; ``block_mask``: ``part``
ids, P = 0, C = 1, R = 2, a key is seen when it is P or of the query's own part). R's first token is predicted
by P's last position (``prev_index``), as in the rejected row. DPO pairs share long prompts (hh-rlhf-like
data: the prompt is ~40% of a pair's two rows), so the forward and backward do that much less work for
the same log-probs. Nothing in TRL, transformers or torch lays pairs out this way; hand-written.

The packed log-probs equal the unpacked ones, shared prompt or not (forward and gradients:
tests/dpo_dist/model/test_packing.py).
"""

from __future__ import annotations

import sys

import torch

from dpo_dist.model.logprobs import causal_lm_parts

VARLEN_PREFIX = "dpo_dist_varlen_"
BASES = ("sdpa", "eager")
# Forward kwarg: the attention blocks of a packed row, (q_start, q_end, prefix_start, prefix_end) each: queries
# [q_start, q_end) attend to the keys [prefix_start, prefix_end) (a shared prompt; empty for a plain row) and,
# causally, to themselves.
BLOCKS_KEY = "dpodist_blocks"
PART_PROMPT, PART_FIRST, PART_SECOND = 0, 1, 2  # a shared prompt, a row (or a pair's chosen), a pair's rejected


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


def _sliding_mask(n: int, window: int | None, device, prefix: int = 0) -> torch.Tensor:
    """[1, 1, n, prefix + n]: ``n`` queries at positions prefix..prefix+n-1 over keys at positions 0..prefix+n-1,
    causal and, with ``window``, within it (as transformers' sliding_window_overlay: kv > q - window)."""
    q = prefix + torch.arange(n, device=device)[:, None]
    k = torch.arange(prefix + n, device=device)[None, :]
    allowed = k <= q
    if window:
        allowed &= k > q - window
    return allowed[None, None]


def _make_varlen(base: str):
    def varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        blocks = kwargs.pop(BLOCKS_KEY, None)
        if blocks is None:
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
        for qs, qe, ps, pe in blocks:
            n, p = qe - qs, pe - ps
            if p:  # a pair's rejected part: keys are the shared prompt's, then its own (lower-right causal)
                k = torch.cat([key[:, :, ps:pe], key[:, :, qs:qe]], dim=2)
                v = torch.cat([value[:, :, ps:pe], value[:, :, qs:qe]], dim=2)
                mask = _sliding_mask(n, window, query.device, prefix=p)
            else:
                k, v = key[:, :, qs:qe], value[:, :, qs:qe]
                mask = _sliding_mask(n, window, query.device) if window and n > window else None
            o, _ = sdpa_attention_forward(module, query[:, :, qs:qe], k, v, mask,
                                          dropout=dropout, scaling=scaling, is_causal=mask is None)
            outs.append(o)  # [1, n, heads, head_dim]
        tail = query.shape[2] - (blocks[-1][1] if blocks else 0)
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


def block_attention_mask(seg, *, dtype, sliding_window: int | None = None, additive: bool = False,
                         part=None, position_ids=None):
    """[B, 1, T, T] mask from segment ids ``seg`` [B, T]: position q sees k when both have the same id and k <= q
    (and, with ``sliding_window``, q - k < window, as transformers' sliding layers). With ``part`` [B, T] (a shared
    prompt: ``pack_pairs``) q also needs k to be the prompt's or of q's own part, and the window is measured in
    ``position_ids``. ``additive``: 0 where allowed and the dtype's minimum elsewhere (what attention adds to its
    scores); else 1 / 0 (what a model's own mask preparation inverts)."""
    idx = torch.arange(seg.shape[1], device=seg.device)
    q, k = idx[:, None], idx[None, :]
    allowed = (seg[:, :, None] == seg[:, None, :]) & (k <= q)
    if part is not None:
        allowed &= (part[:, None, :] == PART_PROMPT) | (part[:, None, :] == part[:, :, None])
    if sliding_window:
        pos = position_ids if position_ids is not None else idx[None]
        allowed &= (pos[:, :, None] - pos[:, None, :]) < sliding_window
    allowed = allowed[:, None]
    if additive:
        return torch.zeros(allowed.shape, dtype=dtype, device=seg.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed.to(dtype)


def _sliding_window_of(model) -> int | None:
    """The sliding window of a model with sliding-window layers (Gemma 3), else None."""
    cfg = causal_lm_parts(model)[0].config
    return cfg.sliding_window if "sliding_attention" in (getattr(cfg, "layer_types", None) or ()) else None


def _prepared_masks(model, seg, **shared):
    """The mask a model with its own attention code takes for segment ids ``seg`` (and, for shared prompts, the
    ``part`` / ``position_ids`` of ``block_attention_mask``): one prepared (additive) mask per attention type for
    sliding-window models (``{"full_attention": ..., "sliding_attention": ...}``, the form transformers' and
    optimum-habana's Gemma 3 accept), else a 1 / 0 mask."""
    dtype = causal_lm_parts(model)[0].get_input_embeddings().weight.dtype
    window = _sliding_window_of(model)
    if window:
        return {"full_attention": block_attention_mask(seg, dtype=dtype, additive=True, **shared),
                "sliding_attention": block_attention_mask(seg, dtype=dtype, additive=True, sliding_window=window,
                                                          **shared)}
    return block_attention_mask(seg, dtype=dtype, **shared)


def packed_model_inputs(model, packed: dict, attention: str = "varlen") -> tuple:
    """(attention_mask, extra forward keywords) for one packed row.

    ``varlen``: a plain mask plus the row bounds, which dpo-dist's registered attention reads. ``block_mask``:
    the 4D block-diagonal mask instead, for models with their own attention code."""
    kw = {"position_ids": packed["position_ids"]}
    if attention == "varlen":
        return packed["attention_mask"], {**kw, BLOCKS_KEY: packed_blocks(packed)}
    if attention != "block_mask":
        raise ValueError(f"packed attention must be varlen or block_mask, not {attention!r}")
    shared = {"part": packed["part"], "position_ids": packed["position_ids"]} if "part" in packed else {}
    return _prepared_masks(model, _segments(packed, packed["input_ids"].device), **shared), kw


def packed_blocks(packed: dict) -> list[tuple[int, int, int, int]]:
    """The ``BLOCKS_KEY`` attention blocks of a packed row: its own (``pack_pairs``), else one per row of
    ``cu_seqlens``."""
    if "blocks" in packed:
        return packed["blocks"]
    cu = packed["cu_seqlens"]
    return [(s, e, s, s) for s, e in zip(cu[:-1], cu[1:])]


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


def pack_pairs(chosen: tuple, rejected: tuple, share: list[bool] | None = None, *, pad_to: int | None = None,
               pad_value: int = 0) -> dict:
    """A micro-batch's b pairs in one row of ``max(total, pad_to)`` tokens, pair by pair: ``[P, C, R]`` for a
    pair that shares its prompt (``share[i]``; P = the tokens before the row's first loss position, the same in
    both rows), else its two rows' real tokens back to back, position ids restarting at 0 per row.
    ``chosen`` / ``rejected``: (input_ids, attention_mask, loss_mask) [b, w] as ``build_rows`` gives them (real
    tokens first, then right padding). Sequence ids: chosen i → i, rejected i → b + i.

    Returns input_ids / attention_mask / loss_mask / position_ids / seq_ids, each [1, T], ``cu_seqlens`` (a
    list: the sequence boundaries) and ``n_seqs``. When a pair shares its prompt, also ``part`` [1, T]
    (PART_*), ``prev_index`` [1, T] (the position whose output predicts each token: t - 1, except a shared
    pair's first rejected token, predicted by P's last position) and ``blocks`` (``BLOCKS_KEY``); plain rows
    need none of them (``cu_seqlens`` gives their blocks, and t - 1 predicts t)."""
    b = chosen[0].shape[0]
    share = share or [False] * b
    ids, loss, pos, seq, part, prev, cu, blocks, at = [], [], [], [], [], [], [0], [], 0

    def real(rows, i):
        m = rows[1][i].bool()
        return rows[0][i][m], rows[2][i][m]

    def put(t_ids, t_loss, t_pos, t_seq, t_part):
        nonlocal at
        n = t_ids.shape[0]
        ids.append(t_ids), loss.append(t_loss), pos.append(t_pos), seq.append(t_seq), part.append(t_part)
        prev.append((at - 1 + torch.arange(n, device=t_ids.device)).clamp(min=0))
        at += n

    dev = chosen[0].device
    ar = lambda n, start=0: start + torch.arange(n, device=dev)  # noqa: E731
    full = lambda n, v: torch.full((n,), v, dtype=torch.long, device=dev)  # noqa: E731
    for i in range(b):
        (c_ids, c_loss), (r_ids, r_loss) = real(chosen, i), real(rejected, i)
        if share[i]:
            p = int((c_loss == 0).long().cumprod(0).sum())  # leading non-loss tokens: the prompt
            if p < 1 or not torch.equal(c_ids[:p], r_ids[:p]) or bool(r_loss[:p].any()) or not bool(r_loss[p:].all()):
                raise ValueError(f"pair {i}: its rows do not start with the same whole prompt; it cannot share it")
            s, nc, nr = at, c_ids.shape[0], r_ids.shape[0] - p
            put(c_ids, c_loss * (ar(nc) > 0), ar(nc), full(nc, i), torch.where(ar(nc) < p, PART_PROMPT, PART_FIRST))
            put(r_ids[p:], r_loss[p:], ar(nr, p), full(nr, b + i), full(nr, PART_SECOND))
            prev[-1][0] = s + p - 1
            blocks += [(s, s + nc, s, s), (s + nc, at, s, s + p)]
            cu.append(at)
        else:
            for k, (t_ids, t_loss) in ((i, (c_ids, c_loss)), (b + i, (r_ids, r_loss))):
                n, s = t_ids.shape[0], at
                put(t_ids, t_loss * (ar(n) > 0), ar(n), full(n, k), full(n, PART_FIRST))
                blocks.append((s, at, s, s))
                cu.append(at)
    flat = [torch.cat(x) for x in (ids, loss, pos, seq, part, prev)]
    extra = max(0, (pad_to or 0) - at)
    if extra:
        tail = torch.arange(extra, device=dev)
        fills = (torch.full((extra,), pad_value, dtype=flat[0].dtype, device=dev), torch.zeros_like(tail), tail,
                 torch.zeros_like(tail), torch.full_like(tail, PART_FIRST), at - 1 + tail)
        flat = [torch.cat([x, f.to(x.dtype)]) for x, f in zip(flat, fills)]
    one = lambda t: t.unsqueeze(0)  # noqa: E731
    f_ids, f_loss, f_pos, f_seq, f_part, f_prev = flat
    packed = {"input_ids": one(f_ids), "attention_mask": torch.ones_like(one(f_ids)), "loss_mask": one(f_loss),
              "position_ids": one(f_pos), "seq_ids": one(f_seq), "cu_seqlens": cu, "n_seqs": 2 * b}
    if any(share):
        packed.update(part=one(f_part), prev_index=one(f_prev), blocks=blocks)
    return packed
