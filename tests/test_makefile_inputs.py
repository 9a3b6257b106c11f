"""Make variables reach commands as data, never as shell or make code.

Every user variable of the Makefile (MODEL, HARDWARE, CARDS, ..., also given through the environment) carries a
payload that would create a file if anything ran it: make's `$(shell ...)`, backticks, `$(...)`, a `"; cmd; "` and a
`'; cmd; '` breakout. The targets run for real with PYTHON (and docker) pointing at a stub that records its argv and
environment: the Makefile then takes PYTHON for the Habana image's python and runs every recipe with it, so each
target is checked in milliseconds, with no install and no training. One real `make train-1x DRY_RUN=1` checks the
launcher end to end, ARGS split by Python's shlex included. The seed's `MODEL_NAME` (make and dpo_pipeline_sanity.sh)
is here too.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_cmd

MAKEFILE = ROOT / "Makefile"
STUB = """#!{python}
import json, os, sys
# The Makefile's probe for habana_frameworks: yes, this is the Habana image's python.
if sys.argv[1:2] == ["-c"] and "habana_frameworks" in sys.argv[2]:
    sys.exit(0)
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps({{"prog": os.path.basename(sys.argv[0]), "argv": sys.argv[1:],
                         "env": {{k: os.environ.get(k) for k in ("ARGS", "PYTEST_ADDOPTS", "HF_TOKEN")}}}}) + "\\n")
"""
MAKE_ENV_DROP = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MODEL", "MODEL_NAME", "HARDWARE", "CARDS", "NODE_CARDS", "HOSTFILE",
                 "RUN_DIR", "DRY_RUN", "ARGS", "DATASET", "DATASET_COLUMNS", "CHAT_TEMPLATE", "OUT_DIR", "DEMO_DIR", "IMAGE", "PYTEST_ARGS", "PYTEST_ADDOPTS",
                 "HF_TOKEN", "PYTHON", "TORCH_SPEC", "RECIPE", "TB_PORT")


def payload(marks: Path, tag: str) -> str:
    """A value that creates a file under `marks` for every way it could be run as code; also `,` `#` `%` `\\`."""
    return (f"{tag}$(shell touch {marks}/{tag}-make)`touch {marks}/{tag}-tick`$(touch {marks}/{tag}-dollar)"
            f"\"; touch {marks}/{tag}-dq; \"'; touch {marks}/{tag}-sq; ' a,b #c %s \\ $$HOME")


@pytest.fixture
def stubbed(tmp_path):
    """(run, marks, calls): run(target, **vars) runs `make target` in an empty folder with PYTHON and docker
    stubbed; calls() are the stub's invocations."""
    marks, work, bin_dir = tmp_path / "marks", tmp_path / "work", tmp_path / "bin"
    for d in (marks, work, bin_dir):
        d.mkdir()
    log = tmp_path / "stub.log"
    for name in ("python", "docker"):
        path = bin_dir / name
        path.write_text(STUB.format(python=sys.executable))
        path.chmod(path.stat().st_mode | stat.S_IEXEC)

    def run(target, env_vars=None, **make_vars):
        env = {k: v for k, v in os.environ.items() if k not in MAKE_ENV_DROP}
        env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", STUB_LOG=str(log), **(env_vars or {}))
        make_vars.setdefault("PYTHON", str(bin_dir / "python"))
        argv = ["make", "-s", "-f", str(MAKEFILE), target, *(f"{k}={v}" for k, v in make_vars.items())]
        return subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=60)

    def calls():
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return run, marks, calls


def value_of(argv: list[str], flag: str) -> str:
    assert argv.count(flag) == 1, argv
    return argv[argv.index(flag) + 1]


CASES = {  # target: (variables, {flag: variable whose value it must carry}, the module run)
    "plan": (("MODEL", "HARDWARE", "CARDS", "HOSTFILE"),
             {"--model": "MODEL", "--hardware": "HARDWARE", "--cards": "CARDS", "--hostfile": "HOSTFILE"}, "launch"),
    "train-1x": (("MODEL", "HARDWARE", "RUN_DIR", "ARGS", "DRY_RUN", "RECIPE"),
                 {"--model": "MODEL", "--hardware": "HARDWARE", "--run_dir": "RUN_DIR", "--recipe": "RECIPE"},
                 "launch.rank_args"),
    "train-8x": (("MODEL", "HARDWARE", "RUN_DIR", "ARGS", "RECIPE"),
                 {"--model": "MODEL", "--hardware": "HARDWARE", "--run_dir": "RUN_DIR", "--recipe": "RECIPE"},
                 "launch.rank_args"),
    "train-multinode": (("MODEL", "HARDWARE", "NODE_CARDS", "HOSTFILE", "RUN_DIR", "ARGS", "RECIPE"),
                        {"--model": "MODEL", "--hardware": "HARDWARE", "--cards": "NODE_CARDS", "--hostfile": "HOSTFILE",
                         "--run_dir": "RUN_DIR", "--recipe": "RECIPE"}, "launch.rank_args"),
    "tensorboard": (("RUN_DIR", "TB_PORT"), {"--logdir": "RUN_DIR", "--port": "TB_PORT"}, "tensorboard.main"),
    "recipes": ((), {}, "launch"),
    "sanity": (("MODEL", "HARDWARE", "OUT_DIR", "DATASET", "DATASET_COLUMNS", "CHAT_TEMPLATE"),
               {"--model": "MODEL", "--hardware": "HARDWARE", "--out_dir": "OUT_DIR", "--dataset_name": "DATASET",
                "--dataset_columns": "DATASET_COLUMNS", "--chat_template": "CHAT_TEMPLATE"},
               "dpo_dist.pipeline"),
    "demo": (("DEMO_DIR",), {"--out_dir": "DEMO_DIR"}, "dpo_dist.pipeline"),
    "gaudi-selfcheck": (("HARDWARE", "OUT_DIR"), {"--hardware": "HARDWARE", "--out_dir": "OUT_DIR"}, "launch"),
    "check": (("PYTEST_ARGS",), {}, "pytest"),
    "test": (("PYTEST_ARGS",), {}, "pytest"),
}


