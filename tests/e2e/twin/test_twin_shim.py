"""The habana_frameworks stand-in covers what optimum-habana imports, and nothing leaks into the product.

Every `habana_frameworks` name in optimum-habana 1.21.2's sources is found with `ast` and must be either provided by
the stand-in or listed below as deliberately absent, with the reason. A new optimum-habana release that imports a new
name fails here until someone decides which it is.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from support.twin import SHIM

# Deliberately not in the stand-in: (module, name) -> why the twin never needs it.
ABSENT = {
    # optimum-habana imports these inside try/except ImportError and falls back to plain PyTorch code.
    ("habana_frameworks.torch.hpex.kernels", "CTCLoss"): "optional kernel (fallback in optimum-habana)",
    ("habana_frameworks.torch.hpex.kernels", "RotaryPosEmbeddingHelperV2"): "optional fused RoPE (fallback)",
    ("habana_frameworks.torch.hpex.kernels", "RotaryPosEmbeddingHelperV3"): "optional fused RoPE (fallback)",
    ("habana_frameworks.torch.hpex.normalization", "FusedRMSNorm"): "optional fused RMSNorm (fallback)",
    ("habana_frameworks.torch.hpex.experimental.transformer_engine", None): "FP8 training only (fallback)",
    # Imported only inside code the twin does not run: use_habana=False turns off fused optimizers and clipping.
    ("habana_frameworks.torch.hpex.optimizers", "FusedAdamW"): "GaudiTrainer, only with use_habana and use_fused_adam",
    ("habana_frameworks.torch.hpex.normalization", "FusedClipNorm"): "GaudiTrainer, only with use_habana",
    # FP8 and model code of families the twin does not load.
    ("habana_frameworks.torch.hpex.experimental.transformer_engine", "FusedAttention"): "FP8 attention only",
    ("habana_frameworks.torch.hpex.kernels.Fp8Ops", "cast_to_fp8_v2"): "FP8 only",
    ("habana_frameworks.torch.hpex.kernels", "RotaryPosEmbeddingMode"): "fused-RoPE call path of other families",
    ("habana_frameworks.torch.hpex.kernels", "apply_rotary_pos_emb"): "fused-RoPE call path of other families",
}


def _optimum_habana_root() -> Path:
    spec = importlib.util.find_spec("optimum")
    for p in spec.submodule_search_locations if spec else []:
        if (Path(p) / "habana" / "trl").is_dir():
            return Path(p) / "habana"
    pytest.skip("optimum-habana sources are not installed in this venv (make setup installs them)")


def habana_imports() -> dict:
    """{(module, name or None): [files]} for every import of habana_frameworks in optimum-habana."""
    root = _optimum_habana_root()
    out: dict = {}
    for f in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("habana_frameworks"):
                keys = [(node.module, a.name) for a in node.names]
            elif isinstance(node, ast.Import):
                keys = [(a.name, None) for a in node.names if a.name.startswith("habana_frameworks")]
            else:
                continue
            for k in keys:
                out.setdefault(k, []).append(str(f.relative_to(root)))
    return out


@pytest.fixture
def shim_on_path():
    sys.path.insert(0, str(SHIM))
    try:
        yield
    finally:
        sys.path.remove(str(SHIM))
        for m in [m for m in sys.modules if m.split(".")[0] in ("habana_frameworks", "torchvision")]:
            del sys.modules[m]


def _provided(module: str, name) -> bool:
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return False
    return name is None or hasattr(mod, name)


def test_every_habana_import_is_provided_or_deliberately_absent(shim_on_path):
    found = habana_imports()
    assert len(found) > 15, "the ast scan found almost nothing: did optimum-habana's layout change?"
    unexplained = {k: v[:3] for k, v in found.items() if not _provided(*k) and k not in ABSENT}
    assert not unexplained, f"add these to the stand-in (with a comment) or to ABSENT (with the reason): {unexplained}"
    stale = [k for k in ABSENT if k not in found or _provided(*k)]
    assert not stale, f"ABSENT lists names optimum-habana no longer imports, or the stand-in provides: {stale}"


def test_every_stubbed_name_says_what_the_real_one_does():
    """Each public function and class of the stand-in has a docstring beginning with what the real one does."""
    missing = []
    for f in sorted((SHIM / "habana_frameworks").rglob("*.py")):
        tree = ast.parse(f.read_text())
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                doc = ast.get_docstring(node) or ""
                if not doc.startswith("Real:"):
                    missing.append(f"{f.relative_to(SHIM)}:{node.name}")
    assert not missing, missing


def test_stand_in_is_never_shipped_or_importable_by_default():
    import tomllib

    from tests.support.testing_utils import ROOT

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert cfg["tool"]["setuptools"]["packages"]["find"]["include"] == ["launch*", "dpo_dist*"]  # never tests/
    assert importlib.util.find_spec("habana_frameworks") is None  # the main venv has no stand-in on its path
    dockerignore = (ROOT / ".dockerignore").read_text().split()
    assert "tests/support/habana_shim" in dockerignore or "tests" in dockerignore


def test_twin_venv_holds_the_gaudi_pins_and_imports():
    """requirements-gaudi.txt installs into a working environment: the pins hold and `import datasets` works with
    trl 0.9.6's numpy < 2 (a fresh resolve would otherwise take pyarrow 26, which needs numpy >= 2)."""
    import subprocess

    from packaging.requirements import Requirement

    from support.twin import TWIN_PY, twin_env, twin_skip_reason
    from tests.support.testing_utils import ROOT

    if reason := twin_skip_reason():
        pytest.skip(reason)
    reqs = [Requirement(ln.split("#")[0].strip()) for ln in (ROOT / "requirements-gaudi.txt").read_text().splitlines()
            if ln.split("#")[0].strip()]
    code = ("import importlib.metadata as m, json, datasets, trl, optimum.habana.trl; "
            f"print(json.dumps({{n: m.version(n) for n in {[r.name for r in reqs]!r}}}))")
    out = subprocess.run([str(TWIN_PY), "-c", code], env=twin_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    have = json.loads(out.stdout.strip().splitlines()[-1])
    bad = {r.name: have[r.name] for r in reqs if not r.specifier.contains(have[r.name], prereleases=True)}
    assert not bad, f"the twin venv does not hold requirements-gaudi.txt: {bad}"
