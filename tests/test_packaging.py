"""Packaging: the pins of both environments, the Dockerfile, the Makefile's install order, the README's
first commands and the CI entry point. Pure file reads (plus importlib.metadata); no network, no docker."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT

# DESIGN.md §6 (CPU / CUDA: CI, make demo, make test).
CPU_PINS = {
    "transformers": "4.55.4",
    "accelerate": "1.10.1",
    "trl": "0.22.2",
    "peft": "0.17.1",
    "datasets": "3.6.0",
    "deepspeed": "0.19.8",
}
TORCH_PIN = "2.13.0"
# DESIGN.md §3 / §6 (Gaudi image): optimum-habana 1.21.2 with its DPO example's trl and peft.
GAUDI_EXACT = {"optimum-habana": "1.21.2", "trl": "0.9.6", "peft": "0.17.0", "accelerate": "1.10.1"}
HABANA_IMAGE_RE = re.compile(
    r"^vault\.habana\.ai/gaudi-docker/(?P<synapse>\d+\.\d+\.\d+)/[^/\s]+/habanalabs/pytorch-installer-[\d.]+:\S+$")
DESIGN = ROOT.parent / "shared" / "DESIGN.md"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(path: Path) -> dict:
    """{normalized name: specifier string} from a requirements file (comments and options skipped)."""
    out = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*(.*)$", line)
        assert m, f"{path.name}: cannot parse {raw!r}"
        name = _norm(m.group(1))
        assert name not in out, f"{path.name}: {name} listed twice"
        out[name] = m.group(3).replace(" ", "")
    return out


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical, buf = [], ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        logical.append(buf + stripped)
        buf = ""
    if buf:
        logical.append(buf)
    out = []
    for line in logical:
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def release(version: str) -> str:
    return version.split("+", 1)[0]


# --------------------------------------------------------------------------------------------
# requirements.txt (CPU / CUDA)


def test_requirements_txt_pins_match_design():
    reqs = requirements(ROOT / "requirements.txt")
    for name, version in CPU_PINS.items():
        assert reqs.get(name) == f"=={version}", f"requirements.txt: {name} must be =={version}, got {reqs.get(name)!r}"
    assert "torch" not in reqs, "torch is installed first and alone by `make setup` (TORCH_SPEC), not from requirements.txt"


def test_installed_versions_equal_the_pins():
    reqs = requirements(ROOT / "requirements.txt")
    pinned = {n: s[2:] for n, s in reqs.items() if s.startswith("==")}
    assert set(CPU_PINS) <= set(pinned)
    wrong = {}
    for name, version in pinned.items():
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            have = None
        if have is None or release(have) != version:
            wrong[name] = (have, version)
    have_torch = importlib.metadata.version("torch")
    if release(have_torch) != TORCH_PIN:
        wrong["torch"] = (have_torch, TORCH_PIN)
    assert not wrong, f"installed != pinned (run `rm -f .venv/.installed && make setup`): {wrong}"


@pytest.mark.parametrize("target,requirements_file", [("$(STAMP)", "requirements.txt"),
                                                      ("$(TWIN_STAMP)", "requirements-gaudi.txt")])
def test_makefile_installs_torch_first_and_alone(target, requirements_file):
    """Both venvs (.venv and the Gaudi twin's) get torch first and alone, so no requirement can pull another build."""
    text = (ROOT / "Makefile").read_text()
    m = re.search(r"^TORCH_SPEC\s*\?=\s*(\S+)\s*$", text, re.M)
    assert m and m.group(1) == f"torch=={TORCH_PIN}"
    m = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)+)", text, re.M)
    assert m, f"no {target} install rule in the Makefile"
    installs = [ln.strip() for ln in m.group(1).splitlines() if "pip install" in ln and "--upgrade pip" not in ln]
    assert installs, "the install rule has no pip install"
    assert re.search(r'pip install(?: -q)? "?\$\(TORCH_SPEC\)"?$', installs[0]), \
        f"the first pip install must install torch alone: {installs[0]!r}"
    assert f"-r {requirements_file}" in installs[1], installs
    assert all("TORCH_SPEC" not in ln and "torch" not in ln.split("pip install", 1)[1] for ln in installs[1:])


