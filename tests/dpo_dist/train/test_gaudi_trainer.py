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
from functools import cache
from pathlib import Path

import pytest

from dpo_dist import args as A
from dpo_dist.train import gaudi_trainer as G
from dpo_dist.train.deepspeed import zero_stage_of
from dpo_dist.train.reference import resolve_reference
from launch.pins import GAUDI_REQUIREMENTS, exact_pins

OH_VERSION = exact_pins(GAUDI_REQUIREMENTS)["optimum-habana"]
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


@cache
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


@cache
def dpo_trainer_params() -> frozenset[str]:
    init = _method(_class(str(DPO_TRAINER_REL), "GaudiDPOTrainer"), "__init__")
    a = init.args
    # A **kwargs would make every keyword "valid": the check must see a closed signature.
    assert a.kwarg is None and a.vararg is None, "GaudiDPOTrainer.__init__ grew *args/**kwargs"
    return frozenset(x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg != "self")


@cache
def transformers_training_args_fields() -> frozenset[str]:
    import transformers

    major_minor = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    assert major_minor == (4, 55), (
        f"transformers {transformers.__version__}: optimum-habana {OH_VERSION} pins >=4.55,<4.56, "
        "so the inherited TrainingArguments fields are read from 4.55.x"
    )
    return frozenset(f.name for f in dataclasses.fields(transformers.TrainingArguments))


@cache
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


@cache
def gaudi_dpo_config_fields() -> frozenset[str]:
    cls = _class("trl/trainer/dpo_config.py", "GaudiDPOConfig")
    assert _base_names(cls) == ["GaudiTrainingArguments"]
    return frozenset(_own_fields(cls) | gaudi_training_args_fields())


@cache
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


def _ref(m, t) -> str:
    return resolve_reference(t.reference, m.use_peft, zero_stage_of(t.deepspeed))


