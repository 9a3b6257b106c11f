"""DeepSpeed templates and generated configs, checked with DeepSpeed's and HF's own code."""

import copy
import dataclasses
import json
import os
import types

import pytest

from conftest import ROOT
from launch.dsconfig import TEMPLATE_DIR, build_ds_config, template_name, write_ds_config
from launch.plan import HARDWARE, PlanOptions, load_spec, make_plan

os.environ.setdefault("DS_ACCELERATOR", "cpu")

TEMPLATES = ("zero0.json", "zero1.json", "zero2.json", "zero3.json", "zero3_offload.json")
HF_AUTO = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping")
MODELS = [
    "google/gemma-3-270m", "google/gemma-3-1b-it", "google/gemma-3-4b-it", "google/gemma-3-12b-it",
    "google/gemma-3-27b-it", "meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-13b-hf", "meta-llama/Llama-2-70b-hf",
    "meta-llama/Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-70B",
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def golden_plans():
    """Every golden plan (LoRA and full, gaudi2/gaudi3, 1/8/16 cards) plus CPU and CUDA ones."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    out = []
    for model in MODELS:
        spec = load_spec(model)
        for hw in ("gaudi2", "gaudi3"):
            for cards in (1, 8, 16):
                for use_peft in (True, False):
                    out.append((spec, make_plan(spec, HARDWARE[hw], PlanOptions(cards=cards, use_peft=use_peft))))
    tiny = load_spec("google/gemma-3-270m")
    out.append((tiny, make_plan(tiny, HARDWARE["cpu"], PlanOptions(cards=2, card_memory_gib=64))))
    l8 = load_spec("meta-llama/Meta-Llama-3-8B")
    out.append((l8, make_plan(l8, HARDWARE["cuda"], PlanOptions(cards=8, use_peft=False))))
    return out


@pytest.fixture
def ds_config_class(monkeypatch):
    """DeepSpeed's config class, with the world size a process group would report."""
    dc = pytest.importorskip("deepspeed.runtime.config")

    def parse(cfg: dict, world_size: int):
        monkeypatch.setattr(dc.dist, "get_world_size", lambda *a, **k: world_size)
        monkeypatch.setattr(dc.dist, "get_rank", lambda *a, **k: 0)
        parsed = dc.DeepSpeedConfig(copy.deepcopy(cfg))
        assert parsed.world_size == world_size
        return parsed

    return parse


def _autos(node, prefix=""):
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _autos(v, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if node == "auto" else []


# --------------------------------------------------------------------------- #
# Templates
# --------------------------------------------------------------------------- #

def test_templates_exist_and_are_hf_ready():
    assert TEMPLATE_DIR == ROOT / "ds_configs"
    for name in TEMPLATES:
        cfg = json.loads((TEMPLATE_DIR / name).read_text())
        assert "optimizer" not in cfg and "scheduler" not in cfg, name  # the HF Trainer builds them
        for key in HF_AUTO:
            assert cfg[key] == "auto", (name, key)
        assert cfg["bf16"]["enabled"] == "auto" and cfg["fp16"]["enabled"] == "auto"
        zo = cfg["zero_optimization"]
        assert zo["stage"] == int(name[4]), name
        assert zo["reduce_bucket_size"] == "auto"
        if zo["stage"] == 3:
            assert zo["stage3_gather_16bit_weights_on_model_save"] is True
            assert zo["stage3_prefetch_bucket_size"] == "auto"
            assert zo["stage3_param_persistence_threshold"] == "auto"
            assert zo["overlap_comm"] and zo["contiguous_gradients"]
            assert {"stage3_max_live_parameters", "stage3_max_reuse_distance"} <= set(zo)
    off = json.loads((TEMPLATE_DIR / "zero3_offload.json").read_text())["zero_optimization"]
    assert off["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert off["offload_param"] == {"device": "cpu", "pin_memory": True}


def _hf_fill(template: dict, hidden_size: int, mb: int, ga: int, world_size: int, bf16: bool) -> dict:
    """Run HF's own "auto" substitution (what `Trainer(args=TrainingArguments(deepspeed=...))`
    does) with the TrainingArguments attributes it reads."""
    hf = pytest.importorskip("transformers.integrations.deepspeed")
    args = types.SimpleNamespace(
        world_size=world_size, per_device_train_batch_size=mb, gradient_accumulation_steps=ga, max_grad_norm=1.0,
        learning_rate=5e-7, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.0,
        fp16=False, fp16_full_eval=False, fp16_backend="auto", fp16_opt_level="O1", save_on_each_node=False,
        bf16=bf16, bf16_full_eval=False, get_warmup_steps=lambda n: 0,
    )
    model = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=hidden_size))
    try:
        cfg = hf.HfTrainerDeepSpeedConfig(copy.deepcopy(template))
        cfg.trainer_config_process(args)
        cfg.trainer_config_finalize(args, model, num_training_steps=100)
        return cfg.config
    finally:
        hf.unset_hf_deepspeed_config()  # HfDeepSpeedConfig sets a process-global weakref


@pytest.mark.parametrize("name", TEMPLATES)
def test_templates_parse_after_hf_fills_auto(name, ds_config_class):
    template = json.loads((TEMPLATE_DIR / name).read_text())
    filled = _hf_fill(template, hidden_size=4096, mb=2, ga=4, world_size=8, bf16=True)
    assert _autos(filled) == []
    parsed = ds_config_class(filled, world_size=8)
    assert parsed.train_batch_size == 64 and parsed.zero_optimization_stage == template["zero_optimization"]["stage"]
    assert parsed.bfloat16_config.enabled


@pytest.mark.parametrize("stage,offload", [(0, "none"), (1, "none"), (2, "optimizer"), (3, "none"),
                                           (3, "optimizer+params")])
def test_generated_config_equals_hf_filled_template(stage, offload):
    """build_ds_config fills the same values HF would (h², 0.9·h², 10·h, batch sizes)."""
    spec = load_spec("meta-llama/Meta-Llama-3-70B")
    plan = make_plan(spec, HARDWARE["gaudi2"], PlanOptions(cards=16, use_peft=False))
    plan = dataclasses.replace(plan, zero_stage=stage, offload=offload)
    ours = build_ds_config(plan, spec)
    hf = _hf_fill(json.loads((TEMPLATE_DIR / template_name(stage, offload)).read_text()), spec.hidden_size,
                  plan.micro_batch_size, plan.gradient_accumulation_steps, plan.world_size, True)
    if offload == "optimizer":  # stage 1/2 templates carry no offload block; the plan adds it
        hf["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    assert ours == hf


# --------------------------------------------------------------------------- #
# Generated configs
# --------------------------------------------------------------------------- #

def _device(offload_cfg) -> str:
    if offload_cfg is None:
        return "none"
    return str(getattr(offload_cfg.device, "value", offload_cfg.device))


def test_every_generated_config_parses_with_deepspeed(golden_plans, ds_config_class):
    seen = set()
    for spec, plan in golden_plans:
        cfg = build_ds_config(plan, spec)
        assert _autos(cfg) == [], plan
        parsed = ds_config_class(cfg, world_size=plan.world_size)
        assert parsed.zero_optimization_stage == plan.zero_stage
        assert parsed.train_micro_batch_size_per_gpu == plan.micro_batch_size
        assert parsed.gradient_accumulation_steps == plan.gradient_accumulation_steps
        assert parsed.train_batch_size == plan.micro_batch_size * plan.gradient_accumulation_steps * plan.world_size
        assert parsed.gradient_clipping == 1.0
        assert parsed.bfloat16_config.enabled == (plan.hardware != "cpu")
        zc = parsed.zero_config
        h = spec.hidden_size
        assert zc.reduce_bucket_size == h * h
        if plan.zero_stage == 3:
            assert zc.gather_16bit_weights_on_model_save is True
            assert zc.prefetch_bucket_size == int(0.9 * h * h)
            assert zc.param_persistence_threshold == 10 * h
        opt_dev = _device(zc.offload_optimizer)
        par_dev = _device(zc.offload_param)
        assert opt_dev == ("none" if plan.offload == "none" else "cpu"), plan.offload
        assert par_dev == ("cpu" if plan.offload == "optimizer+params" else "none"), plan.offload
        seen.add((plan.zero_stage, plan.offload))
    assert {(0, "none"), (1, "none"), (2, "none"), (3, "none"), (2, "optimizer"), (3, "optimizer"),
            (3, "optimizer+params")} <= seen  # every template path was exercised


def test_cpu_config_is_fp32(golden_plans):
    spec, plan = golden_plans[-2]
    assert plan.hardware == "cpu"
    cfg = build_ds_config(plan, spec)
    assert cfg["bf16"] == {"enabled": False} and cfg["fp16"] == {"enabled": False}


def test_cpu_bf16_is_deepspeeds_torch_autocast_over_fp32_weights(ds_config_class):
    """--bf16 true on CPU: fp32 weights (DeepSpeed's bf16 mode off), DeepSpeed's torch_autocast on; DeepSpeed's own
    config class reads it. Gaudi keeps bf16 weights and refuses fp32."""
    spec = load_spec("google/gemma-3-270m")
    plan = make_plan(spec, HARDWARE["cpu"], PlanOptions(cards=2, card_memory_gib=64, bf16=True))
    assert plan.bf16
    cfg = build_ds_config(plan, spec)
    assert cfg["bf16"] == {"enabled": False} and cfg["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    parsed = ds_config_class(cfg, world_size=2)
    assert parsed.torch_autocast_enabled and str(parsed.torch_autocast_dtype) == "torch.bfloat16"
    assert not parsed.bfloat16_config.enabled
    assert "torch_autocast" not in build_ds_config(make_plan(spec, HARDWARE["cpu"], PlanOptions(cards=2)), spec)
    gaudi = make_plan(spec, HARDWARE["gaudi2"], PlanOptions(cards=8))
    assert gaudi.bf16 and build_ds_config(gaudi, spec)["bf16"] == {"enabled": True}
    with pytest.raises(ValueError, match="only CPU ranks run bf16 as autocast"):
        make_plan(spec, HARDWARE["gaudi2"], PlanOptions(cards=8, bf16=False))


def test_build_does_not_mutate_templates(golden_plans):
    before = {n: (TEMPLATE_DIR / n).read_text() for n in TEMPLATES}
    spec, plan = golden_plans[0]
    cfg = build_ds_config(plan, spec)
    cfg["zero_optimization"]["stage"] = 99
    assert build_ds_config(plan, spec)["zero_optimization"]["stage"] == plan.zero_stage
    assert before == {n: (TEMPLATE_DIR / n).read_text() for n in TEMPLATES}


def test_write_ds_config_is_atomic(tmp_path, golden_plans):
    spec, plan = golden_plans[0]
    cfg = build_ds_config(plan, spec)
    path = tmp_path / "run" / "ds_config.json"
    assert write_ds_config(cfg, path) == path
    assert json.loads(path.read_text()) == cfg
    cfg2 = {**cfg, "steps_per_print": 10}
    write_ds_config(cfg2, path)  # replaces in place
    assert json.loads(path.read_text()) == cfg2
    with pytest.raises(TypeError):
        write_ds_config({"bad": object()}, path)  # not serialisable: the old file survives
    assert json.loads(path.read_text()) == cfg2
    assert [p.name for p in path.parent.iterdir()] == ["ds_config.json"]  # no temp files left