def test_make_targets_need_model_before_installing():
    text = (ROOT / "Makefile").read_text()
    for target in ("plan", "train-1x", "train-8x", "train-multinode", "sanity"):
        m = re.search(rf"^{re.escape(target)}:\s*(.*)$", text, re.M)
        assert m, target
        prereqs = m.group(1).split()
        assert prereqs[0] == "require-model", f"{target}: require-model must come first, got {prereqs}"


# --------------------------------------------------------------------------------------------
# Gaudi: requirements-gaudi.txt and the Dockerfile


def test_requirements_gaudi_pins():
    from packaging.specifiers import SpecifierSet

    reqs = requirements(ROOT / "requirements-gaudi.txt")
    for name, version in GAUDI_EXACT.items():
        assert reqs.get(name) == f"=={version}", f"requirements-gaudi.txt: {name} must be =={version}, got {reqs.get(name)!r}"
    tf = SpecifierSet(reqs["transformers"])
    assert not tf.contains("4.54.9") and not tf.contains("4.56.0") and (tf.contains("4.55.4") or tf.contains("4.55.0")), \
        f"transformers must be a 4.55.x pin (optimum-habana 1.21.2 requires >=4.55,<4.56), got {reqs['transformers']!r}"
    for banned in ("torch", "deepspeed", "torchvision", "torchaudio"):
        assert banned not in reqs, f"{banned} comes from the Habana image / HabanaAI/DeepSpeed, not requirements-gaudi.txt"
    # trl 0.9.6 needs numpy < 2; pyarrow 26 needs numpy >= 2 (tests/twin proves the file installs and imports)
    assert not SpecifierSet(reqs["numpy"]).contains("2.0.0") and SpecifierSet(reqs["numpy"]).contains("1.26.4")
    assert not SpecifierSet(reqs["pyarrow"]).contains("26.0.0")


def test_dockerfile_starts_from_the_habana_pytorch_image():
    inst = dockerfile_instructions()
    args = {}
    for word, rest in inst:
        if word == "FROM":
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)),
                           rest.split()[0])
            break
        if word == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k.strip()] = v.strip().strip('"')
    else:
        pytest.fail("Dockerfile has no FROM")
    m = HABANA_IMAGE_RE.match(image)
    assert m, f"FROM must be the Habana PyTorch image, got {image!r}"
    assert len([w for w, _ in inst if w == "FROM"]) == 1
    # DeepSpeed from HabanaAI at the same SynapseAI version as the image.
    assert args.get("SYNAPSE_VERSION") == m.group("synapse"), (args.get("SYNAPSE_VERSION"), image)


def test_dockerfile_installs_deepspeed_only_from_habana_and_the_gaudi_requirements():
    runs = [rest for word, rest in dockerfile_instructions() if word == "RUN"]
    pip_runs = [r for r in runs if "pip install" in r or "pip3 install" in r]
    ds = [r for r in pip_runs if "deepspeed" in r.lower()]
    assert ds, "the Dockerfile does not install DeepSpeed"
    for r in ds:
        assert "git+https://github.com/HabanaAI/DeepSpeed.git@" in r, f"DeepSpeed must come from HabanaAI/DeepSpeed: {r!r}"
        words = r.replace('"', " ").replace("'", " ").split()
        bare = [w for w in words if re.match(r"(?i)^deepspeed([=<>!~].*)?$", w)]
        assert not bare, f"PyPI deepspeed installed: {r!r}"
    assert any(re.search(r"-r\s+\S*requirements-gaudi\.txt", r) for r in pip_runs), "requirements-gaudi.txt is not installed"
    for r in pip_runs:
        words = r.replace('"', " ").replace("'", " ").split()
        assert not [w for w in words if re.match(r"(?i)^torch([=<>!~].*)?$", w)], f"the image's torch is replaced: {r!r}"
    copied = [rest for word, rest in dockerfile_instructions() if word in ("COPY", "ADD")]
    assert any("requirements-gaudi.txt" in c for c in copied)


def test_dockerfile_bakes_in_no_token():
    inst = dockerfile_instructions()
    for word, rest in inst:
        if word in ("ENV", "ARG", "LABEL"):
            names = re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)(?==|\s|$)", rest)
            for n in names:
                assert not re.search(r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|CREDENTIALS?)(_|$)", n, re.I), \
                    f"{word} {rest!r} bakes a secret into the image (pass HF_TOKEN at `docker run -e`, as `make run` does)"
    text = (ROOT / "Dockerfile").read_text()
    assert not re.search(r"\bhf_[A-Za-z0-9]{20,}", text), "a Hugging Face token literal is in the Dockerfile"
    assert not re.search(r"huggingface-cli\s+login|hf\s+auth\s+login", text)


