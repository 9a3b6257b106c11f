"""The same schema mapping and chat template everywhere data is read: the DPO entry (a missing template stops
before any model loads, a bad row is named and nothing is written), SFT's chosen conversation, the planner's
token measurement, generation's --prompt, and the reference cache key."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import cpu_env, run_main
from dpo_dist.data.chat_templates import BUILTIN_TEMPLATES
from tests.support.chat_rows import assert_rows_match_template

SMALL = ["--device", "cpu", "--max_steps", "2", "--max_train_samples", "16", "--max_eval_samples", "8",
         "--max_length", "256", "--max_prompt_length", "128"]


def _no_template_copy(src: Path, dst: Path) -> Path:
    """The tiny model folder without a chat template (a base model's tokenizer)."""
    shutil.copytree(src, dst)
    (dst / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def _dpo(argv, monkeypatch):
    """The DPO entry in this process, with model loading turned into a test failure: these cases must stop first."""
    from dpo_dist.train import dpo

    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(dpo, "load_model", no_model)
    return run_main(dpo.main, [*SMALL, *argv], env=cpu_env())


def test_no_template_stops_before_any_model_loads(tmp_path, tiny_assets, monkeypatch):
    model = _no_template_copy(tiny_assets.llama_dir, tmp_path / "base-model")
    before, out = _snapshot(tmp_path), tmp_path / "out"
    res = _dpo(["--model_name_or_path", model, "--dataset_name", tiny_assets.format_dir("conversational"),
                "--output_dir", out], monkeypatch)
    assert res.returncode == 2, res.stdout[-3000:]
    line = next(x for x in res.stdout.splitlines() if "error:" in x)
    assert "is conversational" in line and "has no chat template" in line and "--chat_template" in line
    assert "a model was loaded" not in res.stdout and "Traceback" not in res.stdout
    assert not out.exists() and _snapshot(tmp_path) == before


def test_bad_row_through_the_entry_writes_nothing(tmp_path, tiny_assets, monkeypatch):
    rows = [json.loads(x) for x in (tiny_assets.format_dir("conversational") / "train.jsonl").read_text().splitlines()]
    rows = rows[:10]
    rows[6]["rejected"][0]["role"] = "human"
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before, out = _snapshot(tmp_path), tmp_path / "out"
    res = _dpo(["--model_name_or_path", tiny_assets.llama_dir, "--dataset_name", data, "--output_dir", out],
               monkeypatch)
    assert res.returncode == 1, res.stdout[-3000:]
    line = next(x for x in res.stdout.splitlines() if "error:" in x)
    assert f"--dataset_name {data}: split 'train' row 7: 'rejected', message 1 has the unknown role 'human'" in line
    assert not out.exists() and _snapshot(tmp_path) == before


@pytest.mark.parametrize(("flag", "value", "expected"), [
    ("--dataset_columns", "prompt=question,chosen=nope,rejected=response_k", "chosen=nope: that column is not in"),
    ("--dataset_columns", "prompt=question", "chosen and rejected missing"),
    ("--chat_template", "no-such-template", "--chat_template no-such-template: no such file or folder"),
])
def test_bad_flags_exit_2_before_any_model(tmp_path, tiny_assets, monkeypatch, flag, value, expected):
    out = tmp_path / "out"
    res = _dpo(["--model_name_or_path", tiny_assets.llama_dir, "--dataset_name",
                tiny_assets.format_dir("stack_exchange"), "--output_dir", out, flag, value], monkeypatch)
    assert res.returncode == 2 and expected in res.stdout, res.stdout[-3000:]
    assert not out.exists()


def test_dataset_columns_and_chat_template_load(tiny_assets):
    """--dataset_columns maps the stack-exchange columns by hand and --chat_template swaps the template: the rows
    are the overriding template's own tokens."""
    from dpo_dist.args import parse_args
    from dpo_dist.data.preference import load_preference_splits
    from dpo_dist.model.loader import load_tokenizer
    from dpo_dist.tiny import read_jsonl

    m, d, t = parse_args(["--model_name_or_path", str(tiny_assets.llama_dir), "--dataset_name",
                          str(tiny_assets.format_dir("stack_exchange")), "--chat_template", "gemma3",
                          "--dataset_columns", "prompt=question,chosen=response_j,rejected=response_k",
                          "--max_train_samples", "16"])
    tok = load_tokenizer(m)
    assert tok.chat_template == BUILTIN_TEMPLATES["gemma3"]
    train, held = load_preference_splits(d, t.seed, tok)
    for row, hh in zip(train, read_jsonl(tiny_assets.train_file)):
        assert_rows_match_template(row, hh, "stack_exchange", tok)
    assert train[0]["prompt"].startswith("<bos><start_of_turn>user\n")


def test_sft_trains_on_the_chosen_conversation(tiny_assets):
    """SFT's rows are the template's conversation (prompt + chosen answer), the loss on the answer only."""
    from transformers import AutoTokenizer

    from dpo_dist.data.conversation import conversation_to_text
    from dpo_dist.train.sft import sft_features

    tok = AutoTokenizer.from_pretrained(tiny_assets.gemma3_dir)
    msgs = [{"role": "user", "content": "Tips for tea?"}]
    row = conversation_to_text({"prompt": msgs, "chosen": "Steep it for three minutes.", "rejected": "No."}, 1, tok)
    f = sft_features(row, tok, 256)
    whole = tok.apply_chat_template([*msgs, {"role": "assistant", "content": "Steep it for three minutes."}])
    assert f["input_ids"] == whole + [tok.eos_token_id]
    n_prompt = len(tok.apply_chat_template(msgs, add_generation_prompt=True))
    assert f["labels"][:n_prompt] == [-100] * n_prompt and f["labels"][n_prompt:] == f["input_ids"][n_prompt:]


def test_planner_measures_the_templated_rows(tmp_path, tiny_assets):
    from launch.plan.datastats import measure_pair_tokens

    shape, note = measure_pair_tokens(str(tiny_assets.llama_dir), ["--dataset_name", str(tiny_assets.format_dir("orca"))],
                                      max_length=256, max_prompt_length=128)
    assert shape is not None and shape.train_pairs == 2000, note
    bare = _no_template_copy(tiny_assets.llama_dir, tmp_path / "base-model")
    shape, note = measure_pair_tokens(str(bare), ["--dataset_name", str(tiny_assets.format_dir("orca"))],
                                      max_length=256, max_prompt_length=128)
    assert shape is None and "--chat_template" in note
    shape, note = measure_pair_tokens(str(bare), ["--dataset_name", str(tiny_assets.format_dir("orca")),
                                                  "--chat_template", "llama3"], max_length=256, max_prompt_length=128)
    assert shape is not None, note


def test_generate_renders_the_prompt_with_the_template(tiny_assets):
    from dpo_dist.post.generate import main

    base = ["--model_name_or_path", tiny_assets.llama_dir, "--greedy", "--max_new_tokens", "2", "--device", "cpu"]
    res = run_main(main, [*base, "--prompt", "Hi?"], env=cpu_env())
    assert "prompt: '<bos><|start_header_id|>user<|end_header_id|>\\n\\nHi?<|eot_id|><|start_header_id|>assistant" \
           in res.stdout, res.stdout[-2000:]
    res = run_main(main, [*base, "--prompt", "Hi?", "--chat_template", "hh"], env=cpu_env())
    assert "prompt: '\\n\\nHuman: Hi?\\n\\nAssistant:'" in res.stdout, res.stdout[-2000:]
    res = run_main(main, [*base, "--prompt", "Hi?", "--raw_prompt"], env=cpu_env())
    assert "prompt: 'Hi?'" in res.stdout, res.stdout[-2000:]
    res = run_main(main, [*base, "--prompt", "Hi?", "--raw_prompt", "--hh_format"], env=cpu_env())
    assert res.returncode == 2 and "--raw_prompt passes the text as it is" in res.stdout


def test_reference_cache_key_holds_the_template(tiny_assets):
    from transformers import AutoTokenizer

    from dpo_dist.train.engine import EngineConfig
    from dpo_dist.train.refcache import trainer_settings

    tok = AutoTokenizer.from_pretrained(tiny_assets.llama_dir)
    trainer = SimpleNamespace(processing_class=tok, dpodist_engine=EngineConfig(256, 128, 128, 0))
    first = trainer_settings(trainer, bf16=False)
    tok.chat_template = BUILTIN_TEMPLATES["gemma3"]
    second = trainer_settings(trainer, bf16=False)
    assert first["chat_template"] and first != second


def test_preference_splits_of_ultrafeedback(caplog):
    """HuggingFaceH4/ultrafeedback_binarized keeps its pairs in train_prefs / test_prefs (beside _sft and _gen):
    taken when there is no train / test split, with a log line; a real train split wins."""
    import logging

    from dpo_dist.data.preference import _preference_split

    with caplog.at_level(logging.INFO, logger="dpo_dist.data.preference"):
        assert _preference_split({"train_prefs": 1, "train_sft": 2}, "train") == "train_prefs"
    assert "no 'train' split: using 'train_prefs'" in caplog.text
    assert _preference_split({"train": 1, "train_prefs": 2}, "train") == "train"
    assert _preference_split({"validation": 1}, "test") == "test"
