"""Memory model, estimator agreement, plan search and golden plans."""

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import replace

import pytest

from conftest import ROOT
from dpo_dist.args import ModelArguments
from dpo_dist.backend import BACKENDS, TWIN
from dpo_dist.model.loader import lora_config
from dpo_dist.model.lora import LORA_TARGETS, default_lora_targets
from launch.plan import (
    CALIBRATION_POINT,
    GIB,
    HARDWARE,
    PUBLISHED_DPO_BASELINES,
    PlanOptions,
    dpo_step_flops,
    estimate_memory,
    make_plan,
    mfu,
    model_state_bytes,
    plan_to_dict,
    step_time,
)
from launch.plan.report import render_plan_table
from launch.plan.specs import FAMILIES, SpecError, load_spec

MODELS = [
    "google/gemma-3-270m", "google/gemma-3-1b-it", "google/gemma-3-4b-it", "google/gemma-3-12b-it",
    "google/gemma-3-27b-it", "meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-13b-hf", "meta-llama/Llama-2-70b-hf",
    "meta-llama/Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-70B",
]
CARDS = (1, 8, 16)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def spec(name):
    os.environ["HF_HUB_OFFLINE"] = "1"
    return load_spec(name)


# --------------------------------------------------------------------------- #
# Calibration: the measured Gaudi2 point and the published throughput baselines
# --------------------------------------------------------------------------- #

def _calibration_options():
    cp = CALIBRATION_POINT
    return PlanOptions(cards=1, max_length=cp["max_length"], lora_r=cp["lora_r"],
                       lora_target_modules=cp["lora_target_modules"], fused_attention=cp["fused_attention"],
                       chunked_logps=cp["chunked_logps"], packing=cp["packing"])


def _calibration_memory(hw):
    cp = CALIBRATION_POINT
    return estimate_memory(spec(cp["model"]), hw, _calibration_options(), cp["zero_stage"], cp["offload"],
                           cp["micro_batch_size"], cp["gradient_checkpointing"], cp["reference"])


def test_hpu_overhead_reproduces_measured_point():
    """Llama-2-7B LoRA + separate bf16 reference, bs 1, max_length 1024 on one Gaudi2: 87 GiB measured."""
    hw = HARDWARE["gaudi2"]
    total = _calibration_memory(hw)["total"]
    assert total == pytest.approx(CALIBRATION_POINT["measured_gib"], rel=0.10)
    # ...and the formulas alone give about half of it (~50 GiB): the rest is the calibrated overhead.
    bare = _calibration_memory(replace(hw, overhead=0.0))["total"]
    assert 40 < bare < 55
    assert hw.overhead == pytest.approx(87 / bare - 1, abs=0.05)


@pytest.mark.parametrize("hw,samples_per_s", [("gaudi2", 13.5), ("gaudi3", 15.1)])
def test_speed_model_reproduces_published_dpo_baselines(hw, samples_per_s):
    """optimum-habana baselines: llama-7b LoRA r8, max_length 1024, bs 1, GA 4, 8 cards, DDP."""
    assert PUBLISHED_DPO_BASELINES[hw]["pairs_per_s"] == samples_per_s
    s = spec("meta-llama/Llama-2-7b-hf")
    opts = PlanOptions(cards=8, lora_r=8, lora_target_modules=("q_proj", "v_proj"), global_batch_size=32, packing=False)
    step = step_time(s, HARDWARE[hw], opts, 1, 0, "none", 1, False, "replicated", 4)
    assert 32 / step == pytest.approx(samples_per_s, rel=0.10)


# --------------------------------------------------------------------------- #
# Agreement with DeepSpeed's own estimators (GPU-side figure, per card)
# --------------------------------------------------------------------------- #

@pytest.fixture(scope="module")
def ds_estimators():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    z12 = pytest.importorskip("deepspeed.runtime.zero.stage_1_and_2")
    z3 = pytest.importorskip("deepspeed.runtime.zero.stage3")
    return z12, z3