# --------------------------------------------------------------------------------------------
# doctor, DESIGN, README, CI


def test_doctor_pins_agree_with_the_requirements_files():
    from launch.doctor import CPU_PINS as DOCTOR_CPU, GAUDI_PINS as DOCTOR_GAUDI

    reqs = requirements(ROOT / "requirements.txt")
    assert DOCTOR_CPU["torch"] == TORCH_PIN
    for name, version in DOCTOR_CPU.items():
        if name != "torch":
            assert reqs[name] == f"=={version}", name
    gaudi = requirements(ROOT / "requirements-gaudi.txt")
    for name, version in DOCTOR_GAUDI.items():
        if name in gaudi and not version.endswith(".*"):
            assert gaudi[name] == f"=={version}", name
    assert DOCTOR_GAUDI["transformers"] == "4.55.*" and DOCTOR_GAUDI["optimum-habana"] == "1.21.2"


@pytest.mark.skipif(not DESIGN.is_file(), reason="DESIGN.md is kept outside the repository")
def test_pins_match_design_section_6():
    text = DESIGN.read_text()
    section = text.split("## 6.", 1)[1].split("\n## ", 1)[0]
    cpu_line = next(ln for ln in section.splitlines() if ln.startswith("- **CPU / CUDA"))
    gaudi_line = next(ln for ln in section.splitlines() if ln.startswith("- **Gaudi"))
    design_cpu = dict(re.findall(r"`([a-z][a-z0-9-]*)==([\d.]+)`", cpu_line))
    design_gaudi = dict(re.findall(r"`([a-z][a-z0-9-]*)==([\d.]+)`", gaudi_line))
    assert design_cpu == dict(CPU_PINS, torch=TORCH_PIN)
    assert {k: v for k, v in GAUDI_EXACT.items() if k in design_gaudi} == design_gaudi


def test_readme_first_commands_are_make_demo_then_make_test():
    head = (ROOT / "README.md").read_text().splitlines()[:15]
    commands = [ln.strip().split("#", 1)[0].strip() for ln in head]
    assert "make demo" in commands and "make test" in commands, "README's first 15 lines must show `make demo` and `make test`"
    demo, test = commands.index("make demo"), commands.index("make test")
    assert demo < test, "`make demo` comes first, then `make test`"
    earlier = [c for c in commands[:demo] if c.startswith(("make ", "python", "pip ", "bash ", "./"))]
    assert not earlier, f"commands before `make demo`: {earlier}"


def test_ci_runs_make_test():
    ci = ROOT / ".ci" / "run"
    lines = [ln.strip() for ln in ci.read_text().splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert any(re.match(r"^(exec\s+)?make\s+test\b", ln) for ln in lines), lines


def test_make_uses_the_images_python_inside_the_gaudi_image():
    """Inside the Habana image (habana_frameworks importable) make runs the image's python and installs nothing, so a
    host .venv mounted into the container can neither shadow habana_frameworks nor be rebuilt without it."""
    shim = ROOT / "tests" / "support" / "habana_shim"  # makes habana_frameworks findable, as in the image
    inside = subprocess.run(["make", "-n", "-C", str(ROOT), "plan", "MODEL=m"], capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(shim)))
    assert inside.returncode == 0, inside.stderr
    assert re.search(r"^python3 -m launch plan --model \S*m", inside.stdout, re.M), inside.stdout
    assert ".venv" not in inside.stdout and "pip install" not in inside.stdout
    outside = subprocess.run(["make", "-n", "-C", str(ROOT), "plan", "MODEL=m"], capture_output=True, text=True,
                             env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert re.search(r"^\.venv/bin/python -m launch plan --model \S*m", outside.stdout, re.M), outside.stdout


def test_make_run_passes_what_mpi_needs_in_a_container():
    text = (ROOT / "Makefile").read_text()
    run = text.split("\nrun:", 1)[1].split("\n\n", 1)[0]
    assert "-e OMPI_MCA_btl_vader_single_copy_mechanism=none" in run and "--runtime=habana" in run
