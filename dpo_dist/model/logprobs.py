"""Chunked per-sequence log-probabilities: the full ``[2b, s, V]`` logits are never materialised.

TRL computes ``logits = lm_head(hidden)`` for every position of every row, casts to fp32 and
takes ``log_softmax`` over the vocabulary: ``2·b·s·V`` fp32 elements kept for backward (Gemma
3: V = 262k, so 2 GiB per 1k tokens of micro-batch). Here the model runs with
``logits_to_keep=<empty index>`` (its lm_head sees no position), the final hidden states are
taken from the decoder backbone with a forward hook, and only the positions whose label
counts (completion tokens, no prompt, no padding) go through lm_head, in chunks of
``chunk_tokens`` positions. Each chunk runs under ``torch.utils.checkpoint`` when gradients are
needed, so backward recomputes one chunk's logits at a time: the peak is one chunk's
``[chunk, V]`` fp32 logits instead of the whole batch's.

The lm_head is called as a module (not through its weight), so DeepSpeed ZeRO-3's module hooks
gather its partitioned weight for every call, including the recompute in backward. Gemma 3's
``final_logit_softcapping`` (``tanh(x / c) · c``) is applied per chunk, as the model would.

Static shapes (``static=True``, for HPU graphs): picking the counted positions out of the batch
gives a different number every step, so a static-shape device would compile a new graph each
time. There, every position of the (bucket-padded) batch goes through lm_head in chunks of exactly
``chunk_tokens`` rows (the last chunk padded), and positions that do not count are weighted 0.
The shapes then depend only on the batch's padded shape, at the cost of the prompt positions'
lm_head work (which TRL and optimum-habana pay anyway).

``mean_chosen_logits`` / ``mean_rejected_logits`` (TRL's logged metrics: the mean of the logits
over the vocabulary at the completion positions) are computed exactly from the chunks, under
``no_grad``.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

# Tokens per lm_head chunk: about 256 MiB of fp32 logits per chunk, at least 256 tokens.
CHUNK_BYTES = 256 * 2**20


def default_chunk_tokens(vocab_size: int) -> int:
    """~256 MiB of fp32 logits per chunk (>= 256 tokens); $DPO_DIST_LOGPS_CHUNK_TOKENS overrides (tests)."""
    import os

    env = os.environ.get("DPO_DIST_LOGPS_CHUNK_TOKENS")
    if env:
        return max(1, int(env))
    return max(256, CHUNK_BYTES // (4 * max(1, vocab_size)))


def _chunk_logps(lm_head, softcap: float | None, hidden: torch.Tensor, labels: torch.Tensor):
    logits = lm_head(hidden)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits.float()
    logp = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return logp, logits.detach().sum(-1)


def token_logps(lm_head, hidden: torch.Tensor, labels: torch.Tensor, *, softcap: float | None = None,
                chunk_tokens: int | None = None, checkpoint: bool | None = None, static: bool = False):
    """Log-prob of ``labels`` [n] under ``softcap(lm_head(hidden))`` [n, V], chunked over n.

    Returns ``(logps [n] fp32, logit_sums [n] fp32 detached: the sum of the logits over V)``.
    ``checkpoint`` (default: when grad is enabled) recomputes each chunk in backward. ``static``: every
    chunk has exactly ``chunk_tokens`` rows (the input is zero-padded to a multiple of it).
    """
    n = hidden.shape[0]
    if chunk_tokens is None:
        chunk_tokens = default_chunk_tokens(getattr(lm_head, "out_features", 0) or 262144)
    chunk_tokens = max(1, min(chunk_tokens, n))  # never a chunk (static: a padded one) longer than the input
    weight = getattr(lm_head, "weight", None)
    zero3 = weight is not None and hasattr(weight, "ds_id")
    if checkpoint is None:
        # DeepSpeed ZeRO-3 does not re-gather a FROZEN partitioned weight (LoRA's lm_head) when a
        # checkpoint recomputes the chunk in backward: there, chunks are kept, not recomputed.
        checkpoint = torch.is_grad_enabled() and hidden.requires_grad and not (zero3 and not weight.requires_grad)
    n_chunks = -(-n // chunk_tokens)
    if zero3:
        # Every lm_head call all-gathers its weight under ZeRO-3: all ranks must make the same
        # number of calls, whatever their number of completion tokens.
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([n_chunks], dtype=torch.long, device=hidden.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            n_chunks = int(t.item())
    if static and n_chunks * chunk_tokens > n:  # pad to whole chunks: every lm_head call has the same shape
        extra = n_chunks * chunk_tokens - n
        hidden = torch.cat([hidden, hidden.new_zeros(extra, hidden.shape[1])])
        labels = torch.cat([labels, labels.new_zeros(extra)])
    outs, sums = [], []
    for start in (i * chunk_tokens for i in range(n_chunks)):
        h, y = hidden[start:start + chunk_tokens], labels[start:start + chunk_tokens]
        if checkpoint:
            lp, s = torch.utils.checkpoint.checkpoint(_chunk_logps, lm_head, softcap, h, y, use_reentrant=False)
        else:
            lp, s = _chunk_logps(lm_head, softcap, h, y)
        outs.append(lp)
        sums.append(s)
    if not outs:
        z = hidden.new_zeros(0, dtype=torch.float32)
        return z, z
    # Empty trailing chunks (equalised calls) add nothing; static padding is cut off.
    return torch.cat(outs)[:n], torch.cat(sums).detach()[:n]


def engine_autocast(model, device_type: str):
    """The autocast a DeepSpeed engine runs its forward under (``torch_autocast`` in its config: CPU --bf16), for the
    lm_head chunks, which run outside that forward; a no-op for any other model."""
    enabled = getattr(model, "torch_autocast_enabled", None)
    if callable(enabled) and enabled():
        return torch.autocast(device_type=device_type, dtype=model.torch_autocast_dtype())
    return nullcontext()


def causal_lm_parts(model):
    """(backbone, lm_head, softcap) of a HF causal LM, through DeepSpeed / DDP / PEFT wrappers."""
    m = model
    while hasattr(m, "module") and not hasattr(m, "get_output_embeddings"):
        m = m.module  # DeepSpeedEngine / DDP
    if hasattr(m, "get_base_model"):  # PeftModel
        m = m.get_base_model()
    backbone = m.get_decoder() if hasattr(m, "get_decoder") else getattr(m, "model", None)
    lm_head = m.get_output_embeddings()
    if backbone is None or lm_head is None:
        raise TypeError(f"{type(m).__name__}: no decoder backbone / lm_head to compute chunked log-probs from")
    cfg = getattr(m, "config", None)
    softcap = getattr(getattr(cfg, "text_config", cfg), "final_logit_softcapping", None)
    return backbone, lm_head, softcap


@contextmanager
def _capture_output(module):
    box = {}

    def hook(_mod, _inp, out):
        box["hidden"] = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state

    handle = module.register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


def final_hidden_states(model, input_ids: torch.Tensor, attention_mask, **forward_kwargs) -> torch.Tensor:
    """The backbone's last hidden state [B, T, H] (after the final norm), with no logits computed.

    A model inside a training wrapper (DDP, a DeepSpeed engine) runs through the wrapper, so that its forward
    bookkeeping runs (DDP's gradient-sync preparation, ZeRO-3's parameter coordination), with ``logits_to_keep``
    empty; a forward hook on the backbone reads the hidden state. Any other model (a reference outside DeepSpeed)
    runs its backbone directly and the hidden state is the backbone's output: that also holds when the model's
    whole forward is an HPU graph (optimum-habana wraps a separate reference in one), whose replay runs no Python
    hook."""
    backbone, _, _ = causal_lm_parts(model)
    if not hasattr(model, "module"):
        out = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **forward_kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
    none = torch.zeros(0, dtype=torch.long, device=input_ids.device)
    with _capture_output(backbone) as box:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=none, **forward_kwargs)
    return box["hidden"]


def sequence_logps(model, input_ids: torch.Tensor, attention_mask, loss_mask: torch.Tensor, *,
                   chunk_tokens: int | None = None, seq_ids: torch.Tensor | None = None,
                   n_seqs: int | None = None, static: bool = False, prev_index: torch.Tensor | None = None,
                   **forward_kwargs):
    """Per-sequence sums of log p(token_t | tokens_<t) over positions t with ``loss_mask[t]`` (t ≥ 1).

    A sequence is a row, or with ``seq_ids`` [B, T] (packed rows: dpo_dist/model/packing.py) the tokens
    of one id, ``n_seqs`` of them. ``forward_kwargs`` go to the model (position ids, row bounds).
    Returns ``(logps [n] fp32, logit_sums [n] fp32, n_tokens [n])``; logit_sums is the sum of all
    V logits over the counted positions (for TRL's mean-logits metrics). ``attention_mask`` is what the
    model takes: [B, T], or a prepared 4D mask (dict) for packed rows. ``static``: see the module docstring.
    ``prev_index`` [B, T]: the position whose output predicts token t (a shared prompt: packing.pack_pairs);
    default t - 1.
    """
    _, lm_head, softcap = causal_lm_parts(model)
    hidden = final_hidden_states(model, input_ids, attention_mask, **forward_kwargs)
    with engine_autocast(model, hidden.device.type):
        return _gathered_logps(lm_head, softcap, hidden, input_ids, loss_mask, chunk_tokens=chunk_tokens,
                               seq_ids=seq_ids, n_seqs=n_seqs, static=static, prev_index=prev_index)


def _gathered_logps(lm_head, softcap, hidden, input_ids, loss_mask, *, chunk_tokens, seq_ids, n_seqs, static,
                    prev_index):
    """``sequence_logps`` after the forward: the counted positions through lm_head, summed per sequence."""
    n = input_ids.shape[0] if seq_ids is None else n_seqs
    zeros = lambda dtype: torch.zeros(n, dtype=dtype, device=input_ids.device)  # noqa: E731
    # Position t-1 predicts token t: count t where loss_mask[t] (t >= 1).
    if static:
        b, t = input_ids.shape
        weight = loss_mask[:, 1:].reshape(-1)
        rows = torch.arange(b, device=input_ids.device)[:, None].expand(b, t - 1)
        group = (rows if seq_ids is None else seq_ids[:, 1:]).reshape(-1)
        pred = hidden[:, :-1] if prev_index is None else hidden.gather(
            1, prev_index[:, 1:, None].expand(-1, -1, hidden.shape[-1]))
        lp, ls = token_logps(lm_head, pred.reshape(b * (t - 1), -1), input_ids[:, 1:].reshape(-1),
                             softcap=softcap, chunk_tokens=chunk_tokens, static=True)
        keep = weight.to(lp.dtype)
        lp, ls, count = lp * keep, ls * keep, weight.long()
    else:
        target = loss_mask[:, 1:].bool()
        rows, cols = target.nonzero(as_tuple=True)
        src = cols if prev_index is None else prev_index[rows, cols + 1]
        lp, ls = token_logps(lm_head, hidden[rows, src], input_ids[rows, cols + 1], softcap=softcap,
                             chunk_tokens=chunk_tokens)
        group = rows if seq_ids is None else seq_ids[rows, cols + 1]
        count = torch.ones_like(group)
    logps = zeros(torch.float32).index_add(0, group, lp)
    sums = zeros(torch.float32).index_add(0, group, ls)
    ntok = zeros(torch.long).index_add(0, group, count)
    return logps, sums, ntok


def reference_sequence_logps(model, input_ids, attention_mask, loss_mask) -> torch.Tensor:
    """Unchunked reference: full logits, log_softmax, gather (what TRL does). For tests."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    logits = out.logits[:, :-1].float()
    labels = input_ids[:, 1:]
    lp = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return (lp * loss_mask[:, 1:]).sum(-1)
