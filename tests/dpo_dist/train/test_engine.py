"""The engine's pieces equal the trl 0.22 pieces they replace on the HPU path: tokenisation, collation, row layout;
its static-shape mode gives the same log-probs as the dynamic one; a training step through it learns."""

from __future__ import annotations

import random

import pytest
import torch

from dpo_dist.train.engine import EngineCollator, EngineConfig, build_rows, collate, forward_logps, tokenize_pair


def _examples(n=5, seed=0):
    rng = random.Random(seed)
    ids = lambda k: [rng.randint(4, 900) for _ in range(k)]  # noqa: E731
    return [{"prompt_input_ids": ids(rng.randint(1, 9)), "chosen_input_ids": ids(rng.randint(1, 12)),
             "rejected_input_ids": ids(rng.randint(1, 7)), "ref_chosen_logps": -rng.random() * 50,
             "ref_rejected_logps": -rng.random() * 50} for _ in range(n)]


def test_tokenize_pair_equals_trl_022(tiny_assets):
    from transformers import AutoTokenizer
    from trl import DPOTrainer

    tok = AutoTokenizer.from_pretrained(tiny_assets.tokenizer_dir)
    row = {"prompt": tok.bos_token + "\n\nHuman: how do I bake bread at home?\n\nAssistant:",
           "chosen": " Mix flour, water, salt and yeast, knead, let it rise, then bake.", "rejected": " No."}
    for max_prompt, max_completion in ((None, None), (5, 4), (100, 100)):
        ours = tokenize_pair(row, tok, max_prompt, max_completion)
        theirs = DPOTrainer.tokenize_row(row, tok, max_prompt, max_completion, add_special_tokens=False)
        assert ours == theirs, (max_prompt, max_completion)
    assert ours["chosen_input_ids"][-1] == tok.eos_token_id


def test_collate_equals_trl_022():
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    ex = _examples()
    ours, theirs = collate(ex, 0), DataCollatorForPreference(pad_token_id=0)(ex)
    assert set(ours) == set(theirs)
    for k in theirs:
        assert torch.equal(ours[k], theirs[k].to(ours[k].dtype)), k


@pytest.mark.parametrize("max_length,mode", [(None, "keep_end"), (12, "keep_end"), (12, "keep_start"), (5, "keep_end")])
def test_row_layout_equals_trl_022(max_length, mode):
    """The concatenated rows of trl 0.22's concatenated_forward (flush, truncate, flush), from the engine's code."""
    from trl.trainer.utils import flush_left, flush_right

    b = collate(_examples(6, seed=1), 0)
    ids, att, loss = build_rows(b["prompt_input_ids"], b["prompt_attention_mask"], b["chosen_input_ids"],
                                b["chosen_attention_mask"], max_length=max_length, truncation_mode=mode)
    x = torch.cat((b["prompt_input_ids"], b["chosen_input_ids"]), 1)
    m = torch.cat((b["prompt_attention_mask"], b["chosen_attention_mask"]), 1)
    lm = torch.cat((torch.zeros_like(b["prompt_attention_mask"]), b["chosen_attention_mask"]), 1)
    if max_length is not None and max_length < m.shape[1]:
        if mode == "keep_start":
            m, x, lm = flush_left(m, x, lm)
            m, x, lm = m[:, :max_length], x[:, :max_length], lm[:, :max_length]
        else:
            m, x, lm = flush_right(m, x, lm)
            m, x, lm = m[:, -max_length:], x[:, -max_length:], lm[:, -max_length:]
            m, x, lm = flush_left(m, x, lm)
    else:
        m, x, lm = flush_left(m, x, lm)
    assert torch.equal(ids, x) and torch.equal(att, m) and torch.equal(loss, lm)


