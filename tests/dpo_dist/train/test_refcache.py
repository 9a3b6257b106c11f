"""Reference log-prob cache: equals TRL's own precompute, hits on the second run, misses when
max_length changes, and training from it gives the live reference's first-step loss."""

from __future__ import annotations

import pytest
import torch


def _build(tiny, tmp_path, *, reference, max_length=96, cache_dir=None, extra=()):
    from transformers import set_seed

    from dpo_dist.args import parse_args, validate
    from dpo_dist.backend import get_backend
    from dpo_dist.data.preference import load_preference_splits, with_bos
    from dpo_dist.model.loader import load_model, load_tokenizer
    from dpo_dist.train.trl_trainer import build_trainer, build_training_setup

    argv = ["--model_name_or_path", str(tiny.llama_dir), "--dataset_name", str(tiny.data_dir),
            "--output_dir", str(tmp_path / f"out-{reference}-{max_length}"), "--device", "cpu",
            "--max_length", str(max_length), "--max_prompt_length", "48", "--max_train_samples", "12",
            "--max_eval_samples", "6", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
            "--max_steps", "1", "--logging_steps", "1", "--learning_rate", "1e-3", "--reference", reference,
            "--ref_cache_dir", str(cache_dir or tmp_path / "refcache"), "--save_steps", "1000", "--no_merge", *extra]
    m, d, t = parse_args(argv)
    validate(m, d, t)
    backend = get_backend("cpu")
    setup = build_training_setup(backend, m, d, t)
    tok = load_tokenizer(m)
    train, held = load_preference_splits(d, t.seed)
    train, held = with_bos(train, tok), with_bos(held, tok)
    load = lambda: load_model(m, device="cpu", bf16=False, extra_kwargs={})[0]  # noqa: E731
    set_seed(t.seed)
    model = load()
    ref = load() if reference == "replicated" else None
    set_seed(t.seed)
    return build_trainer(setup, backend=backend, model_args=m, data_args=d, train_args=t, model=model, ref_model=ref, tokenizer=tok,
                         train_dataset=train, eval_dataset=held, peft_config=None, callbacks=[], load_reference=load)


def test_cache_equals_trl_hits_misses_and_same_first_loss(tiny_assets, tmp_path):
    cache = tmp_path / "refcache"
    live = _build(tiny_assets, tmp_path, reference="replicated", cache_dir=cache)
    # TRL's own reference log-probs on the same tokenised rows (its compute_ref_log_probs, unchunked).
    batch = live.data_collator([live.train_dataset[i] for i in range(len(live.train_dataset))])
    engine, live.dpodist_engine = live.dpodist_engine, None
    trl_c, trl_r = live.compute_ref_log_probs(batch)
    live.dpodist_engine = engine

    first = _build(tiny_assets, tmp_path, reference="precomputed", cache_dir=cache)
    assert first.dpodist_ref_cache["hit"] is False and first.ref_model is None
    got_c = torch.tensor(first.train_dataset["ref_chosen_logps"])
    got_r = torch.tensor(first.train_dataset["ref_rejected_logps"])
    # Sums of ~100-300 token log-probs in fp32, computed in other batches (other padding, other reduction
    # order): agreement to 1e-4 relative (0.03 nats on -300; a wrong row or token would be off by whole nats).
    # 1e-5 relative was seen to fail by 3e-5 on one fresh machine.
    torch.testing.assert_close(got_c, trl_c.float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_r, trl_r.float(), atol=1e-4, rtol=1e-4)

    second = _build(tiny_assets, tmp_path, reference="precomputed", cache_dir=cache)
    assert second.dpodist_ref_cache["hit"] is True
    assert second.dpodist_ref_cache["path"] == first.dpodist_ref_cache["path"]

    other = _build(tiny_assets, tmp_path, reference="precomputed", cache_dir=cache, max_length=80)
    assert other.dpodist_ref_cache["hit"] is False

    # Same first-step loss: live reference vs cache (same seed, same data order).
    live.train()
    second.train()
    loss = lambda tr: next(h["loss"] for h in tr.state.log_history if "loss" in h)  # noqa: E731
    # The logged loss is rounded to 4 decimals, and the cached sums may differ from the live ones by ~1e-2 nats
    # (fp32, other batching: see above), which moves a loss of ln 2 by ~5e-4 at beta 0.1. A wrong cache (rows
    # or tokens misaligned) moves it by whole tenths.
    assert loss(second) == pytest.approx(loss(live), abs=1e-3)