@pytest.mark.parametrize("how", ["command line", "environment"])
@pytest.mark.parametrize("target", list(CASES))
def test_every_variable_arrives_verbatim_and_runs_nothing(stubbed, target, how):
    run, marks, calls = stubbed
    names, flags, module = CASES[target]
    values = {name: payload(marks, name) for name in names}
    if how == "command line":
        res = run(target, **values)
    else:
        res = run(target, env_vars=values)
    assert res.returncode == 0, res.stdout + res.stderr
    assert not sorted(p.name for p in marks.iterdir()), "a payload ran"
    (call,) = calls()
    assert call["argv"][:2] == ["-m", module], call
    for flag, name in flags.items():
        assert value_of(call["argv"], flag) == values[name]
    if "ARGS" in names:  # handed over whole, for launch.rank_args to split with shlex
        assert call["env"]["ARGS"] == values["ARGS"] and call["argv"][-1] == "--"
    if "DRY_RUN" in names:  # only 1 / yes / true mean a dry run
        assert "--dry-run" not in call["argv"]
    if "PYTEST_ARGS" in names:  # pytest splits PYTEST_ADDOPTS itself
        assert call["env"]["PYTEST_ADDOPTS"] == values["PYTEST_ARGS"]


def test_docker_targets(stubbed):
    run, marks, calls = stubbed
    image, token, model = payload(marks, "IMAGE"), payload(marks, "HF_TOKEN"), payload(marks, "MODEL")
    assert run("build", IMAGE=image).returncode == 0
    assert run("run", IMAGE=image, HF_TOKEN=token, MODEL_NAME=model).returncode == 0
    assert not sorted(p.name for p in marks.iterdir()), "a payload ran"
    build, docker_run = calls()
    assert build["prog"] == "docker" and value_of(build["argv"], "-t") == image
    assert docker_run["argv"][-2:] == [image, "bash"]
    assert docker_run["env"]["HF_TOKEN"] == token and token not in docker_run["argv"]  # by name, never on the line
    assert f"MODEL_NAME={model}" in docker_run["argv"] and f"MODEL={model}" in docker_run["argv"]


def test_make_level_variables(stubbed, tmp_path):
    """PYTHON is read when the Makefile is parsed; TORCH_SPEC by the twin's install recipe."""
    run, marks, calls = stubbed
    res = run("help", PYTHON=payload(marks, "PYTHON"))
    assert res.returncode == 0 and "make demo" in res.stdout
    work = tmp_path / "work"
    for name in ("requirements-gaudi.txt", "pyproject.toml"):
        shutil.copy(ROOT / name, work / name)
    twin_python = work / ".venv-gaudi" / "bin" / "python"
    twin_python.parent.mkdir(parents=True)
    shutil.copy(tmp_path / "bin" / "python", twin_python)
    spec = payload(marks, "TORCH_SPEC")
    run("setup-gaudi-twin", TORCH_SPEC=spec)  # fails at the Open MPI step (no .ci/ here), after the installs
    assert not sorted(p.name for p in marks.iterdir()), "a payload ran"
    assert [spec] in [c["argv"][4:] for c in calls()], calls()


def test_model_name_is_model(stubbed):
    run, marks, calls = stubbed
    model = payload(marks, "MODEL_NAME")
    assert run("sanity", MODEL_NAME=model).returncode == 0
    assert run("sanity", MODEL=model, MODEL_NAME=model).returncode == 0  # the same model twice is fine
    assert run("plan", env_vars={"MODEL_NAME": "google/gemma-3-270m"}).returncode == 0
    assert [value_of(c["argv"], "--model") for c in calls()] == [model, model, "google/gemma-3-270m"]
    res = run("train-8x", MODEL="google/gemma-3-270m", MODEL_NAME=model)
    assert res.returncode == 2 and len(calls()) == 3  # refused, nothing run
    assert f"MODEL=google/gemma-3-270m and MODEL_NAME={model} differ" in res.stderr and "Fix:" in res.stderr
    res = run("sanity")
    assert res.returncode == 2 and "MODEL is required" in res.stderr and "make sanity MODEL=" in res.stderr
    assert not sorted(p.name for p in marks.iterdir()), "a payload ran"


