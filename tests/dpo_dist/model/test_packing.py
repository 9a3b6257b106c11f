"""Packing (dpo_dist/model/packing.py): one packed row gives the same log-probs and gradients as the
unpacked rows, for Llama and Gemma 3 (sliding window included); a packed micro-batch pads once."""

from __future__ import annotations

import random

import pytest
import torch

from dpo_dist.model.logprobs import sequence_logps
from dpo_dist.model.packing import pack_pairs, register_varlen_attention, varlen_name
from dpo_dist.train.engine import build_rows, packed_logps
from launch.plan import HARDWARE, PlanOptions, estimate_memory, load_spec, make_plan, packed_tokens


def _rows(vocab, seed, n=3, max_length=14):
    g = torch.Generator().manual_seed(seed)
    out = []
    for C in (9, 5):  # "chosen" and "rejected" completions of the same prompts
        prompt = torch.randint(4, vocab, (n, 7), generator=g)
        pmask = torch.ones(n, 7, dtype=torch.long)
        pmask[0, :3] = 0  # left padding
        comp = torch.randint(4, vocab, (n, C), generator=g)
        cmask = torch.ones(n, C, dtype=torch.long)
        cmask[1, 3:] = 0  # right padding
        comp[cmask == 0], prompt[pmask == 0] = 0, 0
        out.append(build_rows(prompt, pmask, comp, cmask, max_length=max_length))
    return out


def _load(tmp_path, tiny_assets, family, attn):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_dist.tiny import build_tiny_model

    tok = AutoTokenizer.from_pretrained(tiny_assets.tokenizer_dir)
    m = build_tiny_model(family, tok, size="tiny", seed=1)
    if family == "gemma3":
        m.config.sliding_window = 6  # shorter than the rows: the banded mask is exercised
    m.save_pretrained(tmp_path / family)
    register_varlen_attention()
    base = AutoModelForCausalLM.from_pretrained(tmp_path / family, attn_implementation=attn).eval()
    packed = AutoModelForCausalLM.from_pretrained(tmp_path / family, attn_implementation=varlen_name(attn)).eval()
    return tok, base, packed


def _assert_grads_match(model, g_ref):
    for n, p in model.named_parameters():
        # fp32 sums in another order: the tied Gemma embedding's gradient (lm_head + lookup) is the largest
        scale = max(1.0, float(g_ref[n].abs().max()))
        torch.testing.assert_close(p.grad, g_ref[n], atol=2e-5 * scale, rtol=1e-4, msg=n)


@pytest.mark.parametrize("family,attn", [("llama", "sdpa"), ("gemma3", "eager"), ("gemma3", "sdpa")])
def test_packed_equals_unpacked(tmp_path, tiny_assets, family, attn):
    tok, base, model = _load(tmp_path, tiny_assets, family, attn)
    chosen, rejected = _rows(len(tok), seed=0)
    ref = torch.cat([sequence_logps(base, *chosen)[0], sequence_logps(base, *rejected)[0]])
    ref.sum().backward()
    g_ref = {n: p.grad.clone() for n, p in base.named_parameters() if p.grad is not None}

    packed = pack_pairs(chosen, rejected, pad_to=80, pad_value=tok.pad_token_id)
    assert "part" not in packed and "prev_index" not in packed  # plain rows: no shared-prompt layout
    real = int(chosen[1].sum() + rejected[1].sum())
    assert packed["input_ids"].shape == (1, 80) and packed["cu_seqlens"][-1] == real and packed["n_seqs"] == 6
    got, _, ntok = packed_logps(model, packed, chunk_tokens=5)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(ntok, torch.cat([chosen[2][:, 1:].sum(-1), rejected[2][:, 1:].sum(-1)]))
    got.sum().backward()
    _assert_grads_match(model, g_ref)

    # The varlen model without packing kwargs is the base model (generation, evaluation).
    ids, att, _ = chosen
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=att).logits,
                                   base(input_ids=ids, attention_mask=att).logits, atol=1e-5, rtol=1e-5)


