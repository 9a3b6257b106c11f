"""The embedded default: data format, determinism, loadable models, concurrent cache builds."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from conftest import ROOT
from dpo_dist import tiny
from dpo_dist.tiny import (
    ASSISTANT_TAG,
    HUMAN_TAG,
    ensure_tiny_assets,
    make_preference_rows,
    read_jsonl,
    read_marker,
    split_hh,
    verify_cache,
    write_preference_dataset,
)
from dpo_dist.tiny.assets import FAMILY_TEMPLATES, TINY_VERSION, _is_complete
from dpo_dist.tiny.formats import FORMATS, hh_to_messages


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return ensure_tiny_assets(tmp_path_factory.mktemp("cache"))


def _final(text: str) -> str:
    return split_hh(text)[1]


# ---------------------------------------------------------------- data

def test_data_format(assets):
    train, test = read_jsonl(assets.train_file), read_jsonl(assets.test_file)
    assert len(train) >= 2000 and len(test) == 200
    for rows in (train, test):
        n_multi = 0
        for i, row in enumerate(rows):
            assert set(row) == {"chosen", "rejected"}, i
            pc, ac = split_hh(row["chosen"])
            pr, ar = split_hh(row["rejected"])
            assert pc == pr, f"row {i}: prompts differ"
            assert pc.startswith(HUMAN_TAG) and pc.endswith(ASSISTANT_TAG)
            assert ac.startswith(" ") and ar.startswith(" ") and ac.strip() and ar.strip()
            assert ac != ar
            assert HUMAN_TAG not in ac and HUMAN_TAG not in ar
            n_multi += pc.count(HUMAN_TAG) > 1
        assert 0.1 < n_multi / len(rows) < 0.35
    # disjoint splits, distinct rows, varied rejected answers
    key = lambda r: (r["chosen"], r["rejected"])  # noqa: E731
    assert len({key(r) for r in train}) == len(train)
    assert not {key(r) for r in train} & {key(r) for r in test}
    assert len({_final(r["rejected"]) for r in train}) > 300


def test_load_dataset_both_ways(assets):
    from datasets import load_dataset

    by_dir = load_dataset(str(assets.data_dir))
    by_files = load_dataset("json", data_files={"train": str(assets.train_file), "test": str(assets.test_file)})
    for ds in (by_dir, by_files):
        assert set(ds) == {"train", "test"}
        assert ds["train"].num_rows == 2000 and ds["test"].num_rows == 200
        assert ds["train"].column_names == ["chosen", "rejected"]
    assert by_dir["test"][0] == by_files["test"][0]


def test_data_determinism(tmp_path):
    assert make_preference_rows(64, 7) == make_preference_rows(64, 7)
    assert make_preference_rows(64, 7) != make_preference_rows(64, 8)
    assert make_preference_rows(16, 7, long_tail=True) == make_preference_rows(16, 7, long_tail=True)
    a = write_preference_dataset(tmp_path / "a", n_train=100, n_test=20, seed=3)
    b = write_preference_dataset(tmp_path / "b", n_train=100, n_test=20, seed=3)
    for split in ("train", "test"):
        assert a[split].read_bytes() == b[split].read_bytes()


def test_long_tail_lengths(assets):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets.tokenizer_dir)
    n_tok = lambda rows: np.array([len(tok(r["chosen"], add_special_tokens=False).input_ids) for r in rows])  # noqa: E731
    short = n_tok(make_preference_rows(400, 1))
    long = n_tok(make_preference_rows(400, 1, long_tail=True))
    assert 20 <= np.median(short) <= 100 and short.max() < 256
    assert np.median(long) > np.median(short)
    assert long.max() > 4 * np.median(long)  # a long tail, not just a shift
    assert np.percentile(long, 90) > 2 * np.median(long)
    for r in make_preference_rows(200, 1, long_tail=True):
        assert split_hh(r["chosen"])[0] == split_hh(r["rejected"])[0]


def test_preference_is_lexically_learnable(assets):
    """Bag-of-words logistic regression on the final turns separates chosen from rejected."""
    train, test = read_jsonl(assets.train_file), read_jsonl(assets.test_file)
    words = lambda s: re.findall(r"[a-z']+", s.lower())  # noqa: E731
    vocab = {w: i for i, w in enumerate(sorted({w for r in train for k in r for w in words(_final(r[k]))}))}

    def featurize(rows):
        x, y = np.zeros((2 * len(rows), len(vocab))), np.zeros(2 * len(rows))
        for i, r in enumerate(rows):
            for j, (k, label) in enumerate((("chosen", 1.0), ("rejected", 0.0))):
                for w in words(_final(r[k])):
                    if w in vocab:
                        x[2 * i + j, vocab[w]] = 1.0
                y[2 * i + j] = label
        return x, y

    xtr, ytr = featurize(train)
    xte, yte = featurize(test)
    w, b = np.zeros(len(vocab)), 0.0
    for _ in range(200):
        p = 1 / (1 + np.exp(-(xtr @ w + b)))
        w -= 0.5 * (xtr.T @ (p - ytr) / len(ytr) + 1e-3 * w)
        b -= 0.5 * float(np.mean(p - ytr))
    acc = float(np.mean(((xte @ w + b) > 0) == (yte > 0.5)))
    assert acc > 0.95, acc


# ---------------------------------------------------------------- tokenizer and models

def test_tokenizer(assets):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = AutoTokenizer.from_pretrained(assets.tokenizer_dir)
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<bos>", "<eos>", "<pad>", "<unk>")
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}) == 4
    assert len(tok) == 1024 and tok.model_max_length == 1024
    row = read_jsonl(assets.test_file)[0]
    for text in (row["chosen"], "  café ✓ naïve\tdone\n", ASSISTANT_TAG):
        ids = tok(text, add_special_tokens=False).input_ids
        assert tok.decode(ids) == text
    assert tok("hello").input_ids == tok("hello", add_special_tokens=False).input_ids  # no automatic bos
    assert tok.apply_chat_template([{"role": "user", "content": "Hi?"}], tokenize=False,
                                   add_generation_prompt=True) == "\n\nHuman: Hi?\n\nAssistant:"


def test_data_in_every_format(assets):
    """The same rows in every format: the conversations are the hh transcripts turn by turn, and the single-turn
    schemas keep the last question with the final answers."""
    hh = read_jsonl(assets.test_file)
    for fmt in FORMATS:
        rows = read_jsonl(assets.format_dir(fmt) / "test.jsonl")
        assert len(rows) == len(hh), fmt
    conv = read_jsonl(assets.format_dir("conversational") / "test.jsonl")
    for h, c in zip(hh, conv):
        for key in ("chosen", "rejected"):
            assert c[key] == hh_to_messages(h[key])
            tags = {"user": HUMAN_TAG, "assistant": ASSISTANT_TAG}
            assert "".join(f"{tags[m['role']]} {m['content']}" for m in c[key]) == h[key]
    orca = read_jsonl(assets.format_dir("orca") / "test.jsonl")[0]
    assert orca["question"] == conv[0]["chosen"][-2]["content"] and orca["chosen"] == conv[0]["chosen"][-1]["content"]
    assert assets.format_dir("hh") == assets.data_dir


@pytest.mark.parametrize("family", tiny.ALL_FAMILIES)
def test_model_folders_carry_their_family_template(assets, family):
    from transformers import AutoTokenizer

    from dpo_dist.data.chat_templates import BUILTIN_TEMPLATES

    tok = AutoTokenizer.from_pretrained(assets.model_dir(family))
    assert tok.chat_template == BUILTIN_TEMPLATES[FAMILY_TEMPLATES[family]]
    # Qwen2's folder adds the ChatML turn markers after the shared vocabulary; the others keep it as it is.
    assert len(tok) == (1026 if family == "qwen2" else 1024)
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == ["<pad>", "<bos>", "<eos>", "<unk>"]


def test_twins(assets):
    """The Qwen2 and Mixtral twins: real config classes, tiny, their family's traits, the shared vocabulary."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shared = AutoTokenizer.from_pretrained(assets.tokenizer_dir).get_vocab()
    counts = {}
    for family in tiny.TWIN_FAMILIES:
        folder = assets.model_dir(family)
        assert folder == assets.root / family and folder.is_dir()
        tok = AutoTokenizer.from_pretrained(folder)
        assert {k: v for k, v in tok.get_vocab().items() if v < 1024} == shared
        model = AutoModelForCausalLM.from_pretrained(folder)
        counts[family] = tiny.param_count(model)
        names = dict(model.named_parameters())
        if family == "qwen2":
            assert type(model.config).__name__ == "Qwen2Config" and not model.config.use_sliding_window
            assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1024, 1025]
            text = tok.apply_chat_template([{"role": "user", "content": "Hi?"}], tokenize=False,
                                           add_generation_prompt=True)
            assert text.endswith("<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n")
            for proj in ("q_proj", "k_proj", "v_proj"):
                assert f"model.layers.0.self_attn.{proj}.bias" in names
            assert "model.layers.0.self_attn.o_proj.bias" not in names
        else:
            assert type(model.config).__name__ == "MixtralConfig"
            assert (model.config.num_local_experts, model.config.num_experts_per_tok) == (4, 1)
            assert not any(n.endswith(".bias") for n in names)
        assert model.lm_head.weight is not model.get_input_embeddings().weight
        # Seeded: a rebuild gives the same weights.
        again = tiny.build_tiny_model(family, tok)
        assert all(torch.equal(p, dict(again.named_parameters())[n]) for n, p in names.items())
    assert counts == {"qwen2": 205_632, "mixtral": 353_088}