def test_make_train_dry_run_end_to_end(tmp_path, tiny_assets):
    """The real launcher: the model folder, the run dir and a rank argument all carry payloads; they arrive in the
    run dir's command.sh as the words given, and nothing ran. ARGS keeps a quoted word as one word."""
    env = {k: v for k, v in os.environ.items() if k not in MAKE_ENV_DROP}
    if subprocess.run(["make", "-s", "-q", ".venv/.installed"], cwd=ROOT, env=env).returncode == 1:
        pytest.skip("the venv is older than its requirements: `make setup` first (this test must not install)")
    marks = tmp_path / "marks"
    marks.mkdir()
    model = Path(f"{tmp_path}/model-{payload(marks, 'MODEL')}")  # its slashes make it a few nested folders
    model.mkdir(parents=True)
    shutil.copy(Path(tiny_assets.llama_dir) / "config.json", model / "config.json")
    run_dir = Path(f"{tmp_path}/run-{payload(marks, 'RUN_DIR')}")
    data = "my data " + payload(marks, "ARGS")
    res = run_cmd(["make", "-s", "train-1x", f"MODEL={model}", "HARDWARE=cpu", "DRY_RUN=1", f"RUN_DIR={run_dir}",
                   f"ARGS=--learning_rate 1e-6 --dataset_name {shlex.quote(data)}"],
                  timeout=120, env=env, cwd=ROOT)
    assert not sorted(p.name for p in marks.iterdir()), "a payload ran"
    assert res.returncode == 0, res.stdout[-3000:]
    exec_line = next(ln for ln in (run_dir / "command.sh").read_text().splitlines() if ln.startswith("exec "))
    argv = shlex.split(exec_line)
    assert value_of(argv, "--model_name_or_path") == str(model)
    assert value_of(argv, "--dataset_name") == data and value_of(argv, "--learning_rate") == "1e-6"
    assert value_of(argv, "--output_dir") == str(run_dir / "output")


def test_args_with_an_open_quote_is_refused(tiny_assets, capsys):
    from launch.rank_args import main

    rc = main(["plan", "--model", "m"], environ={"ARGS": "--dataset_name 'my data"})
    err = capsys.readouterr().err
    assert rc == 2 and "ARGS=" in err and "close every quote" in err


def run_sanity_script(tmp_path, *args, model_name=None):
    stub = tmp_path / "python"
    stub.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    env = {k: v for k, v in os.environ.items() if k not in MAKE_ENV_DROP}
    env["PYTHON"] = str(stub)
    if model_name is not None:
        env["MODEL_NAME"] = model_name
    return subprocess.run([str(ROOT / "dpo_pipeline_sanity.sh"), *args], env=env, capture_output=True, text=True,
                          timeout=30)


def test_sanity_script_takes_the_seeds_model_name(tmp_path):
    """`MODEL_NAME=google/gemma-3-270m ./dpo_pipeline_sanity.sh` (the seed's README) runs the pipeline on it."""
    res = run_sanity_script(tmp_path, model_name="google/gemma-3-270m")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == ["-m", "dpo_dist.pipeline", "--model", "google/gemma-3-270m"]
    res = run_sanity_script(tmp_path, "--out_dir", "runs/x", model_name="google/gemma-3-270m")
    assert json.loads(res.stdout) == ["-m", "dpo_dist.pipeline", "--model", "google/gemma-3-270m", "--out_dir", "runs/x"]
    res = run_sanity_script(tmp_path, "m", "--out_dir", "runs/x")  # the positional form is unchanged
    assert json.loads(res.stdout) == ["-m", "dpo_dist.pipeline", "--model", "m", "--out_dir", "runs/x"]
    res = run_sanity_script(tmp_path, "m", model_name="m")  # the same model both ways is one model
    assert json.loads(res.stdout) == ["-m", "dpo_dist.pipeline", "--model", "m"]


@pytest.mark.parametrize(("args", "model_name", "needle"), [
    (("other/model",), "google/gemma-3-270m", "differ"),
    ((), None, "usage:"),
    (("--out_dir", "x"), None, "usage:"),
    ((), "", "usage:"),
])
def test_sanity_script_refusals(tmp_path, args, model_name, needle):
    res = run_sanity_script(tmp_path, *args, model_name=model_name)
    assert res.returncode == 2 and needle in res.stderr and res.stdout == ""


@pytest.mark.parametrize("name", ["MODEL", "ARGS", "HOSTFILE"])
def test_a_line_break_in_a_variable_is_refused(stubbed, name):
    """A line break would end the recipe line inside its quoted word, and make could run the rest as a new line."""
    run, marks, calls = stubbed
    res = run("train-multinode", **{"MODEL": "m", "HOSTFILE": "h", name: f"x\ntouch {marks}/{name}-line; echo "})
    assert res.returncode == 2 and f"{name} holds a line break" in res.stderr and "Fix:" in res.stderr
    assert not calls() and not list(marks.iterdir())
