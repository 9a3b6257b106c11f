"""Chunked log-probs equal TRL-style unchunked ones (forward and gradients), Llama and Gemma 3."""

from __future__ import annotations

import pytest
import torch

from dpo_dist.model.logprobs import reference_sequence_logps, sequence_logps
from dpo_dist.train.engine import build_rows
from launch.plan import HARDWARE, PlanOptions, estimate_memory, load_spec, make_plan


def _model(family, tok, softcap=None):
    from dpo_dist.tiny import build_tiny_model

    m = build_tiny_model(family, tok, size="tiny", seed=1)
    if softcap is not None:
        m.config.final_logit_softcapping = softcap
    return m.eval()


def _batch(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, P, C = 3, 7, 9
    prompt = torch.randint(4, vocab, (B, P), generator=g)
    pmask = torch.ones(B, P, dtype=torch.long)
    pmask[0, :3] = 0  # left padding
    comp = torch.randint(4, vocab, (B, C), generator=g)
    cmask = torch.ones(B, C, dtype=torch.long)
    cmask[1, 5:] = 0  # right padding
    comp[cmask == 0] = 0
    prompt[pmask == 0] = 0
    return prompt, pmask, comp, cmask


@pytest.mark.parametrize("family,softcap", [("llama", None), ("gemma3", None), ("gemma3", 3.0)])
def test_chunked_equals_unchunked(tiny_assets, family, softcap):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_assets.tokenizer_dir)
    model = _model(family, tok, softcap)
    ids, att, lm = build_rows(*_batch(len(tok)), max_length=14, pad_to=20)
    assert ids.shape[1] == 20

    ref = reference_sequence_logps(model, ids, att, lm)
    ref.sum().backward()
    g_ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    got, logit_sums, ntok = sequence_logps(model, ids, att, lm, chunk_tokens=4)  # several chunks
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    got.sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, g_ref[n], atol=1e-5, rtol=1e-4, msg=n)
    # Exact mean logits (TRL's metric) from the chunks.
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()
        mask = lm[:, 1:].bool()
        torch.testing.assert_close(logit_sums.sum() / (ntok.sum() * logits.shape[-1]), logits[mask].mean(), atol=1e-5, rtol=1e-5)


def test_right_padding_does_not_change_logps(tiny_assets):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_assets.tokenizer_dir)
    model = _model("llama", tok)
    batch = _batch(len(tok), seed=3)
    with torch.no_grad():
        a = sequence_logps(model, *build_rows(*batch, max_length=None))[0]
        b = sequence_logps(model, *build_rows(*batch, max_length=None, pad_to=40))[0]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_planner_counts_chunked_logits_and_reference_cache(monkeypatch):
    """launch/plan/memory.py and search.py: chunked log-probs shrink the logits term (Gemma 3's 262k vocab), and with
    reference_cache the auto choice may drop the reference (precomputed)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the built-in spec, without asking the hub

    s = load_spec("google/gemma-3-1b-it")
    cuda = HARDWARE["cuda"]
    full = estimate_memory(s, cuda, PlanOptions(chunked_logps=False), 0, "none", 4, False, "adapter")
    chunked = estimate_memory(s, cuda, PlanOptions(chunked_logps=True), 0, "none", 4, False, "adapter")
    assert chunked["logits"] < full["logits"] / 10
    assert estimate_memory(s, cuda, PlanOptions(), 0, "none", 4, False, "adapter")["logits"] == chunked["logits"]
    gaudi = HARDWARE["gaudi2"]  # the engine chunks on Gaudi too
    assert estimate_memory(s, gaudi, PlanOptions(), 0, "none", 4, False, "adapter")["logits"] < estimate_memory(
        s, gaudi, PlanOptions(chunked_logps=False), 0, "none", 4, False, "adapter")["logits"] / 10
    tight = dict(cards=1, use_peft=False, card_memory_gib=24.0, zero_stage=0)
    # The cache is on by default, on every hardware; at equal speed the reference holding no memory wins.
    for hw, gib in ((cuda, 24.0), (gaudi, 48.0)):  # Gaudi: +95% measured runtime overhead
        room = {**tight, "card_memory_gib": gib}
        for opts in (PlanOptions(reference_cache=True, **room), PlanOptions(**room)):
            p = make_plan(s, hw, opts)
            assert p.reference == "precomputed" and p.fits and p.memory_gib.reference == 0, hw.name
        assert make_plan(s, hw, PlanOptions(reference_cache=False, **room)).reference == "replicated"


def test_lm_head_chunks_run_under_the_engines_autocast(tiny_assets):
    """A DeepSpeed engine with torch_autocast (CPU --bf16) runs its forward in bf16; the lm_head chunks, computed
    after that forward, run under the same autocast (a model without one: fp32)."""
    from transformers import AutoTokenizer

    from dpo_dist.model.logprobs import causal_lm_parts

    tok = AutoTokenizer.from_pretrained(tiny_assets.tokenizer_dir)
    m = _model("llama", tok)

    class Engine(torch.nn.Module):  # DeepSpeedEngine's autocast surface (deepspeed/runtime/engine.py)
        def __init__(self, module):
            super().__init__()
            self.module = module

        def torch_autocast_enabled(self):
            return True

        def torch_autocast_dtype(self):
            return torch.bfloat16

        def forward(self, **kw):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.module(**kw)

    seen = []
    causal_lm_parts(m)[1].register_forward_hook(lambda mod, i, o: seen.append(o.dtype))
    ids, att, loss = build_rows(*_batch(len(tok)), max_length=None)
    fp32 = sequence_logps(m, ids, att, loss)[0]
    assert seen == [torch.float32]
    bf16 = sequence_logps(Engine(m), ids, att, loss)[0]
    assert seen[-1] == torch.bfloat16 and bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, fp32, atol=0.5, rtol=0.02)  # bf16 matmuls: close, not equal
    assert not torch.equal(bf16, fp32)