@pytest.mark.parametrize("family", ["qwen2", "mixtral"])
def test_twins_plan_as_their_family(assets, family):
    """`launch plan --model <twin folder>` sizes them from their config.json: local, their family, exact counts."""
    from launch.plan.specs import load_spec

    spec = load_spec(str(assets.model_dir(family)))
    assert spec.source == "local" and spec.family == family
    assert spec.num_params == {"qwen2": 205_632, "mixtral": 353_088}[family]
    assert spec.qkv_bias == (family == "qwen2") and spec.num_experts == (4 if family == "mixtral" else 0)


@pytest.mark.parametrize("family", tiny.ALL_FAMILIES)
def test_model_loads_and_trains(assets, family):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = assets.model_dir(family)
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (folder / name).is_file(), name
    tok = AutoTokenizer.from_pretrained(folder)
    kw = {"attn_implementation": "eager"} if family == "gemma3" else {}
    model = AutoModelForCausalLM.from_pretrained(folder, **kw)
    expected = {"llama": "LlamaForCausalLM", "gemma3": "Gemma3ForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "mixtral": "MixtralForCausalLM"}[family]
    assert type(model).__name__ == expected
    cfg = model.config
    assert cfg.vocab_size == len(tok)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert model.dtype == torch.float32
    if family == "gemma3":
        assert cfg.tie_word_embeddings
        assert model.lm_head.weight is model.get_input_embeddings().weight
        assert "sliding_attention" in cfg.layer_types and "full_attention" in cfg.layer_types
    else:
        assert model.lm_head.weight is not model.get_input_embeddings().weight

    rows = read_jsonl(assets.test_file)[:4]
    batch = tok([r["chosen"] for r in rows] + [r["rejected"] for r in rows], padding=True,
                add_special_tokens=False, return_tensors="pt")
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    out = model(**batch, labels=labels)
    assert math.isfinite(out.loss.item()) and abs(out.loss.item() - math.log(len(tok))) < 1.0
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    gen = model.generate(**tok(["\n\nHuman: Hi?\n\nAssistant:"], return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert gen.shape[1] >= 1


def test_bench_configs_are_bench_sized(assets):
    import torch
    from transformers import AutoTokenizer, Gemma3ForCausalLM, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(assets.tokenizer_dir)
    for family, cls in (("llama", LlamaForCausalLM), ("gemma3", Gemma3ForCausalLM)):
        with torch.device("meta"):
            model = cls(tiny.tiny_config(family, tok, "bench"))
        assert 25e6 <= tiny.param_count(model) <= 40e6
        assert model.config.max_position_embeddings == 2048


# ---------------------------------------------------------------- cache

def test_weights_deterministic_and_rebuild_after_damage(assets):
    """Delete a file: the cheap check notices, the rebuild is bit-identical to the first build."""
    from safetensors.torch import load_file

    before = read_marker(assets.root)
    assert verify_cache(assets.root)
    weights = load_file(assets.gemma3_dir / "model.safetensors")
    (assets.llama_dir / "model.safetensors").unlink()
    assert not _is_complete(assets.root, TINY_VERSION)
    again = ensure_tiny_assets(assets.root.parent)
    assert again == assets
    after = read_marker(assets.root)
    assert after["content_sha256"] == before["content_sha256"]
    new = load_file(assets.gemma3_dir / "model.safetensors")
    assert weights.keys() == new.keys() and all((weights[k] == new[k]).all() for k in weights)
    assert verify_cache(assets.root)
    assert not list(assets.root.parent.glob(f".{TINY_VERSION}.tmp-*"))


_RACER = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    cache, me = Path(sys.argv[1]), sys.argv[2]
    import dpo_dist.tiny as tiny
    import transformers, tokenizers  # pay the import cost before the start line
    (cache.parent / f"ready-{me}").touch()
    while not (cache.parent / "go").exists():
        time.sleep(0.01)
    a = tiny.ensure_tiny_assets(cache)
    print(json.dumps(a.to_dict()))
""")


def test_concurrent_ranks_build_once(tmp_path, assets):
    cache = tmp_path / "cache"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(cache), str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        deadline = time.time() + 60
        while not all((tmp_path / f"ready-{i}").exists() for i in range(2)):
            assert time.time() < deadline and all(p.poll() is None for p in procs), "racers did not start"
            time.sleep(0.05)
        (tmp_path / "go").touch()
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    paths = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert paths[0] == paths[1] and paths[0]["root"] == str(cache / TINY_VERSION)
    builds = (cache / f".{TINY_VERSION}.builds.log").read_text().splitlines()
    assert len(builds) == 1, builds
    assert sorted(p.name for p in cache.iterdir()) == [f".{TINY_VERSION}.builds.log", f".{TINY_VERSION}.lock", TINY_VERSION]
    # built in another process, yet the same bytes as the in-process build: deterministic
    assert read_marker(cache / TINY_VERSION)["content_sha256"] == read_marker(assets.root)["content_sha256"]


def test_cli_prints_paths(assets):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "dpo_dist.tiny", "--cache_dir", str(assets.root.parent)],
                         env=env, capture_output=True, text=True, timeout=60, check=True).stdout
    paths = json.loads(out)["tiny"]
    assert paths["llama_dir"] == str(assets.llama_dir) and paths["gemma3_dir"] == str(assets.gemma3_dir)
    assert paths["data_orca_dir"] == str(assets.format_dir("orca"))
    assert paths["qwen2_dir"] == str(assets.model_dir("qwen2")) and paths["mixtral_dir"] == str(assets.model_dir("mixtral"))


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("DPO_DIST_CACHE", str(tmp_path / "c"))
    assert tiny.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("DPO_DIST_CACHE")
    assert tiny.default_cache_dir() == ROOT / ".cache" / "dpo-dist"
