"""Packaging: the pins of both environments, the Dockerfile, the Makefile's install order, the README's
first commands and the CI entry point. Pure file reads (plus importlib.metadata); no network, no docker."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess

import pytest

from conftest import ROOT
from launch.pins import CPU_CHECKED, CPU_REQUIREMENTS, GAUDI_CHECKED, GAUDI_REQUIREMENTS, exact_pins, read_requirements

HABANA_IMAGE_RE = re.compile(
    r"^vault\.habana\.ai/gaudi-docker/(?P<synapse>\d+\.\d+\.\d+)/[^/\s]+/habanalabs/pytorch-installer-[\d.]+:\S+$")


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


def test_requirements_txt_pins_every_checked_package_exactly_torch_first():
    pins = exact_pins(CPU_REQUIREMENTS)
    missing = [n for n in CPU_CHECKED if n not in pins]
    assert not missing, f"requirements.txt must pin these exactly (==): {missing}"
    first = next(ln for ln in CPU_REQUIREMENTS.read_text().splitlines() if ln.strip() and not ln.startswith("#"))
    assert first.startswith("torch=="), f"torch must be requirements.txt's first requirement (make setup installs it alone first): {first!r}"


def test_installed_versions_equal_the_pins():
    reqs = read_requirements(CPU_REQUIREMENTS)
    pinned = {n: s[2:] for n, s in reqs.items() if s.startswith("==")}
    assert set(CPU_CHECKED) <= set(pinned)
    wrong = {}
    for name, version in pinned.items():
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            have = None
        if have is None or release(have) != version:
            wrong[name] = (have, version)
    assert not wrong, f"installed != pinned (run `rm -f .venv/.installed && make setup`): {wrong}"


@pytest.mark.parametrize("target,requirements_file", [("$(STAMP)", "requirements.txt"),
                                                      ("$(TWIN_STAMP)", "requirements-gaudi.txt")])
def test_makefile_installs_torch_first_and_alone(target, requirements_file):
    """Both venvs (.venv and the Gaudi twin's) get torch first and alone, so no requirement can pull another build."""
    text = (ROOT / "Makefile").read_text()
    m = re.search(r"^TORCH_SPEC\s*\?=\s*(.+)$", text, re.M)
    assert m and "requirements.txt" in m.group(1), "TORCH_SPEC must come from requirements.txt's torch line"
    spec = subprocess.run(["make", "-s", "-f", "Makefile", "-f", "-", "show-torch"], cwd=ROOT, text=True,
                          input="show-torch:\n\t@echo $(TORCH_SPEC)\n", capture_output=True).stdout.strip()
    assert spec == f"torch=={exact_pins(CPU_REQUIREMENTS)['torch']}", spec
    m = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)+)", text, re.M)
    assert m, f"no {target} install rule in the Makefile"
    installs = [ln.strip() for ln in m.group(1).splitlines() if "pip install" in ln and "--upgrade pip" not in ln]
    assert installs, "the install rule has no pip install"
    assert re.search(r'pip install(?: -q)? \$\(call sq,\$\(TORCH_SPEC\)\)$', installs[0]), \
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

    reqs = read_requirements(GAUDI_REQUIREMENTS)
    missing = [n for n in GAUDI_CHECKED if n not in exact_pins(GAUDI_REQUIREMENTS)]
    assert not missing, f"requirements-gaudi.txt must pin these exactly (==): {missing}"
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
# doctor, README, CI


def test_doctor_checks_the_requirements_files_pins():
    from launch.doctor import collect_checks

    for hardware, gaudi in (("cpu", False), ("gaudi2", True)):
        pins = exact_pins(GAUDI_REQUIREMENTS if gaudi else CPU_REQUIREMENTS)
        checks = collect_checks(hardware=hardware, environ={}, version_of=pins.get, run_tool=lambda argv: None)
        by = {c.name: c for c in checks if c.section == "versions"}
        for name in GAUDI_CHECKED if gaudi else CPU_CHECKED:
            assert by[name].status == "ok" and pins[name] in by[name].detail, (hardware, name, by[name])


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
    assert re.search(r"^'python3' -m launch plan --model \S*m", inside.stdout, re.M), inside.stdout
    assert ".venv" not in inside.stdout and "pip install" not in inside.stdout
    outside = subprocess.run(["make", "-n", "-C", str(ROOT), "plan", "MODEL=m"], capture_output=True, text=True,
                             env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert re.search(r"^\.venv/bin/python -m launch plan --model \S*m", outside.stdout, re.M), outside.stdout


def test_make_run_passes_what_mpi_needs_in_a_container():
    text = (ROOT / "Makefile").read_text()
    run = text.split("\nrun:", 1)[1].split("\n\n", 1)[0]
    assert "-e OMPI_MCA_btl_vader_single_copy_mechanism=none" in run and "--runtime=habana" in run
