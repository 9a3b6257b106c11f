"""The HPU trainer adapter's keywords exist in optimum-habana 1.21.2's real signatures.

Runs on CPU: the installed optimum-habana sources are read with `ast`, never imported
(`import optimum.habana` needs habana_frameworks). Install them with
`pip install --no-deps optimum-habana==1.21.2`.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.metadata
import importlib.util
import json
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

from dpo_dist import args as A
from dpo_dist import trainers_gaudi as G

OH_VERSION = "1.21.2"
DPO_TRAINER_REL = Path("trl/trainer/dpo_trainer.py")


# ------------------------------------------------------------------ locating and parsing sources


def _find_optimum_habana() -> Path | None:
    """optimum/habana on sys.path (or under the `optimum` namespace package), without importing it."""
    candidates = [Path(p or ".") / "optimum" / "habana" for p in sys.path]
    spec = importlib.util.find_spec("optimum")  # top-level only: imports nothing of optimum.habana
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / "habana" for p in spec.submodule_search_locations]
    for c in candidates:
        if (c / DPO_TRAINER_REL).is_file():
            return c
    return None


OH_ROOT = _find_optimum_habana()
pytestmark = pytest.mark.skipif(
    OH_ROOT is None,
    reason=f"optimum-habana sources not installed; run `pip install --no-deps optimum-habana=={OH_VERSION}`",
)


@lru_cache(maxsize=None)
def _tree(rel: str) -> ast.Module:
    return ast.parse((OH_ROOT / rel).read_text(), filename=str(OH_ROOT / rel))


def _class(rel: str, name: str) -> ast.ClassDef:
    for node in ast.walk(_tree(rel)):
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    raise AssertionError(f"class {name} not found in optimum/habana/{rel}")


def _method(cls: ast.ClassDef, name: str) -> ast.FunctionDef:
    for node in cls.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise AssertionError(f"{cls.name}.{name} not found")


def _base_names(cls: ast.ClassDef) -> list[str]:
    return [b.id if isinstance(b, ast.Name) else ast.unparse(b) for b in cls.bases]


def _own_fields(cls: ast.ClassDef) -> set[str]:
    return {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}


@lru_cache(maxsize=None)
def dpo_trainer_params() -> frozenset[str]:
    init = _method(_class(str(DPO_TRAINER_REL), "GaudiDPOTrainer"), "__init__")
    a = init.args
    # A **kwargs would make every keyword "valid": the check must see a closed signature.
    assert a.kwarg is None and a.vararg is None, "GaudiDPOTrainer.__init__ grew *args/**kwargs"
    return frozenset(x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg != "self")


@lru_cache(maxsize=None)
def transformers_training_args_fields() -> frozenset[str]:
    import transformers

    major_minor = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    assert major_minor == (4, 55), (
        f"transformers {transformers.__version__}: optimum-habana {OH_VERSION} pins >=4.55,<4.56, "
        "so the inherited TrainingArguments fields are read from 4.55.x"
    )
    return frozenset(f.name for f in dataclasses.fields(transformers.TrainingArguments))


@lru_cache(maxsize=None)
def gaudi_training_args_fields() -> frozenset[str]:
    cls = _class("transformers/training_args.py", "GaudiTrainingArguments")
    assert _base_names(cls) == ["TrainingArguments"]
    imported = {
        (n.module, a.name)
        for n in ast.walk(_tree("transformers/training_args.py"))
        if isinstance(n, ast.ImportFrom)
        for a in n.names
    }
    assert imported & {("transformers", "TrainingArguments"), ("transformers.training_args", "TrainingArguments")}
    return frozenset(_own_fields(cls) | transformers_training_args_fields())


@lru_cache(maxsize=None)
def gaudi_dpo_config_fields() -> frozenset[str]:
    cls = _class("trl/trainer/dpo_config.py", "GaudiDPOConfig")
    assert _base_names(cls) == ["GaudiTrainingArguments"]
    return frozenset(_own_fields(cls) | gaudi_training_args_fields())


@lru_cache(maxsize=None)
def gaudi_config_keys() -> frozenset[str]:
    """Keys GaudiConfig.__init__(**kwargs) pops; any other key is silently ignored by it."""
    init = _method(_class("transformers/gaudi_configuration.py", "GaudiConfig"), "__init__")
    keys = set()
    for n in ast.walk(init):
        if (
            isinstance(n, ast.Call)
            and isinstance(n.func, ast.Attribute)
            and n.func.attr == "pop"
            and isinstance(n.func.value, ast.Name)
            and n.func.value.id == "kwargs"
            and n.args
            and isinstance(n.args[0], ast.Constant)
        ):
            keys.add(n.args[0].value)
    assert keys, "no kwargs.pop(...) found in GaudiConfig.__init__"
    return frozenset(keys)


def dpo_config_loss_literal() -> set[str]:
    cls = _class("trl/trainer/dpo_config.py", "GaudiDPOConfig")
    for n in cls.body:
        if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and n.target.id == "loss_type":
            sl = n.annotation.slice
            elts = sl.elts if isinstance(sl, ast.Tuple) else [sl]
            return {e.value for e in elts}
    raise AssertionError("GaudiDPOConfig.loss_type not found")


def unknown_keywords(kwargs: dict, accepted) -> list[str]:
    """The checker: keywords that the real signature does not accept."""
    return sorted(set(kwargs) - set(accepted))


# ------------------------------------------------------------------ argument combinations


def _ds(tmp_path: Path, stage: int) -> str:
    p = tmp_path / f"zero{stage}.json"
    p.write_text(json.dumps({"zero_optimization": {"stage": stage}, "bf16": {"enabled": "auto"},
                             "train_micro_batch_size_per_gpu": "auto"}))
    return str(p)


def _args(tmp_path: Path, *, peft=False, stage=None, reference="auto", gc=False, bf16=True, **train):
    m = A.ModelArguments(model_name_or_path="some/model", use_peft=peft)
    d = A.DataArguments()
    t = A.TrainArguments(
        output_dir=str(tmp_path / "out"),
        deepspeed=_ds(tmp_path, stage) if stage is not None else None,
        reference=reference,
        gradient_checkpointing=gc,
        bf16=bf16,
        **train,
    )
    return m, d, t


COMBOS = {
    "lora-adapter-nods-bf16": dict(peft=True),
    "lora-separate-ref-zero2": dict(peft=True, stage=2, reference="replicated"),
    "lora-sharded-ref-zero3-gc": dict(peft=True, stage=3, reference="sharded", gc=True),
    "full-sharded-zero3-gc": dict(stage=3, gc=True),
    "full-replicated-nods-fp32": dict(bf16=False, eval_steps=50, max_steps=100, gaudi_config_name="Habana/llama"),
    "full-precomputed-nods": dict(reference="precomputed"),
    "full-precomputed-zero2-ipo": dict(reference="precomputed", stage=2, loss_type="ipo"),
    "lora-zero1-robust": dict(peft=True, stage=1, loss_type="robust", label_smoothing=0.1, report_to="tensorboard,wandb"),
}


@pytest.fixture(params=sorted(COMBOS))
def combo(request, tmp_path):
    return request.param, _args(tmp_path, **COMBOS[request.param])


# ------------------------------------------------------------------ keyword names vs real sources


def test_installed_version():
    assert importlib.metadata.version("optimum-habana") == OH_VERSION, (
        f"the adapter targets optimum-habana {OH_VERSION}: pip install --no-deps optimum-habana=={OH_VERSION}"
    )


def test_training_args_keywords_exist(combo):
    name, (m, d, t) = combo
    kw = G.gaudi_training_args_kwargs(m, d, t)
    assert unknown_keywords(kw, gaudi_dpo_config_fields()) == [], name


def test_dpo_keywords_exist_in_config_and_trainer(combo):
    name, (m, d, t) = combo
    kw = G.gaudi_trainer_kwargs(m, d, t)
    assert unknown_keywords(kw, dpo_trainer_params()) == [], name
    assert unknown_keywords(kw, gaudi_dpo_config_fields()) == [], name


def test_gaudi_config_keywords_exist(combo):
    name, (m, d, t) = combo
    assert unknown_keywords(G.gaudi_config_kwargs(t), gaudi_config_keys()) == [], name


def test_trainer_call_keywords_exist(combo):
    name, (m, d, t) = combo
    plan = G.gaudi_reference_plan(m, t)
    ref = object() if plan["needs_ref_model"] else None
    kw = G.gaudi_trainer_call_kwargs(
        training_args=object(), gaudi_config=object(), model=object(), ref_model=ref, tokenizer=object(),
        train_dataset=object(), eval_dataset=object(), peft_config=object() if m.use_peft else None,
        callbacks=[object()], model_args=m, data_args=d, train_args=t,
    )
    assert unknown_keywords(kw, dpo_trainer_params()) == [], name
    assert "tokenizer" in kw and "processing_class" not in kw  # 0.9.6 style


def test_checker_detects_wrong_names(tmp_path):
    m, d, t = _args(tmp_path, stage=3)
    kw = dict(G.gaudi_training_args_kwargs(m, d, t))
    kw["evaluation_strategy"] = "steps"  # removed from transformers 4.55
    assert unknown_keywords(kw, gaudi_dpo_config_fields()) == ["evaluation_strategy"]
    gk = dict(G.gaudi_config_kwargs(t), use_fused_adamw=True)  # GaudiConfig would silently drop it
    assert unknown_keywords(gk, gaudi_config_keys()) == ["use_fused_adamw"]
    tk = dict(G.gaudi_trainer_kwargs(m, d, t), processing_class=object())  # not in GaudiDPOTrainer 1.21.2
    assert unknown_keywords(tk, dpo_trainer_params()) == ["processing_class"]


def test_real_signature_facts():
    assert {"beta", "loss_type", "tokenizer", "gaudi_config", "args", "max_length", "peft_config",
            "force_use_ref_model", "precompute_ref_log_probs"} <= dpo_trainer_params()
    assert "processing_class" not in dpo_trainer_params()
    fields = gaudi_dpo_config_fields()
    assert {"use_habana", "use_lazy_mode", "gaudi_config_name", "use_hpu_graphs_for_training",
            "use_hpu_graphs_for_inference", "distribution_strategy", "beta", "force_use_ref_model"} <= fields
    assert "eval_strategy" in fields and "evaluation_strategy" not in fields
    assert {"use_fused_adam", "use_fused_clip_norm", "use_torch_autocast"} <= gaudi_config_keys()


def test_loss_types_match_real_config():
    assert set(G.LOSS_TYPES_GAUDI) == dpo_config_loss_literal()
    assert "kto_pair" not in G.LOSS_TYPES_GAUDI
    assert set(G.LOSS_TYPES_GAUDI) <= set(A.LOSS_TYPES)  # every HPU loss passes args.validate


# ------------------------------------------------------------------ values


def test_habana_flags_and_hpu_graphs(combo):
    name, (m, d, t) = combo
    kw = G.gaudi_training_args_kwargs(m, d, t)
    assert kw["use_habana"] is True and kw["use_lazy_mode"] is True
    assert kw["remove_unused_columns"] is False
    if t.deepspeed or t.gradient_checkpointing:
        assert kw["use_hpu_graphs_for_training"] is False, name
    else:
        assert kw["use_hpu_graphs_for_training"] is True, name
    assert kw["eval_strategy"] == ("steps" if t.eval_steps else "no")
    assert ("gaudi_config_name" in kw) == bool(t.gaudi_config_name)
    assert ("deepspeed" in kw) == bool(t.deepspeed)
    assert kw["bf16"] is t.bf16


def test_fused_adam_off_under_deepspeed(combo):
    name, (m, d, t) = combo
    gk = G.gaudi_config_kwargs(t)
    assert gk["use_fused_adam"] is (not t.deepspeed), name
    assert gk["use_fused_clip_norm"] is True
    assert gk["use_torch_autocast"] is t.bf16


def test_fused_adam_off_for_non_adamw_optim(tmp_path):
    *_, t = _args(tmp_path, optim="adafactor")
    assert G.gaudi_config_kwargs(t)["use_fused_adam"] is False


def test_low_cpu_mem_usage(tmp_path):
    import torch

    for stage, expected in ((None, True), (2, True), (3, False)):
        *_, t = _args(tmp_path, stage=stage)
        kw = G.model_load_kwargs_gaudi(t)
        assert kw["low_cpu_mem_usage"] is expected, stage
        assert kw["torch_dtype"] is torch.bfloat16
    *_, t = _args(tmp_path, bf16=False)
    assert "torch_dtype" not in G.model_load_kwargs_gaudi(t)


def test_reference_plans(tmp_path):
    plan = lambda **k: G.gaudi_reference_plan(*[_args(tmp_path, **k)[i] for i in (0, 2)])  # noqa: E731
    assert plan(peft=True) == {"strategy": "adapter", "needs_ref_model": False, "force_use_ref_model": False,
                               "precompute_ref_log_probs": False}
    p = plan(peft=True, stage=3, reference="sharded")
    assert p["needs_ref_model"] and p["force_use_ref_model"] and p["strategy"] == "sharded"
    assert plan(stage=3)["strategy"] == "sharded"
    p = plan()
    assert p["strategy"] == "replicated" and p["needs_ref_model"] and not p["force_use_ref_model"]
    assert plan(reference="sharded")["strategy"] == "replicated"  # no ZeRO-3: a full copy per card
    p = plan(reference="precomputed")
    assert p["precompute_ref_log_probs"] and not p["needs_ref_model"]
    kw = G.gaudi_training_args_kwargs(*_args(tmp_path, reference="precomputed"))
    assert kw["precompute_ref_log_probs"] is True and kw["force_use_ref_model"] is False


def test_precomputed_with_zero3_is_an_error(tmp_path):
    with pytest.raises(A.ArgumentError, match="--reference precomputed"):
        G.gaudi_training_args_kwargs(*_args(tmp_path, reference="precomputed", stage=3))


def test_unsupported_loss_is_an_error(tmp_path):
    for loss in ("kto_pair", "apo_zero", "nonsense"):
        m, d, t = _args(tmp_path, loss_type=loss)
        with pytest.raises(ValueError, match="--loss_type") as e:
            G.gaudi_training_args_kwargs(m, d, t)
        assert "sigmoid" in str(e.value) and "exo_pair" in str(e.value)
        with pytest.raises(ValueError, match="--loss_type"):
            G.gaudi_trainer_kwargs(m, d, t)


def test_reference_wiring_errors(tmp_path):
    def call(m, d, t, ref, peft):
        return G.gaudi_trainer_call_kwargs(
            training_args=1, gaudi_config=1, model=1, ref_model=ref, tokenizer=1, train_dataset=1,
            eval_dataset=None, peft_config=peft, callbacks=None, model_args=m, data_args=d, train_args=t)

    m, d, t = _args(tmp_path, peft=True, reference="replicated")
    with pytest.raises(ValueError, match="ref_model"):
        call(m, d, t, None, object())  # would silently become adapter-off
    m, d, t = _args(tmp_path, peft=True)
    with pytest.raises(ValueError, match="adapter"):
        call(m, d, t, object(), object())
    with pytest.raises(ValueError, match="peft_config"):
        call(m, d, t, None, None)
    m, d, t = _args(tmp_path, stage=3)
    with pytest.raises(ValueError, match="ZeRO-3"):
        call(m, d, t, None, None)
    m, d, t = _args(tmp_path)  # replicated full FT without DeepSpeed: trl deep-copies the policy
    assert call(m, d, t, None, None)["ref_model"] is None


def test_deepspeed_stage_sources(tmp_path):
    assert G.deepspeed_zero_stage(None) is None
    assert G.deepspeed_zero_stage({"zero_optimization": {"stage": 3}}) == 3
    assert G.deepspeed_zero_stage('{"train_batch_size": 8}') == 0
    assert G.deepspeed_zero_stage(_ds(tmp_path, 2)) == 2
    with pytest.raises(A.ArgumentError, match="--deepspeed"):
        G.deepspeed_zero_stage(str(tmp_path / "missing.json"))


def test_count_real_tokens():
    import torch

    batch = {
        "prompt_attention_mask": torch.tensor([[0, 1, 1], [1, 1, 1]]),  # left-padded, not counted
        "chosen_attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]),
        "rejected_attention_mask": torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]]),
        "chosen_input_ids": torch.zeros(2, 4, dtype=torch.long),
    }
    assert G.count_real_tokens_gaudi(batch) == 10
    assert G.count_real_tokens_gaudi({"chosen_attention_mask": [[1, 1], [1, 0]],
                                      "rejected_attention_mask": [[1, 1], [1, 1]]}) == 7
    with pytest.raises(KeyError, match="rejected_attention_mask"):
        G.count_real_tokens_gaudi({"chosen_attention_mask": [[1]]})


def test_module_imports_nothing_from_habana():
    tree = ast.parse(Path(G.__file__).read_text())
    for node in tree.body:  # module level only
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            assert not any(n.startswith(("optimum", "habana")) for n in names), ast.unparse(node)
    code = "import sys, dpo_dist.trainers_gaudi; print([m for m in sys.modules if m.startswith(('optimum','habana'))])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=str(Path(G.__file__).parents[1]))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_inherited_values_validate_in_real_training_arguments(combo, monkeypatch):
    """The values (not just the names) of the inherited fields pass transformers 4.55's own checks."""
    import transformers

    for var in ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(var, raising=False)
    name, (m, d, t) = combo
    kw = G.gaudi_training_args_kwargs(m, d, t)
    inherited = {k: v for k, v in kw.items() if k in transformers_training_args_fields() and k != "deepspeed"}
    inherited["report_to"] = "none"  # integrations need not be installed here
    try:
        ta = transformers.TrainingArguments(**inherited, use_cpu=True)
        assert ta.eval_strategy == kw["eval_strategy"]
    finally:  # leave no accelerate singleton behind for other tests in this process
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)