COMBOS = {
    "lora-adapter-nods-bf16": dict(peft=True),
    "lora-separate-ref-zero2": dict(peft=True, stage=2, reference="replicated"),
    "lora-sharded-ref-zero3-gc": dict(peft=True, stage=3, reference="sharded", gc=True),
    "full-sharded-zero3-gc": dict(stage=3, gc=True),
    "full-replicated-nods-fp32": dict(bf16=False, eval_steps=50, max_steps=100, gaudi_config_name="Habana/llama"),
    "full-precomputed-nods": dict(reference="precomputed"),
    "full-precomputed-zero3-ipo": dict(reference="precomputed", stage=3, loss_type="ipo"),
    "full-replicated-zero0-apo": dict(stage=0, loss_type="apo_zero", max_steps=2),
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


@pytest.mark.parametrize("twin", [False, True])
def test_training_args_keywords_exist(combo, twin):
    name, (m, d, t) = combo
    kw = G.gaudi_training_args_kwargs(m, d, t, reference=_ref(m, t), twin=twin)
    assert unknown_keywords(kw, gaudi_dpo_config_fields()) == [], name


def test_dpo_keywords_exist_in_config_and_trainer(combo):
    name, (m, d, t) = combo
    kw = G.gaudi_trainer_kwargs(m, t, _ref(m, t))
    assert unknown_keywords(kw, dpo_trainer_params()) == [], name
    assert unknown_keywords(kw, gaudi_dpo_config_fields()) == [], name


def test_gaudi_config_keywords_exist(combo):
    name, (m, d, t) = combo
    assert unknown_keywords(G.gaudi_config_kwargs(t), gaudi_config_keys()) == [], name


def test_trainer_call_keywords_exist(combo):
    name, (m, d, t) = combo
    reference = _ref(m, t)
    ref = object() if reference in ("sharded", "replicated") else None
    kw = G.gaudi_trainer_call_kwargs(
        training_args=object(), gaudi_config=object(), model=object(), ref_model=ref, tokenizer=object(),
        train_dataset=object(), eval_dataset=object(), peft_config=object() if m.use_peft else None,
        callbacks=[object()], data_collator=object(), model_args=m, reference=reference,
    )
    assert unknown_keywords(kw, dpo_trainer_params()) == [], name
    assert "tokenizer" in kw and "processing_class" not in kw  # 0.9.6 style


def test_checker_detects_wrong_names(tmp_path):
    m, d, t = _args(tmp_path, stage=3)
    kw = dict(G.gaudi_training_args_kwargs(m, d, t, reference="sharded"))
    kw["evaluation_strategy"] = "steps"  # removed from transformers 4.55
    assert unknown_keywords(kw, gaudi_dpo_config_fields()) == ["evaluation_strategy"]
    gk = dict(G.gaudi_config_kwargs(t), use_fused_adamw=True)  # GaudiConfig would silently drop it
    assert unknown_keywords(gk, gaudi_config_keys()) == ["use_fused_adamw"]
    tk = dict(G.gaudi_trainer_kwargs(m, t, "sharded"), processing_class=object())  # not in GaudiDPOTrainer 1.21.2
    assert unknown_keywords(tk, dpo_trainer_params()) == ["processing_class"]


def test_real_signature_facts():
    assert {"beta", "loss_type", "tokenizer", "gaudi_config", "args", "max_length", "peft_config",
            "force_use_ref_model", "precompute_ref_log_probs", "data_collator"} <= dpo_trainer_params()
    assert "processing_class" not in dpo_trainer_params()
    fields = gaudi_dpo_config_fields()
    assert {"use_habana", "use_lazy_mode", "gaudi_config_name", "use_hpu_graphs_for_training",
            "use_hpu_graphs_for_inference", "distribution_strategy", "beta", "force_use_ref_model",
            "throughput_warmup_steps", "use_cpu"} <= fields
    assert "eval_strategy" in fields and "evaluation_strategy" not in fields
    assert {"use_fused_adam", "use_fused_clip_norm", "use_torch_autocast"} <= gaudi_config_keys()


def test_engine_seams_exist_upstream():
    """The seams the engine plugs into: GaudiDPOTrainer keeps trl's tokenize_row / get_batch_loss_metrics (it does
    not override them), calls self.tokenize_row over the datasets in __init__ and keeps the collator it is given."""
    cls = _class(str(DPO_TRAINER_REL), "GaudiDPOTrainer")
    own = {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}
    assert "get_batch_loss_metrics" not in own and "tokenize_row" not in own and "get_train_dataloader" not in own
    init = _method(cls, "__init__")
    assert "self.tokenize_row" in ast.unparse(init)
    # concatenated_forward upstream takes no is_ref_model: calling it with one is the crash the engine removes
    fwd = _method(cls, "concatenated_forward")
    assert [a.arg for a in fwd.args.args] == ["self", "model", "batch"]


# ------------------------------------------------------------------ values


def test_habana_flags_and_hpu_graphs(combo):
    name, (m, d, t) = combo
    kw = G.gaudi_training_args_kwargs(m, d, t, reference=_ref(m, t))
    assert kw["use_habana"] is True and kw["use_lazy_mode"] is True and "use_cpu" not in kw
    assert kw["remove_unused_columns"] is False and kw["precompute_ref_log_probs"] is False
    ds = zero_stage_of(t.deepspeed) >= 1
    # HPU graphs off: a replay would not run the hook through which the engine reads the hidden states
    assert kw["use_hpu_graphs_for_training"] is False and kw["use_hpu_graphs_for_inference"] is False, name
    assert kw["eval_strategy"] == ("steps" if t.eval_steps else "no")
    assert ("gaudi_config_name" in kw) == bool(t.gaudi_config_name)
    # A stage-0 config runs DDP (FusedAdamW and HPU graphs stay on), not DeepSpeed.
    assert ("deepspeed" in kw) == ds, name
    assert kw["bf16"] is t.bf16
    assert kw["loss_type"] == t.loss_type  # every loss: the engine computes it
    if t.max_steps > 0:
        assert kw["throughput_warmup_steps"] < t.max_steps


def test_twin_flags(combo):
    name, (m, d, t) = combo
    kw = G.gaudi_training_args_kwargs(m, d, t, reference=_ref(m, t), twin=True)
    assert kw["use_habana"] is False and kw["use_lazy_mode"] is False and kw["use_cpu"] is True
    # optimum-habana allows neither HPU graphs nor a gaudi_config_name without use_habana
    assert not kw["use_hpu_graphs_for_training"] and not kw["use_hpu_graphs_for_inference"]
    assert "gaudi_config_name" not in kw


def test_fused_adam_off_under_deepspeed(combo):
    name, (m, d, t) = combo
    gk = G.gaudi_config_kwargs(t)
    assert gk["use_fused_adam"] is (zero_stage_of(t.deepspeed) == 0), name
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


def test_reference_keywords(tmp_path):
    m, d, t = _args(tmp_path, peft=True, stage=3, reference="sharded")
    assert G.gaudi_trainer_kwargs(m, t, "sharded")["force_use_ref_model"] is True
    m, d, t = _args(tmp_path, peft=True)
    assert G.gaudi_trainer_kwargs(m, t, "adapter")["force_use_ref_model"] is False
    m, d, t = _args(tmp_path, reference="precomputed", stage=3)
    kw = G.gaudi_training_args_kwargs(m, d, t, reference="precomputed")
    assert kw["precompute_ref_log_probs"] is False and kw["force_use_ref_model"] is False


def test_reference_wiring_errors(tmp_path):
    def call(m, ref, peft, reference):
        return G.gaudi_trainer_call_kwargs(
            training_args=1, gaudi_config=1, model=1, ref_model=ref, tokenizer=1, train_dataset=1,
            eval_dataset=None, peft_config=peft, callbacks=None, data_collator=1, model_args=m, reference=reference)

    m, d, t = _args(tmp_path, peft=True, reference="replicated")
    with pytest.raises(ValueError, match="ref_model"):
        call(m, None, object(), "replicated")  # would silently become adapter-off
    m, d, t = _args(tmp_path, peft=True)
    with pytest.raises(ValueError, match="adapter"):
        call(m, object(), object(), "adapter")
    with pytest.raises(ValueError, match="peft_config"):
        call(m, None, None, "adapter")
    m, d, t = _args(tmp_path)
    with pytest.raises(ValueError, match="deep-copy"):
        call(m, None, None, "replicated")
    with pytest.raises(ValueError, match="cache"):
        call(m, object(), None, "precomputed")
    assert call(m, None, None, "precomputed")["ref_model"] is None


def test_module_imports_nothing_from_habana():
    tree = ast.parse(Path(G.__file__).read_text())
    for node in tree.body:  # module level only
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            assert not any(n.startswith(("optimum", "habana")) for n in names), ast.unparse(node)
    code = "import sys, dpo_dist.train.gaudi_trainer; print([m for m in sys.modules if m.startswith(('optimum','habana'))])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=str(Path(G.__file__).parents[2]))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_inherited_values_validate_in_real_training_arguments(combo, monkeypatch):
    """The values (not just the names) of the inherited fields pass transformers 4.55's own checks."""
    import transformers

    for var in ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(var, raising=False)
    name, (m, d, t) = combo
    kw = G.gaudi_training_args_kwargs(m, d, t, reference=_ref(m, t))
    inherited = {k: v for k, v in kw.items() if k in transformers_training_args_fields() and k != "deepspeed"}
    inherited["report_to"] = "none"  # integrations need not be installed here
    try:
        ta = transformers.TrainingArguments(**inherited, use_cpu=True)
        assert ta.eval_strategy == kw["eval_strategy"]
    finally:  # leave no accelerate singleton behind for other tests in this process
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
