"""The HPU path computes what the CPU path computes, on the same batch (tests/support/engine_probe.py).

The HPU side runs in the Gaudi twin: optimum-habana's Gaudi model classes (FusedSDPA through use_flash_attention,
its RoPE and norms), static shapes, packed rows through a block-diagonal mask. The CPU side is the trl 0.22 path's:
plain transformers models, dynamic shapes, per-row (varlen) packing. Both read the same tiny checkpoints and rows.
Gemma 3's sliding window is cut to 24 tokens, shorter than the rows, so the local layers' masks matter.

Tolerances: sums of ~100-350 token log-probs in fp32, through different kernels and reduction orders: 1e-4
relative (the suite's tolerance for such sums); gradient norms per parameter 1e-4 relative; the loss 1e-5.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from support.engine_probe import VARIANTS, probe
from support.twin import TWIN_PY, twin_env, twin_skip_reason

CASES = {"llama": None, "gemma3": 24}  # family -> sliding window override


@pytest.fixture(scope="module")
def probes(tiny_assets, tmp_path_factory):
    if reason := twin_skip_reason():
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("probe") / "hpu.json"
    dirs = {"llama": str(tiny_assets.llama_dir), "gemma3": str(tiny_assets.gemma3_dir)}
    code = ("import json, sys; sys.path.insert(0, 'tests'); from support.engine_probe import probe; "
            f"json.dump({{f: probe('hpu', d, {str(tiny_assets.data_dir)!r}, sliding_window=w) "
            f"for f, (d, w) in {repr({f: (dirs[f], w) for f, w in CASES.items()})}.items()}}, "
            f"open({str(out)!r}, 'w'))")
    r = subprocess.run([str(TWIN_PY), "-c", code], env=twin_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    hpu = json.loads(out.read_text())
    cpu = {f: probe("cpu", dirs[f], str(tiny_assets.data_dir), sliding_window=w) for f, w in CASES.items()}
    return cpu, hpu


def _close(a, b, rtol, what):
    for x, y in zip(a, b):
        assert abs(x - y) <= rtol * max(1.0, abs(x)), f"{what}: {x} vs {y}"


@pytest.mark.parametrize("family", sorted(CASES))
def test_hpu_path_equals_cpu_path(probes, family):
    cpu, hpu = probes[0][family], probes[1][family]
    assert cpu["model_class"].endswith("ForCausalLM") and hpu["model_class"] == "Gaudi" + cpu["model_class"]
    for v in VARIANTS:
        c, h = cpu["variants"][v], hpu["variants"][v]
        _close(c["chosen_logps"] + c["rejected_logps"], h["chosen_logps"] + h["rejected_logps"], 1e-4, f"{v} log-probs")
        assert abs(c["loss"] - h["loss"]) < 1e-5 and c["accuracy"] == h["accuracy"], v
        assert set(c["grad_norms"]) == set(h["grad_norms"])
        for name, g in c["grad_norms"].items():
            assert abs(g - h["grad_norms"][name]) <= 1e-4 * max(g, 1e-6), (v, name, g, h["grad_norms"][name])
        assert c["shape"] == h["shape"], v
    # Shared prompts (the prompt once, then chosen, then rejected) give the rows' own numbers on both paths, in a
    # shorter packed row.
    for side in (cpu, hpu):
        rows, shared = side["variants"]["rows"], side["variants"]["shared"]
        _close(rows["chosen_logps"] + rows["rejected_logps"], shared["chosen_logps"] + shared["rejected_logps"], 1e-4,
               "shared vs rows log-probs")
        assert abs(rows["loss"] - shared["loss"]) < 1e-5
        assert shared["shape"][1] < side["variants"]["packed"]["shape"][1]
    # Gaudi attention took the fused kernel (the engine passes use_flash_attention=True); the CPU path has none
    assert hpu["fused_sdpa_calls"] > 0 and cpu["fused_sdpa_calls"] == 0
    # every loss type, computed by the engine on the HPU path, equals the CPU path's (ipo: length-normalised log-probs)
    assert set(hpu["losses"]) == set(cpu["losses"]) and len(cpu["losses"]) == 14
    for lt, value in cpu["losses"].items():
        assert abs(value - hpu["losses"][lt]) <= 1e-4 * max(1.0, abs(value)), (lt, value, hpu["losses"][lt])


@pytest.mark.parametrize("family", sorted(CASES))
@pytest.mark.parametrize("path", [0, 1], ids=["cpu", "hpu"])
def test_packed_and_bucketed_equal_unpadded_rows(probes, family, path):
    p = probes[path][family]["variants"]
    rows = p["rows"]["chosen_logps"] + p["rows"]["rejected_logps"]
    for v in ("buckets", "packed"):
        _close(rows, p[v]["chosen_logps"] + p[v]["rejected_logps"], 1e-4, v)
    assert p["packed"]["shape"][0] == 1 and p["packed"]["shape"][1] > sum(p["rows"]["shape"])  # one row, padded tail