# ------------------------------------------------------------------ length buckets on HPU


def _upstream_concatenated_inputs():
    """GaudiDPOTrainer.concatenated_inputs compiled from optimum-habana 1.21.2's own source (the class
    cannot be imported without habana_frameworks), with trl's pad_to_length."""
    from typing import Dict, List, Optional, Union

    import torch
    from trl.trainer.utils import pad_to_length

    fn = next(n for n in _class(DPO_TRAINER_REL, "GaudiDPOTrainer").body
              if isinstance(n, ast.FunctionDef) and n.name == "concatenated_inputs")
    assert any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in fn.decorator_list)
    fn.decorator_list = []
    ns = {"torch": torch, "pad_to_length": pad_to_length, "Dict": Dict, "List": List, "Optional": Optional,
          "Union": Union}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(OH_ROOT / DPO_TRAINER_REL), "exec"), ns)
    return ns["concatenated_inputs"]


def test_gaudi_bucket_padding_overrides_the_max_length_pad():
    """The upstream call pads every row to max_length; GaudiBucketPadding pads to the batch's bucket.
    The upstream concatenated_forward passes padded_max_length=self.max_length (checked in its source)."""
    import torch

    from dpo_dist.trainers_gaudi import GaudiBucketPadding, gaudi_fed_tokens, gaudi_pad_lengths

    fwd = next(n for n in _class(DPO_TRAINER_REL, "GaudiDPOTrainer").body
               if isinstance(n, ast.FunctionDef) and n.name == "concatenated_forward")
    call = next(n for n in ast.walk(fwd) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "concatenated_inputs")
    assert {k.arg: ast.unparse(k.value) for k in call.keywords}["padded_max_length"] == "self.max_length"

    class Upstream:  # stands in for GaudiDPOTrainer: the real method, a staticmethod as upstream
        concatenated_inputs = staticmethod(_upstream_concatenated_inputs())
        max_length = 64

    class Bucketed(GaudiBucketPadding, Upstream):
        pass

    def batch(c, r, n=2):
        out = {}
        for key, w in (("chosen", c), ("rejected", r)):
            out[f"{key}_input_ids"] = torch.ones(n, w, dtype=torch.long)
            out[f"{key}_attention_mask"] = torch.ones(n, w, dtype=torch.long)
            out[f"{key}_labels"] = torch.ones(n, w, dtype=torch.long)
        return out

    kw = dict(label_pad_token_id=-100, padding_value=0, padded_max_length=64)
    t = Bucketed()
    assert t.concatenated_inputs(batch(10, 12), **kw)["concatenated_input_ids"].shape == (4, 64)  # upstream
    t.dpodist_pad_lengths = [16, 32, 64]
    out = t.concatenated_inputs(batch(10, 12), **kw)
    assert out["concatenated_input_ids"].shape == (4, 16)
    assert (out["concatenated_labels"][:, 12:] == -100).all() and (out["concatenated_attention_mask"][2:, 12:] == 0).all()
    assert t.concatenated_inputs(batch(20, 9), **kw)["concatenated_input_ids"].shape == (4, 32)
    assert gaudi_fed_tokens(t, batch(20, 9)) == 4 * 32
    t.dpodist_pad_lengths = None
    assert gaudi_fed_tokens(t, batch(20, 9)) == 4 * 64

    from datasets import Dataset

    ds = Dataset.from_dict({"chosen_input_ids": [[1] * n for n in (10, 30, 50, 12)],
                            "rejected_input_ids": [[1] * n for n in (8, 20, 64, 11)]})
    buckets, frac = gaudi_pad_lengths(ds, 3, 64)
    assert len(buckets) == 3 and buckets[-1] == 64 and frac < 0.2