def _nodes_gpus(n):
    nodes = max(1, n // 8)
    return nodes, n // nodes


@pytest.mark.parametrize("model", ["meta-llama/Llama-2-7b-hf", "meta-llama/Meta-Llama-3-8B",
                                   "meta-llama/Meta-Llama-3-70B", "google/gemma-3-1b-it", "google/gemma-3-27b-it"])
@pytest.mark.parametrize("n", [1, 2, 8, 16, 64])
def test_model_states_agree_with_deepspeed_estimators(ds_estimators, model, n):
    z12, z3 = ds_estimators
    s = spec(model)
    nodes, gpus = _nodes_gpus(n)
    cases = [
        (2, "none", z12.estimate_zero2_model_states_mem_needs(s.num_params, gpus, nodes, cpu_offload=False)[1]),
        (2, "optimizer", z12.estimate_zero2_model_states_mem_needs(s.num_params, gpus, nodes, cpu_offload=True)[1]),
    ]
    for offload, (opt, par) in {"none": (False, False), "optimizer": (True, False),
                                "optimizer+params": (True, True)}.items():
        gpu = z3.estimate_zero3_model_states_mem_needs(s.num_params, s.largest_layer_params, gpus, nodes,
                                                       cpu_offload=opt, cpu_offload_params=par)[1]
        cases.append((3, offload, gpu))
    for stage, offload, ds_gpu in cases:
        ours = model_state_bytes(s, stage, n, offload)
        assert ours == pytest.approx(ds_gpu, rel=0.05), (stage, offload)


def test_all_cold_printout_is_the_same_figure(ds_estimators, capsys):
    """The *_all_cold functions print the figures compared above (GiB, 2 decimals)."""
    z12, z3 = ds_estimators
    s = spec("meta-llama/Meta-Llama-3-70B")
    z3.estimate_zero3_model_states_mem_needs_all_cold(s.num_params, s.largest_layer_params, 8, 1)
    z12.estimate_zero2_model_states_mem_needs_all_cold(s.num_params, 8, 1)
    out = capsys.readouterr().out
    rows = re.findall(r"([\d.]+)GB \|\s+([\d.]+)GB \| (.*)", out)
    gpu = {re.sub(r"OffloadDeviceEnum\.|\s", "", opts): float(g) for _, g, opts in rows}
    assert gpu["offload_param=none,offload_optimizer=none,zero_init=1"] == pytest.approx(
        model_state_bytes(s, 3, 8) / GIB, abs=0.01)
    assert gpu["offload_param=cpu,offload_optimizer=cpu,zero_init=1"] == pytest.approx(
        model_state_bytes(s, 3, 8, "optimizer+params") / GIB, abs=0.01)
    assert gpu["offload_param=none,offload_optimizer=cpu,zero_init=1"] == pytest.approx(
        model_state_bytes(s, 3, 8, "optimizer") / GIB, abs=0.01)
    assert gpu["offload_optimizer=none"] == pytest.approx(model_state_bytes(s, 2, 8) / GIB, abs=0.01)
    assert gpu["offload_optimizer=cpu"] == pytest.approx(model_state_bytes(s, 2, 8, "optimizer") / GIB, abs=0.01)


def test_lora_model_states():
    s = spec("meta-llama/Meta-Llama-3-70B")
    lora = s.lora_params(16, ("q_proj", "k_proj", "v_proj", "o_proj"))
    frozen = 2 * s.num_params
    for stage in (0, 1, 2):
        got = model_state_bytes(s, stage, 8, use_peft=True, lora_params=lora)
        assert frozen < got < frozen + 20 * lora + 1  # only the adapter carries grads and optimizer state
    z3 = model_state_bytes(s, 3, 8, use_peft=True, lora_params=lora)
    assert z3 == pytest.approx(frozen / 8 + 4 * s.largest_layer_params, rel=0.01)
    assert model_state_bytes(s, 3, 8, "optimizer+params", use_peft=True, lora_params=lora) < z3 / 4


def test_invalid_stage_offload_combinations():
    s = spec("google/gemma-3-270m")
    with pytest.raises(ValueError, match="stage >= 1"):
        model_state_bytes(s, 0, 8, "optimizer")
    with pytest.raises(ValueError, match="stage 3"):
        model_state_bytes(s, 2, 8, "optimizer+params")
    with pytest.raises(ValueError):
        model_state_bytes(s, 4, 8)


# --------------------------------------------------------------------------- #
# Memory terms behave physically
# --------------------------------------------------------------------------- #

def _mem(name="meta-llama/Meta-Llama-3-8B", hw="gaudi2", stage=0, offload="none", mb=1, gc=False,
         ref="adapter", **opts):
    """The formulas without the engine (full logits, unpacked rows) unless the options turn it on."""
    opts = {"chunked_logps": False, "packing": False, **opts}
    return estimate_memory(spec(name), HARDWARE[hw], PlanOptions(**opts), stage, offload, mb, gc, ref)


def test_breakdown_sums_to_total():
    m = _mem(stage=3, ref="adapter", cards=8, mb=2)
    parts = sum(v for k, v in m.items() if k != "total")
    assert m["total"] == pytest.approx(parts)
    assert set(m) == {"params", "grads", "optimizer", "reference", "activations", "logits", "buffers",
                      "overhead", "total"}


def test_memory_terms():
    base = _mem(mb=2)
    assert _mem(mb=2, gc=True)["activations"] < base["activations"] / 5  # recompute keeps ~2sbh per layer
    assert _mem(mb=4)["activations"] == pytest.approx(2 * base["activations"])
    assert _mem(mb=4)["logits"] == pytest.approx(2 * base["logits"])
    assert _mem(mb=2, fused_attention=False)["activations"] > base["activations"]
    assert _mem(mb=2, ref="precomputed")["logits"] < base["logits"]  # no in-loop reference logits
    full = dict(use_peft=False, cards=8)
    replicated = _mem(ref="replicated", **full)["reference"]
    assert replicated == pytest.approx(2 * spec("meta-llama/Meta-Llama-3-8B").num_params / GIB)
    assert _mem(stage=3, ref="sharded", **full)["reference"] == pytest.approx(replicated / 8)
    assert _mem(stage=3, ref="sharded", offload="optimizer+params", **full)["reference"] == 0
    assert _mem(stage=2, offload="optimizer", ref="replicated", **full)["optimizer"] == 0
    # logits: 2 sequences x s x V elements at 10 bytes (bf16 out, fp32 cast, fp32 log-softmax) + 6 for the reference
    s = spec("meta-llama/Meta-Llama-3-8B")
    assert base["logits"] == pytest.approx(2 * 2 * 1024 * s.vocab_size * 16 / GIB)


def test_gemma_logits_dominate_small_models():
    m = _mem("google/gemma-3-270m", mb=4)
    assert m["logits"] > m["params"] + m["activations"]
    # The engine's chunked log-probs keep one chunk's logits instead (on Gaudi too).
    assert _mem("google/gemma-3-270m", mb=4, chunked_logps=True)["logits"] < m["logits"] / 10


def test_gaudi_packing_counts_the_block_mask():
    """Packed rows on Gaudi attend through a T x T block-diagonal mask: its bytes grow with T^2, and the attention
    FLOPs span the whole packed row (the speed model ranks it below varlen packing)."""
    s = spec("meta-llama/Meta-Llama-3-8B")
    # The same card on CUDA's backend row: varlen packing (fused attention and the rest as on Gaudi).
    gaudi, varlen = HARDWARE["gaudi2"], replace(HARDWARE["gaudi2"], device="cuda")
    assert gaudi.backend.packing_attention == "block_mask" and varlen.backend.packing_attention == "varlen"
    opts = PlanOptions(cards=8, max_length=2048, max_prompt_length=512, packing=True)
    a = estimate_memory(s, gaudi, opts, 0, "none", 2, False, "adapter")["activations"]
    b = estimate_memory(s, varlen, opts, 0, "none", 2, False, "adapter")["activations"]
    t = 2 * 2 * 2048
    assert (a - b) * GIB == pytest.approx(2 * t * t * 2)
    assert step_time(s, gaudi, opts, 1, 0, "none", 2, False, "adapter", 4) > step_time(
        s, varlen, opts, 1, 0, "none", 2, False, "adapter", 4)


def test_cpu_is_fp32_without_offload():
    s = spec("google/gemma-3-270m")
    cpu = HARDWARE["cpu"]
    assert not cpu.bf16 and not cpu.offload_supported
    full = estimate_memory(s, replace(cpu, overhead=0), PlanOptions(use_peft=False), 0, "none", 1, False, "replicated")
    assert full["params"] + full["grads"] + full["optimizer"] == pytest.approx(16 * s.num_params / GIB)
    plan = make_plan(s, cpu, PlanOptions(cards=2, card_memory_gib=64))
    assert plan.fits and plan.offload == "none"


def test_hardware_reads_the_ranks_backend_table():
    """What the ranks do on a device is one row of dpo_dist.backend, for the planner and the ranks alike."""
    for name, hw in HARDWARE.items():
        assert hw.backend is BACKENDS[hw.device], name
    gaudi, cuda, cpu = HARDWARE["gaudi2"].backend, HARDWARE["cuda"].backend, HARDWARE["cpu"].backend
    assert HARDWARE["gaudi3"].backend is gaudi
    assert gaudi.static_shapes and gaudi.packing_attention == "block_mask" and gaudi.ddp_without_deepspeed
    assert gaudi.fused_sdpa and cuda.fused_sdpa and not cpu.fused_sdpa
    assert not (cuda.static_shapes or cpu.static_shapes or cuda.ddp_without_deepspeed or cpu.ddp_without_deepspeed)
    # The twin runs the HPU path on CPU: the same engine and trainer facts as the hpu row.
    for field in ("static_shapes", "packing_attention", "fused_sdpa", "ddp_without_deepspeed", "trainer_api"):
        assert getattr(TWIN, field) == getattr(BACKENDS["hpu"], field), field
    with pytest.raises(ValueError, match="device"):
        replace(HARDWARE["cuda"], device="tpu")


# --------------------------------------------------------------------------- #
# FLOPs
# --------------------------------------------------------------------------- #

def test_dpo_step_flops():
    s = spec("meta-llama/Meta-Llama-3-8B")
    n = s.text_params - s.vocab_size * s.hidden_size  # matmul parameters (embedding lookup excluded)
    T = 1000
    assert dpo_step_flops(s, T, use_peft=False, reference="sharded") == pytest.approx(8 * n * T)
    assert dpo_step_flops(s, T, use_peft=True, reference="adapter") == pytest.approx(6 * n * T)
    assert dpo_step_flops(s, T, use_peft=False, reference="precomputed") == pytest.approx(6 * n * T)
    assert dpo_step_flops(s, T, use_peft=True, reference="precomputed") == pytest.approx(4 * n * T)
    attn = dpo_step_flops(s, T, False, "sharded", seq_len=1024) - dpo_step_flops(s, T, False, "sharded")
    assert attn == pytest.approx(16 * s.num_hidden_layers * s.q_dim * 1024 * T)
    per_card = 1e4
    assert mfu(s, per_card, HARDWARE["gaudi2"], True, "adapter") == pytest.approx(6 * n * per_card / 432e12)
    with pytest.raises(ValueError):
        dpo_step_flops(s, T, True, "nonsense")


# --------------------------------------------------------------------------- #
# Required behaviours
# --------------------------------------------------------------------------- #

def test_llama3_70b_lora_on_8_gaudi2_fits_under_zero3():
    p = make_plan(spec("meta-llama/Llama-3-70B"), HARDWARE["gaudi2"], PlanOptions(cards=8, use_peft=True))
    assert p.fits and p.zero_stage == 3 and p.use_peft
    assert p.memory_gib.total <= 94.6 * 0.9
    assert p.reference in ("adapter", "precomputed")


def test_llama3_70b_full_on_8_gaudi2_needs_offload_or_more_nodes():
    s = spec("meta-llama/Llama-3-70B")
    p = make_plan(s, HARDWARE["gaudi2"], PlanOptions(cards=8, use_peft=False))
    if p.fits:
        assert p.offload != "none"
    else:
        assert p.suggestion is not None and p.suggestion.nodes >= 2
        assert f"{p.suggestion.nodes} nodes" in p.suggestion.text
    # Without offload it cannot fit on one node, and the suggestion names the node count.
    q = make_plan(s, HARDWARE["gaudi2"], PlanOptions(cards=8, use_peft=False, allow_offload=False))
    assert not q.fits and q.suggestion.nodes >= 2 and q.suggestion.cards == 8 * q.suggestion.nodes
    check = make_plan(s, HARDWARE["gaudi2"], PlanOptions(cards=q.suggestion.cards, use_peft=False, allow_offload=False))
    assert check.fits  # the suggestion is true...
    smaller = make_plan(s, HARDWARE["gaudi2"],
                        PlanOptions(cards=q.suggestion.cards - 8, use_peft=False, allow_offload=False))
    assert not smaller.fits  # ...and the smallest


def test_offload_suggested_when_disallowed_but_enough():
    s = spec("meta-llama/Meta-Llama-3-8B")
    p = make_plan(s, HARDWARE["gaudi2"], PlanOptions(cards=1, use_peft=False, allow_offload=False))
    assert not p.fits
    assert p.suggestion.offload in ("optimizer", "optimizer+params") and p.suggestion.cards == 1


def test_gemma3_270m_one_card_fits_without_zero3():
    p = make_plan(spec("google/gemma-3-270m"), HARDWARE["gaudi2"], PlanOptions(cards=1))
    assert p.fits and p.zero_stage < 3 and p.offload == "none"


def test_nothing_fits_says_why():
    p = make_plan(spec("google/gemma-3-27b-it"), HARDWARE["gaudi2"],
                  PlanOptions(cards=8, max_length=131072, max_prompt_length=512))
    assert not p.fits and p.suggestion.cards is None and "max_length" in p.suggestion.text


def test_host_ram_bounds_offload():
    s = spec("meta-llama/Meta-Llama-3-70B")
    small = make_plan(s, HARDWARE["gaudi2"], PlanOptions(cards=8, use_peft=False, host_memory_gib=256))
    big = make_plan(s, HARDWARE["gaudi2"], PlanOptions(cards=8, use_peft=False, host_memory_gib=8192))
    assert not small.fits and "host RAM" in small.suggestion.text
    assert big.fits and big.offload != "none"


# --------------------------------------------------------------------------- #
# Golden plans: (model, hardware) -> {cards: (fits, zero_stage, offload, reference)}
# --------------------------------------------------------------------------- #

_Z0 = (True, 0, "none", "adapter")
GOLDEN_LORA = {
    ('google/gemma-3-270m', 'gaudi2'): {1: _Z0, 8: _Z0, 16: _Z0},
    ('google/gemma-3-270m', 'gaudi3'): {1: _Z0, 8: _Z0, 16: _Z0},
    ('google/gemma-3-1b-it', 'gaudi2'): {1: _Z0, 8: _Z0, 16: _Z0},
    ('google/gemma-3-1b-it', 'gaudi3'): {1: _Z0, 8: _Z0, 16: _Z0},
    ('google/gemma-3-4b-it', 'gaudi2'): {1: _Z0, 8: _Z0, 16: _Z0},
    ('google/gemma-3-4b-it', 'gaudi3'): {1: _Z0, 8: _Z0, 16: _Z0},
    ('google/gemma-3-12b-it', 'gaudi2'): {1: _Z0, 8: (True, 3, 'none', 'adapter'), 16: _Z0},
    ('google/gemma-3-12b-it', 'gaudi3'): {1: _Z0, 8: _Z0, 16: _Z0},
    ('google/gemma-3-27b-it', 'gaudi2'): {1: (True, 3, 'optimizer+params', 'adapter'), 8: (True, 3, 'none', 'adapter'), 16: (True, 3, 'none', 'adapter')},
    ('google/gemma-3-27b-it', 'gaudi3'): {1: _Z0, 8: _Z0, 16: _Z0},
    ('meta-llama/Llama-2-7b-hf', 'gaudi2'): {1: _Z0, 8: _Z0, 16: _Z0},
    ('meta-llama/Llama-2-7b-hf', 'gaudi3'): {1: _Z0, 8: _Z0, 16: _Z0},
    ('meta-llama/Llama-2-13b-hf', 'gaudi2'): {1: _Z0, 8: (True, 3, 'none', 'adapter'), 16: _Z0},
    ('meta-llama/Llama-2-13b-hf', 'gaudi3'): {1: _Z0, 8: _Z0, 16: _Z0},
    ('meta-llama/Llama-2-70b-hf', 'gaudi2'): {1: (True, 3, 'optimizer+params', 'adapter'), 8: (True, 3, 'none', 'adapter'), 16: (True, 3, 'none', 'adapter')},
    ('meta-llama/Llama-2-70b-hf', 'gaudi3'): {1: (True, 3, 'optimizer+params', 'adapter'), 8: (True, 3, 'none', 'adapter'), 16: (True, 3, 'none', 'adapter')},
    ('meta-llama/Meta-Llama-3-8B', 'gaudi2'): {1: _Z0, 8: _Z0, 16: _Z0},
    ('meta-llama/Meta-Llama-3-8B', 'gaudi3'): {1: _Z0, 8: _Z0, 16: _Z0},
    ('meta-llama/Meta-Llama-3-70B', 'gaudi2'): {1: (True, 3, 'optimizer+params', 'adapter'), 8: (True, 3, 'none', 'adapter'), 16: (True, 3, 'none', 'adapter')},
    ('meta-llama/Meta-Llama-3-70B', 'gaudi3'): {1: (True, 3, 'optimizer+params', 'adapter'), 8: (True, 3, 'none', 'adapter'), 16: (True, 3, 'none', 'adapter')},
}
_NO = (False, 3, "none", "precomputed")  # full 70B on 1 or 8 cards: leanest (non-fitting) plan shown
GOLDEN_FULL = {
    ('google/gemma-3-270m', 'gaudi2'): {1: (True, 0, 'none', 'precomputed'), 8: (True, 0, 'none', 'precomputed'), 16: (True, 0, 'none', 'precomputed')},
    ('google/gemma-3-270m', 'gaudi3'): {1: (True, 0, 'none', 'precomputed'), 8: (True, 0, 'none', 'precomputed'), 16: (True, 0, 'none', 'precomputed')},
    ('google/gemma-3-1b-it', 'gaudi2'): {1: (True, 0, 'none', 'precomputed'), 8: (True, 0, 'none', 'precomputed'), 16: (True, 0, 'none', 'precomputed')},
    ('google/gemma-3-1b-it', 'gaudi3'): {1: (True, 0, 'none', 'precomputed'), 8: (True, 0, 'none', 'precomputed'), 16: (True, 0, 'none', 'precomputed')},
    ('google/gemma-3-4b-it', 'gaudi2'): {1: (True, 1, 'optimizer', 'precomputed'), 8: (True, 2, 'none', 'precomputed'), 16: (True, 1, 'none', 'precomputed')},
    ('google/gemma-3-4b-it', 'gaudi3'): {1: (True, 1, 'optimizer', 'precomputed'), 8: (True, 1, 'none', 'precomputed'), 16: (True, 1, 'none', 'precomputed')},
    ('google/gemma-3-12b-it', 'gaudi2'): {1: (True, 2, 'optimizer', 'precomputed'), 8: (True, 3, 'none', 'precomputed'), 16: (True, 2, 'none', 'precomputed')},
    ('google/gemma-3-12b-it', 'gaudi3'): {1: (True, 2, 'optimizer', 'precomputed'), 8: (True, 3, 'none', 'precomputed'), 16: (True, 2, 'none', 'precomputed')},
    ('google/gemma-3-27b-it', 'gaudi2'): {1: (True, 3, 'optimizer+params', 'precomputed'), 8: (True, 3, 'optimizer', 'precomputed'), 16: (True, 3, 'none', 'precomputed')},
    ('google/gemma-3-27b-it', 'gaudi3'): {1: (True, 2, 'optimizer', 'precomputed'), 8: (True, 3, 'optimizer', 'precomputed'), 16: (True, 3, 'none', 'precomputed')},
    ('meta-llama/Llama-2-7b-hf', 'gaudi2'): {1: (True, 2, 'optimizer', 'precomputed'), 8: (True, 2, 'none', 'precomputed'), 16: (True, 1, 'none', 'precomputed')},
    ('meta-llama/Llama-2-7b-hf', 'gaudi3'): {1: (True, 1, 'optimizer', 'precomputed'), 8: (True, 1, 'none', 'precomputed'), 16: (True, 1, 'none', 'precomputed')},
    ('meta-llama/Llama-2-13b-hf', 'gaudi2'): {1: (True, 2, 'optimizer', 'precomputed'), 8: (True, 2, 'optimizer', 'precomputed'), 16: (True, 2, 'none', 'precomputed')},
    ('meta-llama/Llama-2-13b-hf', 'gaudi3'): {1: (True, 2, 'optimizer', 'precomputed'), 8: (True, 3, 'none', 'precomputed'), 16: (True, 2, 'none', 'precomputed')},
    ('meta-llama/Llama-2-70b-hf', 'gaudi2'): {1: (False, 3, 'none', 'precomputed'), 8: (False, 3, 'none', 'precomputed'), 16: (True, 3, 'optimizer', 'precomputed')},
    ('meta-llama/Llama-2-70b-hf', 'gaudi3'): {1: (False, 3, 'none', 'precomputed'), 8: (False, 3, 'none', 'precomputed'), 16: (True, 3, 'optimizer', 'precomputed')},
    ('meta-llama/Meta-Llama-3-8B', 'gaudi2'): {1: (True, 2, 'optimizer', 'precomputed'), 8: (True, 2, 'none', 'precomputed'), 16: (True, 2, 'none', 'precomputed')},
    ('meta-llama/Meta-Llama-3-8B', 'gaudi3'): {1: (True, 1, 'optimizer', 'precomputed'), 8: (True, 2, 'none', 'precomputed'), 16: (True, 2, 'none', 'precomputed')},
    ('meta-llama/Meta-Llama-3-70B', 'gaudi2'): {1: (False, 3, 'none', 'precomputed'), 8: (False, 3, 'none', 'precomputed'), 16: (True, 3, 'optimizer', 'precomputed')},
    ('meta-llama/Meta-Llama-3-70B', 'gaudi3'): {1: (False, 3, 'none', 'precomputed'), 8: (False, 3, 'none', 'precomputed'), 16: (True, 3, 'optimizer', 'precomputed')},
}


def all_golden_plans():
    """(use_peft, model, hw, cards, plan) for every golden entry (used by test_dsconfig too)."""
    out = []
    for use_peft, table in ((True, GOLDEN_LORA), (False, GOLDEN_FULL)):
        for (model, hw), by_cards in table.items():
            for cards in by_cards:
                plan = make_plan(spec(model), HARDWARE[hw], PlanOptions(cards=cards, use_peft=use_peft))
                out.append((use_peft, model, hw, cards, plan))
    return out


@pytest.fixture(scope="module")
def golden():
    return all_golden_plans()


def test_golden_tables_cover_every_supported_model():
    for table in (GOLDEN_LORA, GOLDEN_FULL):
        assert set(table) == {(m, hw) for m in MODELS for hw in ("gaudi2", "gaudi3")}
        assert all(set(v) == set(CARDS) for v in table.values())


def test_golden_plans(golden):
    for use_peft, model, hw, cards, p in golden:
        table = GOLDEN_LORA if use_peft else GOLDEN_FULL
        got = (p.fits, p.zero_stage, p.offload, p.reference)
        assert got == table[(model, hw)][cards], (model, hw, cards, use_peft, got)


def test_golden_plans_are_physically_sane(golden):
    for use_peft, model, hw, cards, p in golden:
        label = (model, hw, cards, use_peft)
        opts = PlanOptions(cards=cards, use_peft=use_peft)
        budget = HARDWARE[hw].card_memory_gib * opts.safety_margin
        assert (p.memory_gib.total <= budget) == p.fits, label
        assert p.gradient_accumulation_steps == math.ceil(64 / (p.micro_batch_size * cards)), label
        assert p.world_size == cards and p.nodes == math.ceil(cards / 8) and p.cards_per_node * p.nodes == cards
        if use_peft:
            assert p.reference in ("adapter", "precomputed"), label
        else:
            assert p.reference != "adapter", label
        assert not (p.reference == "sharded" and p.zero_stage != 3), label
        assert not (p.reference == "replicated" and p.zero_stage == 3), label
        assert p.est_tokens_per_s > 0 and p.est_step_time_s > 0
        assert p.fits == (p.suggestion is None), label
        # More cards never make the same configuration bigger per card.
        totals = [
            estimate_memory(spec(model), HARDWARE[hw], replace(opts, cards=n), p.zero_stage, p.offload,
                            p.micro_batch_size, p.gradient_checkpointing, p.reference)["total"]
            for n in (1, 2, 4, 8, 16, 32, 64)
        ]
        assert all(a >= b - 1e-9 for a, b in zip(totals, totals[1:])), (label, totals)


def test_more_cards_never_hurt_the_chosen_plan(golden):
    by = {(u, m, hw, c): p for u, m, hw, c, p in golden}
    for (u, m, hw, c), p in by.items():
        if c > 1 and by[(u, m, hw, 1)].fits:
            assert p.fits, (m, hw, c, u)


def test_plan_json_keys(golden):
    p = golden[0][-1]
    d = plan_to_dict(p)
    assert set(d) == {
        "fits", "zero_stage", "offload", "micro_batch_size", "gradient_accumulation_steps", "gradient_checkpointing",
        "reference", "world_size", "nodes", "cards_per_node", "card_memory_gib", "hardware", "model", "use_peft",
        "max_length", "max_prompt_length", "memory_gib", "est_step_time_s", "est_tokens_per_s", "notes", "suggestion",
        "length_buckets", "packing", "chunked_logps", "packing_attention", "static_shapes", "uses_deepspeed", "bf16",
        "est_pairs_per_s", "est_tokens_per_pair", "est_tokens_basis", "model_params",
    }
    assert set(d["memory_gib"]) == {"params", "grads", "optimizer", "reference", "activations", "logits", "buffers",
                                    "overhead", "total"}
    assert json.loads(json.dumps(d)) == d
    not_fit = next(p for *_, p in golden if not p.fits)
    assert set(plan_to_dict(not_fit)["suggestion"]) == {"text", "cards", "nodes", "offload", "zero_stage"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.fits = False


def test_notes_explain_choices():
    p = make_plan(spec("meta-llama/Llama-3-70B"), HARDWARE["gaudi2"], PlanOptions(cards=8))
    text = " ".join(p.notes)
    assert "ZeRO-3" in text and "calibrated" in text and "LoRA" in text


# --------------------------------------------------------------------------- #
# Options
# --------------------------------------------------------------------------- #

def test_forced_reference_and_options():
    s = spec("meta-llama/Meta-Llama-3-8B")
    p = make_plan(s, HARDWARE["gaudi2"], PlanOptions(cards=8, use_peft=False, reference="sharded"))
    assert p.reference == "sharded" and p.zero_stage == 3
    p = make_plan(s, HARDWARE["gaudi2"], PlanOptions(cards=8, use_peft=False, reference="replicated"))
    assert p.reference == "replicated" and p.zero_stage < 3
    p = make_plan(s, HARDWARE["cuda"], PlanOptions(cards=2, card_memory_gib=24.0))
    assert p.card_memory_gib == 24.0 and p.memory_gib.total <= 24.0 * 0.9
    p = make_plan(s, HARDWARE["gaudi2"], PlanOptions(cards=16, nodes=4))
    assert p.nodes == 4 and p.cards_per_node == 4
    for stage in (0, 1, 2, 3):
        p = make_plan(s, HARDWARE["gaudi2"], PlanOptions(cards=8, zero_stage=stage))
        assert p.zero_stage == stage and p.fits


@pytest.mark.parametrize("model", ["meta-llama/Meta-Llama-3-8B", "google/gemma-3-1b-it", "mistralai/Mistral-7B-v0.3",
                                   "Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen3-8B", "mistralai/Mixtral-8x7B-v0.1",
                                   "Qwen/Qwen3-30B-A3B", "microsoft/Phi-3-mini-4k-instruct"])
def test_plan_lora_targets_are_what_the_ranks_train(model):
    """Without lora_target_modules the plan sizes (and its note names) the modules lora_config adapts for the
    model's family when --lora_target_modules is not given."""
    pytest.importorskip("peft")  # lora_config builds peft's LoraConfig
    s = spec(model)
    ranks = lora_config(ModelArguments(model_name_or_path=model, use_peft=True), s.family).target_modules
    opts = PlanOptions(cards=8)
    assert opts.lora_target_modules is None
    assert set(opts.lora_targets(s)) == set(ranks) and len(opts.lora_targets(s)) == len(ranks)
    assert opts.trainable_params(s) == s.lora_params(16, ranks)
    p = make_plan(s, HARDWARE["gaudi2"], opts)
    note = next(n for n in p.notes if n.startswith("LoRA"))
    assert f"on {', '.join(opts.lora_targets(s))}:" in note
    assert f"{s.lora_params(16, ranks) / 1e6:.1f}M trainable" in note
    # Targets given to the planner are the ones it sizes.
    two = opts.lora_targets(s)[:2]
    qv = PlanOptions(cards=8, lora_target_modules=two)
    assert qv.lora_targets(s) == two and qv.trainable_params(s) < opts.trainable_params(s)
    assert PlanOptions(use_peft=False).trainable_params(s) == s.num_params


def test_every_family_has_default_lora_targets():
    assert set(FAMILIES) <= set(LORA_TARGETS)
    for family in FAMILIES:
        targets = default_lora_targets(family)
        assert targets == list(LORA_TARGETS[family]) and targets is not default_lora_targets(family)
    # Llama and Gemma 3 keep their seven projections, in this order.
    seven = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert default_lora_targets("llama") == default_lora_targets("gemma3") == seven
    assert default_lora_targets("starcoder2") == "all-linear"  # a family without a row (the planner refuses it)
    with pytest.raises(SpecError, match="unknown LoRA target"):
        spec("google/gemma-3-270m").lora_params(8, ("qkv_proj",))


@pytest.mark.parametrize("kwargs", [
    dict(cards=0), dict(cards=12, nodes=5), dict(max_prompt_length=1024), dict(safety_margin=1.5),
    dict(reference="ema"), dict(reference="adapter", use_peft=False), dict(micro_batch_sizes=()),
    dict(zero_stage=4), dict(zero_stage=2, reference="sharded"), dict(zero_stage=3, reference="replicated"),
    dict(lora_target_modules=()), dict(lora_target_modules="q_proj"),
])
def test_bad_options_raise(kwargs):
    with pytest.raises(ValueError):
        PlanOptions(**kwargs)


# --------------------------------------------------------------------------- #
# Rendering, and no accelerator stack at import time
# --------------------------------------------------------------------------- #

def test_render_plan_table():
    s = spec("meta-llama/Llama-3-70B")
    p = make_plan(s, HARDWARE["gaudi2"], PlanOptions(cards=8))
    text = render_plan_table(p)
    for needle in ("FITS", "meta-llama/Llama-3-70B", "gaudi2", "ZeRO stage", "gradient accumulation",
                   "global batch", "activations", "logits", "headroom", "94.62", f"{p.memory_gib.total:.2f}",
                   "calibrated"):
        assert needle in text, needle
    assert "\x1b[" not in text  # plain text, no ANSI codes
    bad = make_plan(s, HARDWARE["gaudi2"], PlanOptions(cards=8, use_peft=False, allow_offload=False))
    text = render_plan_table(bad)
    assert "DOES NOT FIT" in text and "Suggestion:" in text and "nodes" in text


def test_launch_imports_no_accelerator_stack():
    code = ("import sys, launch.plan, launch.plan.search, launch.dsconfig, launch.plan.report, launch.plan.datastats; "
            "print([m for m in ('torch', 'deepspeed', 'transformers', 'rich') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT)
    assert out.stdout.strip() == "[]"