def test_packed_row_never_predicts_across_rows():
    """A row whose first token is a completion token (no prompt) counts no loss on it: the
    previous row's last position must not predict it."""
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    att = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    loss = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0]])
    p = pack_pairs((ids[:1], att[:1], loss[:1]), (ids[1:], att[1:], loss[1:]), pad_to=8)
    assert p["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0]]
    assert p["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert p["loss_mask"].tolist() == [[0, 1, 1, 0, 1, 0, 0, 0]]
    assert p["seq_ids"].tolist()[0][:5] == [0, 0, 0, 1, 1] and p["cu_seqlens"] == [0, 3, 5]


def test_packed_sampler_seeded_distributed_balanced():
    from dpo_dist.data.bucketing import PackedBatchSampler

    rng = random.Random(0)
    lengths = [int(rng.lognormvariate(5, 0.7)) + 10 for _ in range(203)]
    shards = [list(PackedBatchSampler(lengths, 4, num_replicas=2, rank=k, seed=3)) for k in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == len(PackedBatchSampler(lengths, 4, num_replicas=2, rank=1))
    assert all(len(b) == 4 for s in shards for b in s)
    assert {i for s in shards for b in s for i in b} == set(range(203))  # every pair (a few repeated)
    assert list(PackedBatchSampler(lengths, 4, num_replicas=2, rank=0, seed=3)) == shards[0]  # resume: same order
    s = PackedBatchSampler(lengths, 4, num_replicas=2, rank=0, seed=3)
    s.set_epoch(1)
    assert list(s) != shards[0]
    # Balanced totals: about half the spread of random batches of the same pairs (measured: 0.15 vs
    # 0.30 std/mean; the one completed last batch is as random as ever).
    import statistics

    totals = s.totals(1)
    order = list(range(200))
    random.Random(1).shuffle(order)
    rand = [sum(lengths[i] for i in order[k:k + 4]) for k in range(0, 200, 4)]
    spread = lambda t: statistics.pstdev(t) / statistics.mean(t)  # noqa: E731
    assert spread(totals) < 0.6 * spread(rand), (spread(totals), spread(rand))
    assert s.epoch == 1  # totals() leaves the sampler's epoch as it was


@pytest.mark.parametrize("micro_batch", [2, 8])
def test_packed_padding_on_long_tail_bench_data(micro_batch):
    """The bench data: packed micro-batches padded to <= 8 bucket totals pad <= 10% (per-row buckets
    cannot go below ~18% on these 1000 rows: tests/dpo_dist/data/test_bucketing.py)."""
    from conftest import bench_row_lengths
    from dpo_dist.data.bucketing import PackedBatchSampler, choose_buckets, padding_fraction

    pairs = [c + r for c, r in bench_row_lengths(1000)]
    sampler = PackedBatchSampler(pairs, micro_batch, num_replicas=2, seed=0)
    totals = sampler.totals(epochs=2)
    buckets = choose_buckets(totals, 8)
    assert len(buckets) <= 8
    assert padding_fraction(totals, buckets) <= 0.10, (padding_fraction(totals, buckets), buckets)


def test_collator_pads_packed_batch_to_its_bucket_total():
    from dpo_dist.data.bucketing import fed_tokens
    from dpo_dist.train.engine import EngineCollator, EngineConfig

    cfg = EngineConfig(max_length=None, max_prompt_length=None, max_completion_length=None, pad_token_id=0, packing=True)
    ex = [{"prompt_input_ids": [5] * 3, "chosen_input_ids": [6] * 4, "rejected_input_ids": [7] * 2},
          {"prompt_input_ids": [5] * 2, "chosen_input_ids": [6] * 6, "rejected_input_ids": [7] * 1}]
    batch = EngineCollator(cfg, [16, 32])(ex)  # rows 7 + 8 + 5 + 3 = 23 tokens -> bucket 32
    assert int(batch["packed_pad_to"]) == 32 and "chosen_pad_to" not in batch
    # pair by pair: chosen 0 (7), rejected 0 (5), chosen 1 (8), rejected 1 (3)
    assert batch["packed_input_ids"].shape == (1, 32) and batch["packed_cu_seqlens"].tolist() == [0, 7, 12, 20, 23]
    assert fed_tokens(batch, None) == 32
    small = EngineCollator(cfg, [8])(ex)
    assert int(small["packed_pad_to"]) == 23  # beyond every bucket: its own length, never truncated


def test_planner_sizes_packed_micro_batches_by_the_data(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the built-in spec, without asking the hub

    s, cpu = load_spec("google/gemma-3-270m"), HARDWARE["cpu"]
    base = dict(cards=2, max_length=1024, max_prompt_length=512, use_peft=False, card_memory_gib=16.0)
    worst = PlanOptions(**base)
    data = PlanOptions(**base, pair_tokens=(600.0, 2048.0))
    assert packed_tokens(worst, 4) == 2 * 4 * 1024
    assert packed_tokens(data, 4) == pytest.approx(4 * 600 + (2048 - 600) / 4)
    mem = lambda o, mb: estimate_memory(s, cpu, o, 3, "none", mb, False, "precomputed")["activations"]  # noqa: E731
    assert mem(data, 4) < mem(worst, 4) / 2
    unpacked = PlanOptions(**base, packing=False)  # CPU SDPA with a padding mask keeps the scores
    assert mem(unpacked, 4) > mem(worst, 4)
    # Memory freed by packing buys a bigger micro-batch; the rank's share of the data caps it.
    assert make_plan(s, cpu, data).micro_batch_size > make_plan(s, cpu, unpacked).micro_batch_size
    assert make_plan(s, cpu, PlanOptions(**base, pair_tokens=(600.0, 2048.0), train_pairs=6)).micro_batch_size <= 3
    gaudi = make_plan(s, HARDWARE["gaudi2"], PlanOptions(cards=1))
    # The engine on Gaudi too: packed rows through a block-diagonal mask, padded to 8 bucket totals (8 graphs).
    assert gaudi.packing and gaudi.packing_attention == "block_mask" and gaudi.length_buckets == 8 and gaudi.static_shapes


def _pairs(vocab, seed, n=3, max_length=14):
    """Chosen and rejected rows of the SAME prompts; with max_length 14 the last pair's chosen row is cut."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(4, vocab, (n, 7), generator=g)
    pmask = torch.ones(n, 7, dtype=torch.long)
    pmask[0, :3] = 0  # left padding
    prompt[pmask == 0] = 0
    out = []
    for C in (6, 4):
        comp = torch.randint(4, vocab, (n, C), generator=g)
        cmask = torch.ones(n, C, dtype=torch.long)
        cmask[1, 2:] = 0  # right padding
        comp[cmask == 0] = 0
        out.append(build_rows(prompt, pmask, comp, cmask, max_length=max_length))
    out[0] = tuple(t.clone() for t in out[0])
    return out, pmask.sum(-1)


@pytest.mark.parametrize("family,attn", [("llama", "sdpa"), ("gemma3", "eager"), ("gemma3", "sdpa")])
def test_shared_prompt_equals_unpacked(tmp_path, tiny_assets, family, attn):
    """prompt + chosen + rejected in one packed row (the prompt run once) gives the rows' own log-probs and
    gradients; a pair whose row was cut to max_length keeps its two rows."""
    from dpo_dist.data.bucketing import shares_prompt
    from dpo_dist.model.packing import PART_PROMPT, PART_SECOND

    tok, base, model = _load(tmp_path, tiny_assets, family, attn)
    (chosen, rejected), plen = _pairs(len(tok), seed=1, max_length=12)
    ref = torch.cat([sequence_logps(base, *chosen)[0], sequence_logps(base, *rejected)[0]])
    ref.sum().backward()
    g_ref = {n: p.grad.clone() for n, p in base.named_parameters() if p.grad is not None}

    rlen = rejected[1].sum(-1) - plen
    share = [shares_prompt(int(p), int(c), int(r), 12) for p, c, r in zip(plen, [6, 2, 6], [4, 2, 4])]
    assert share == [True, True, False]  # pair 2: 7 + 6 > 12, its chosen row lost prompt tokens
    packed = pack_pairs(chosen, rejected, share, pad_to=64, pad_value=tok.pad_token_id)
    real = int(chosen[1].sum() + rejected[1].sum()) - int(plen[0] + plen[1])
    assert packed["input_ids"].shape == (1, 64) and packed["cu_seqlens"][-1] == real
    assert int((packed["part"] == PART_PROMPT).sum()) == int(plen[0] + plen[1])
    assert int((packed["part"] == PART_SECOND).sum()) == int(rlen[0] + rlen[1])
    got, _, ntok = packed_logps(model, packed, chunk_tokens=5)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(ntok, torch.cat([chosen[2][:, 1:].sum(-1), rejected[2][:, 1:].sum(-1)]))
    got.sum().backward()
    _assert_grads_match(model, g_ref)


def test_shared_prompt_block_mask_is_the_rows_causal_masks():
    """block_mask (HPU) attention of a shared pair: the chosen part sees the prompt and itself, the rejected part the
    prompt and itself, never the chosen part; the window counts positions, not packed offsets."""
    from dpo_dist.model.packing import _segments, block_attention_mask

    ids = torch.tensor([[5, 6, 7, 8, 0], [5, 6, 9, 0, 0]])  # prompt [5, 6]; chosen [7, 8]; rejected [9]
    att = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    loss = torch.tensor([[0, 0, 1, 1, 0], [0, 0, 1, 0, 0]])
    p = pack_pairs((ids[:1], att[:1], loss[:1]), (ids[1:], att[1:], loss[1:]), [True], pad_to=7)
    assert p["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0]]
    assert p["position_ids"].tolist() == [[0, 1, 2, 3, 2, 0, 1]]
    assert p["prev_index"].tolist()[0][4] == 1  # the rejected token is predicted by the prompt's last position
    assert p["blocks"] == [(0, 4, 0, 0), (4, 5, 0, 2)] and p["cu_seqlens"] == [0, 5]
    m = block_attention_mask(_segments(p, "cpu"), dtype=torch.float32, part=p["part"], position_ids=p["position_ids"])
    assert m[0, 0].long().tolist() == [[1, 0, 0, 0, 0, 0, 0],
                                       [1, 1, 0, 0, 0, 0, 0],
                                       [1, 1, 1, 0, 0, 0, 0],
                                       [1, 1, 1, 1, 0, 0, 0],
                                       [1, 1, 0, 0, 1, 0, 0],
                                       [0, 0, 0, 0, 0, 1, 0],
                                       [0, 0, 0, 0, 0, 0, 1]]
    w = block_attention_mask(_segments(p, "cpu"), dtype=torch.float32, part=p["part"], position_ids=p["position_ids"],
                             sliding_window=2)
    assert w[0, 0, 4].long().tolist() == [0, 1, 0, 0, 1, 0, 0]  # position 2 sees positions 1 and 2


def test_collator_packs_shared_prompts_and_the_sampler_counts_them_once():
    from dpo_dist.data.bucketing import fed_tokens, packed_pair_length, unpadded_tokens
    from dpo_dist.train.engine import EngineCollator, EngineConfig

    cfg = EngineConfig(max_length=9, max_prompt_length=None, max_completion_length=None, pad_token_id=0, packing=True,
                       share_prompt=True)
    ex = [{"prompt_input_ids": [5] * 3, "chosen_input_ids": [6] * 4, "rejected_input_ids": [7] * 2},
          {"prompt_input_ids": [5] * 4, "chosen_input_ids": [6] * 6, "rejected_input_ids": [7] * 1}]
    assert packed_pair_length(3, 4, 2, 9, True) == 9  # shared: 3 + 4 + 2
    assert packed_pair_length(4, 6, 1, 9, True) == 9 + 5  # 4 + 6 > 9: two rows, the chosen one cut to 9
    assert packed_pair_length(3, 4, 2, 9, False) == 7 + 5
    batch = EngineCollator(cfg, [16, 32])(ex)
    assert int(batch["packed_pad_to"]) == 32 and batch["packed_cu_seqlens"].tolist() == [0, 9, 18, 23]
    assert unpadded_tokens(batch, 9) == 23 and fed_tokens(batch, 9) == 32