@pytest.mark.parametrize("packing", [False, True])
def test_static_shapes_equal_dynamic(tiny_assets, packing):
    """The static-shape mode (every position through lm_head in whole chunks) gives the dynamic mode's values, and its
    lm_head calls take all positions of the bucket-padded rows: their shape follows from the bucket alone."""
    from transformers import AutoTokenizer

    from dpo_dist.model.packing import register_varlen_attention, varlen_name
    from dpo_dist.tiny import build_tiny_model

    tok = AutoTokenizer.from_pretrained(tiny_assets.tokenizer_dir)
    model = build_tiny_model("llama", tok, seed=3)
    if packing:
        register_varlen_attention()
        model.config._attn_implementation = varlen_name("sdpa")
    ex = _examples(4, seed=2)
    out = {}
    for static in (False, True):
        cfg = EngineConfig(max_length=16, max_prompt_length=None, max_completion_length=None, pad_token_id=0,
                           packing=packing, static_shapes=static)
        buckets = [40, 70, 100] if packing else [8, 16]
        batch = EngineCollator(cfg, buckets)(ex)
        shapes = []
        hook = model.lm_head.register_forward_hook(lambda m, i, o, shapes=shapes: shapes.append(tuple(i[0].shape)))
        with torch.no_grad():
            out[static] = forward_logps(model, batch, cfg)
        hook.remove()
        if static:
            rows = 1 if packing else len(ex)
            chunks = [s for s in shapes if len(s) == 2]  # the engine's calls (the model's own call keeps 0 positions)
            assert chunks and all(s[0] in {rows * (k - 1) for k in buckets} for s in chunks), chunks
    for k in ("chosen_logps", "rejected_logps", "mean_chosen_logits", "mean_rejected_logits"):
        torch.testing.assert_close(out[True][k], out[False][k], atol=1e-5, rtol=1e-5)


def test_engine_loss_needs_nll_only_for_sft(tiny_assets):
    from transformers import AutoTokenizer

    from dpo_dist.tiny import build_tiny_model

    tok = AutoTokenizer.from_pretrained(tiny_assets.tokenizer_dir)
    model = build_tiny_model("llama", tok, seed=3)
    batch = collate(_examples(3), 0)
    kw = dict(max_length=None, max_prompt_length=None, max_completion_length=None, pad_token_id=0)
    with torch.no_grad():
        plain = forward_logps(model, batch, EngineConfig(**kw))
        sft = forward_logps(model, batch, EngineConfig(**kw, loss_type="sft"))
        ipo = forward_logps(model, batch, EngineConfig(**kw, loss_type="ipo"))
    assert "nll_loss" not in plain and sft["nll_loss"] > 0
    n_chosen = batch["chosen_attention_mask"].sum()
    torch.testing.assert_close(sft["nll_loss"], -plain["chosen_logps"].sum() / n_chosen)
    torch.testing.assert_close(ipo["chosen_logps"], plain["chosen_logps"] / batch["chosen_attention_mask"].sum(-1))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_hidden_states_through_a_wrapper_equal_the_backbones_own(tiny_assets, family):
    """A model in a training wrapper runs through it (a hook reads the hidden state); a bare model runs its backbone
    directly (no hook: an HPU-graph replay of the whole forward would run none). Both give the same tensor."""
    from transformers import AutoTokenizer

    from dpo_dist.model.logprobs import final_hidden_states
    from dpo_dist.tiny import build_tiny_model

    tok = AutoTokenizer.from_pretrained(tiny_assets.tokenizer_dir)
    model = build_tiny_model(family, tok, seed=4).eval()

    class Wrapper(torch.nn.Module):  # what DDP and DeepSpeed's engine look like from outside: a .module
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    b = collate(_examples(3, seed=5), 0)
    ids, att, _ = build_rows(b["prompt_input_ids"], b["prompt_attention_mask"], b["chosen_input_ids"],
                             b["chosen_attention_mask"], max_length=None)
    calls = []
    handle = model.lm_head.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[1]))
    with torch.no_grad():
        direct = final_hidden_states(model, ids, att)
        wrapped = final_hidden_states(Wrapper(model), ids, att)
    handle.remove()
    assert calls == [0]  # the wrapper path runs the whole model, lm_head on no position; the direct path skips it
    torch.testing.assert_close(direct, wrapped, atol=0, rtol=0)
