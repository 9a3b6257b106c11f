"""`python -m launch plan | train --dry-run | doctor` end to end, without training anything.

Each subprocess is a fresh `python -m launch ...` (about 2-3 s, mostly importing transformers for
HfArgumentParser) with `HF_HUB_OFFLINE=1` and a planted `HF_TOKEN`, so every run here also checks
that the token never reaches stdout/stderr or a written file. Cheaper cases call `launch.cli.main`
in-process. Nothing here starts a rank.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import ROOT, run_cmd, run_main

PY = sys.executable
SECRET = "hf_plantedSECRETvalue123"
LLAMA70 = ["--model", "meta-llama/Llama-3-70B", "--hardware", "gaudi2", "--cards", "8"]
MEMORY_KEYS = {"params", "grads", "optimizer", "reference", "activations", "logits", "buffers", "total"}
PLAN_KEYS = {"fits", "zero_stage", "offload", "micro_batch_size", "gradient_accumulation_steps",
             "gradient_checkpointing", "reference", "world_size", "card_memory_gib", "memory_gib"}
GEMMA3_REAL_SIZES = ("270m", "1b", "4b", "12b", "27b")


def launch_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("GAUDI_SPAWN", "PT_HPU_LAZY_MODE", "PT_ENABLE_INT64_SUPPORT", "HABANA_VISIBLE_DEVICES",
                        "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MODEL")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_TOKEN=SECRET, TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def launch(*args, cwd=None, timeout=90, **env) -> subprocess.CompletedProcess:
    """`python -m launch ARGS` (stdout and stderr together in .stdout); asserts the token stayed secret. In this
    process (conftest.run_main) unless it must run from another folder."""
    from launch.cli import main

    if cwd is None:
        r = run_main(main, args, env=launch_env(**env))
    else:
        r = run_cmd([PY, "-m", "launch", *map(str, args)], timeout=timeout, env=launch_env(**env), cwd=cwd)
    assert SECRET not in r.stdout, "the planted HF_TOKEN value was printed"
    return r


def assert_no_secret_in_files(*dirs: Path) -> None:
    for d in dirs:
        for p in Path(d).rglob("*"):
            if p.is_file():
                assert SECRET.encode() not in p.read_bytes(), f"the planted HF_TOKEN value was written to {p}"


def command_line(out: str) -> list[str]:
    """The printed launch command (after the plan table) as words, without the leading NAME=value."""
    lines = [ln for ln in out.splitlines() if ln.startswith("PT_HPU_LAZY_MODE=1 ")]
    assert len(lines) == 1, out
    words = shlex.split(lines[0])
    while words and "=" in words[0] and not words[0].startswith("-"):
        words.pop(0)
    return words


def exec_argv(command_sh: Path) -> list[str]:
    lines = [ln for ln in command_sh.read_text().splitlines() if ln.startswith("exec ")]
    assert len(lines) == 1, command_sh.read_text()
    return shlex.split(lines[0])[1:]


def value_after(argv: list[str], flag: str) -> str:
    assert argv.count(flag) == 1, (flag, argv)
    return argv[argv.index(flag) + 1]


def write_hostfile(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------------------
# shared subprocess runs (each runs once per module)


@pytest.fixture(scope="module")
def plan_json():
    r = launch("plan", *LLAMA70, "--json")
    assert r.returncode == 0, r.stdout
    return r


@pytest.fixture(scope="module")
def single_node(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single") / "run"
    r = launch("train", *LLAMA70, "--dry-run", "--run_dir", run_dir)
    return r, run_dir


@pytest.fixture(scope="module")
def multi_node(tmp_path_factory):
    base = tmp_path_factory.mktemp("multi")
    hostfile = write_hostfile(base / "hosts.txt", "# two Gaudi2 nodes\ngaudi-node-0 slots=8\ngaudi-node-1 slots=8\n")
    run_dir = base / "run"
    r = launch("train", *LLAMA70, "--hostfile", hostfile, "--dry-run", "--run_dir", run_dir)
    return r, run_dir, hostfile


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """In-process calls: offline, no planted Gaudi variables from the outer shell, token planted."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", SECRET)
    for name in ("GAUDI_SPAWN", "HABANA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)


def cli(capsys, *args) -> tuple[int, str]:
    from launch.cli import main

    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    out = cap.out + cap.err
    assert SECRET not in out
    return rc, out


# --------------------------------------------------------------------------------------------
# plan


def test_plan_json_llama3_70b_lora_fits_8_gaudi2_under_zero3_offline(plan_json):
    plan = json.loads(plan_json.stdout)  # the whole stdout is one JSON object
    assert PLAN_KEYS <= plan.keys()
    assert MEMORY_KEYS <= plan["memory_gib"].keys()
    assert plan["fits"] is True
    assert plan["zero_stage"] == 3
    assert plan["reference"] == "adapter"
    assert plan["offload"] in ("none", "optimizer", "optimizer+params")
    assert plan["world_size"] == 8
    assert plan["card_memory_gib"] == pytest.approx(94.62)
    assert 0 < plan["memory_gib"]["total"] <= 94.62
    assert plan["micro_batch_size"] >= 1 and plan["gradient_accumulation_steps"] >= 1
    assert isinstance(plan["gradient_checkpointing"], bool)


def test_plan_table_is_readable_and_keeps_the_token_secret(capsys):
    rc, out = cli(capsys, "plan", *LLAMA70)  # cli() asserts the planted token is not in the output
    assert rc == 0
    assert "FITS" in out and "ZeRO stage" in out and "total" in out


def test_plan_full_70b_on_8_cards_does_not_fit_and_names_the_smallest_fit():
    r = launch("plan", *LLAMA70, "--full")
    assert r.returncode == 3, r.stdout
    assert "DOES NOT FIT" in r.stdout
    assert "Smallest fit: 16 gaudi2 cards (2 nodes" in r.stdout


def test_train_full_70b_dry_run_exits_3_before_writing_anything(capsys, tmp_path):
    run_dir = tmp_path / "run"
    rc, out = cli(capsys, "train", *LLAMA70, "--full", "--dry-run", "--run_dir", run_dir)
    assert rc == 3
    assert "does not fit" in out and "16 gaudi2 cards (2 nodes" in out
    assert not (run_dir / "command.sh").exists()
    assert not (run_dir / "ds_config.json").exists()


@pytest.mark.parametrize("model", ["google/gemma-3-2b", "google/gemma-3-9b"])
def test_gemma3_sizes_that_do_not_exist(capsys, model):
    rc, out = cli(capsys, "plan", "--model", model)
    assert rc == 2
    assert "does not exist" in out
    for size in GEMMA3_REAL_SIZES:
        assert size in out


def test_gemma3_270m_fits_one_card_without_zero3(capsys):
    rc, out = cli(capsys, "plan", "--model", "google/gemma-3-270m", "--hardware", "gaudi2", "--cards", "1", "--json")
    assert rc == 0
    plan = json.loads(out)
    assert plan["fits"] is True and plan["zero_stage"] < 3 and plan["world_size"] == 1


def test_missing_model_is_a_usage_error(capsys):
    rc, out = cli(capsys, "plan", "--hardware", "gaudi2", "--cards", "8")
    assert rc == 2 and "no default models" in out
    rc, out = cli(capsys, "train", "--hardware", "cpu", "--cards", "1", "--dry-run")
    assert rc == 2 and "no default models" in out


@pytest.mark.parametrize("cards", ["0", "-1"])
def test_non_positive_cards_is_a_usage_error(capsys, cards):
    rc, out = cli(capsys, "plan", "--model", "google/gemma-3-270m", "--cards", cards)
    assert rc == 2 and "--cards" in out


def test_unknown_flags_exit_2(capsys):
    rc, out = cli(capsys, "plan", "--model", "google/gemma-3-270m", "--no_such_flag", "1")
    assert rc == 2 and "--no_such_flag" in out
    rc, out = cli(capsys, "train", "--model", "google/gemma-3-270m", "--hardware", "cpu", "--cards", "1", "--dry-run",
                  "--learning_rate", "1e-6")  # dpo_dist.dpo flags belong after a lone `--`
    assert rc == 2 and "--learning_rate" in out and "`--`" in out


def test_unknown_command_and_bad_choice_exit_2(capsys):
    rc, out = cli(capsys, "plna")
    assert rc == 2 and "unknown command" in out
    with pytest.raises(SystemExit) as e:
        cli(capsys, "plan", "--model", "google/gemma-3-270m", "--hardware", "tpu")
    assert e.value.code == 2


# --------------------------------------------------------------------------------------------
# train --dry-run, one node


def test_train_dry_run_single_node_writes_the_run_dir(single_node):
    r, run_dir = single_node
    assert r.returncode == 0, r.stdout
    for name in ("plan.json", "ds_config.json", "command.sh"):
        assert (run_dir / name).is_file(), name
    assert not (run_dir / ".deepspeed_env").exists()
    assert "dry run: not launched" in r.stdout
    sh = run_dir / "command.sh"
    assert subprocess.run(["bash", "-n", str(sh)], capture_output=True).returncode == 0
    text = sh.read_text()
    assert "PT_HPU_LAZY_MODE=1" in text and "PT_ENABLE_INT64_SUPPORT=1" in text
    argv = exec_argv(sh)
    # Without GAUDI_SPAWN: optimum-habana's launcher from the wheel (`python -m launch.gaudi_spawn`, which
    # builds `deepspeed --num_nodes 1 --num_gpus 8 --no_local_rank`), or that deepspeed command directly.
    if argv[0] == "deepspeed":
        assert argv[:5] == ["deepspeed", "--num_nodes", "1", "--num_gpus", "8"] and "--no_local_rank" in argv
    else:
        i = argv.index("--world_size")
        assert argv[0] == "python" and argv[i:i + 3] == ["--world_size", "8", "--use_deepspeed"], argv
        assert "gaudi_spawn" in " ".join(argv[:i])
    assert command_line(r.stdout) == argv  # what is printed is what command.sh runs


def test_train_dry_run_ds_config_and_dpo_args_carry_the_plan(single_node):
    r, run_dir = single_node
    assert r.returncode == 0, r.stdout
    plan = json.loads((run_dir / "plan.json").read_text())
    ds = json.loads((run_dir / "ds_config.json").read_text())
    micro, ga, world = plan["micro_batch_size"], plan["gradient_accumulation_steps"], plan["world_size"]
    assert world == 8
    assert ds["zero_optimization"]["stage"] == plan["zero_stage"] == 3
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert ds["train_micro_batch_size_per_gpu"] == micro
    assert ds["gradient_accumulation_steps"] == ga
    assert ds["train_batch_size"] == micro * ga * world
    argv = exec_argv(run_dir / "command.sh")
    assert value_after(argv, "--per_device_train_batch_size") == str(micro)
    assert value_after(argv, "--gradient_accumulation_steps") == str(ga)
    assert value_after(argv, "--deepspeed") == str(run_dir / "ds_config.json")
    assert value_after(argv, "--model_name_or_path") == "meta-llama/Llama-3-70B"
    assert "--use_peft" in argv


def test_train_dry_run_through_gaudi_spawn(tmp_path):
    run_dir = tmp_path / "run"
    r = launch("train", *LLAMA70, "--dry-run", "--run_dir", run_dir, GAUDI_SPAWN="/opt/x/gaudi_spawn.py")
    assert r.returncode == 0, r.stdout
    words = command_line(r.stdout)
    assert words[:5] == ["python", "/opt/x/gaudi_spawn.py", "--world_size", "8", "--use_deepspeed"]
    assert exec_argv(run_dir / "command.sh") == words
    plan = json.loads((run_dir / "plan.json").read_text())
    assert value_after(words, "--per_device_train_batch_size") == str(plan["micro_batch_size"])
    assert_no_secret_in_files(run_dir)


# --------------------------------------------------------------------------------------------
# train --dry-run, two nodes


def test_train_dry_run_multi_node(multi_node):
    r, run_dir, hostfile = multi_node
    assert r.returncode == 0, r.stdout
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["world_size"] == 16 and plan["nodes"] == 2
    sh = run_dir / "command.sh"
    assert subprocess.run(["bash", "-n", str(sh)], capture_output=True).returncode == 0
    argv = exec_argv(sh)
    assert argv[:3] == ["deepspeed", "--hostfile", str(hostfile.resolve())]
    assert value_after(argv, "--master_addr") == "gaudi-node-0"
    assert "--no_local_rank" in argv
    assert command_line(r.stdout) == argv
    ds_env = run_dir / ".deepspeed_env"
    assert ds_env.is_file()
    lines = ds_env.read_text().splitlines()
    assert "PT_HPU_LAZY_MODE=1" in lines and "PT_ENABLE_INT64_SUPPORT=1" in lines
    assert f"export DS_ENV_FILE={ds_env.resolve()}" in sh.read_text().splitlines()
    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert ds["train_batch_size"] == plan["micro_batch_size"] * plan["gradient_accumulation_steps"] * 16


# --------------------------------------------------------------------------------------------
# secrets


def test_planted_token_is_never_printed_or_written(plan_json, single_node, multi_node):
    # launch() already asserted that no stdout/stderr contained it; check every written file.
    assert_no_secret_in_files(single_node[1], multi_node[1])
    assert SECRET not in plan_json.stdout
    for r in (single_node[0], multi_node[0]):
        assert r.returncode == 0 and SECRET not in r.stdout
    assert "HF_TOKEN" not in (multi_node[1] / ".deepspeed_env").read_text()


def test_naming_the_token_for_the_nodes_is_refused(capsys, tmp_path):
    hostfile = write_hostfile(tmp_path / "hosts.txt", "gaudi-node-0 slots=8\ngaudi-node-1 slots=8\n")
    run_dir = tmp_path / "run"
    rc, out = cli(capsys, "train", *LLAMA70, "--hostfile", hostfile, "--env", "HF_TOKEN", "--dry-run", "--run_dir", run_dir)
    assert rc == 2
    assert "HF_TOKEN" in out and "secret" in out
    assert not (run_dir / "command.sh").exists() and not (run_dir / ".deepspeed_env").exists()
    assert_no_secret_in_files(tmp_path)


# --------------------------------------------------------------------------------------------
# hostfile errors through train


def test_hostfile_slots_mismatch_names_the_line(capsys, tmp_path):
    hostfile = write_hostfile(tmp_path / "hosts.txt", "# nodes\ngaudi-node-0 slots=8\ngaudi-node-1 slots=4\n")
    rc, out = cli(capsys, "train", *LLAMA70, "--hostfile", hostfile, "--dry-run", "--run_dir", tmp_path / "run")
    assert rc == 2
    assert f"{hostfile}:3:" in out and "slots=4" in out and "8 cards per node" in out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("host,column", [("a;touch X", 2), ("$(touch X)", 1), ("`touch X`", 1), ("a|touch", 2),
                                         ("a&&touch", 2), ("node'x", 5), ("a>X", 2)])
def test_hostile_hostnames_are_refused_and_nothing_runs(capsys, monkeypatch, tmp_path, host, column):
    monkeypatch.chdir(tmp_path)
    hostfile = write_hostfile(tmp_path / "hosts.txt", f"gaudi-node-0 slots=8\n{host} slots=8\n")
    rc, out = cli(capsys, "train", *LLAMA70, "--hostfile", hostfile, "--dry-run", "--run_dir", tmp_path / "run")
    assert rc == 2 and f"hosts.txt:2:{column}: invalid host" in out, out
    assert not (tmp_path / "X").exists() and not (ROOT / "X").exists()
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------
# Makefile


def test_make_plan_without_model_fails_before_any_install(tmp_path):
    """`require-model` runs before `$(STAMP)`: with a stamp that does not exist and a Python that
    always fails, reaching the install recipe would print a different error."""
    env = launch_env()
    r = subprocess.run(["make", "-s", "plan", f"STAMP={tmp_path}/never-installed", "PY=/bin/false", "PYTHON=/bin/false"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "MODEL is required" in out and "no default models" in out
    assert "pip" not in out and "/bin/false" not in out
    # And the order in the recipe listing: the MODEL check comes before any install step.
    dry = subprocess.run(["make", "-n", "plan", f"STAMP={tmp_path}/never-installed"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60).stdout.splitlines()
    check = next(i for i, ln in enumerate(dry) if "MODEL is required" in ln)
    installs = [i for i, ln in enumerate(dry) if "pip install" in ln or " -m venv " in ln]
    assert installs and check < min(installs)


# --------------------------------------------------------------------------------------------
# doctor


def test_doctor_cpu_passes_in_this_venv_and_lists_versions():
    r = launch("doctor", "--hardware", "cpu")
    assert r.returncode == 0, r.stdout
    from launch.pins import checked_pins

    for dist, version in checked_pins(gaudi=False).items():
        assert f"[ OK ] {dist}: {version}" in r.stdout
    assert "HF_TOKEN: set" in r.stdout
    assert "all required checks passed" in r.stdout


def test_doctor_gaudi2_reports_lazy_mode_0_and_fails(capsys, monkeypatch):
    monkeypatch.setenv("PT_HPU_LAZY_MODE", "0")
    rc, out = cli(capsys, "doctor", "--hardware", "gaudi2", "--cards", "8")
    assert rc == 1
    line = next(ln for ln in out.splitlines() if "PT_HPU_LAZY_MODE:" in ln)
    assert line.lstrip().startswith("[FAIL]") and "'0'" in line and "1.21" in line
    assert "export PT_HPU_LAZY_MODE=1" in out


def _doctor(**kw) -> tuple[int, str]:
    from launch.doctor import run_doctor

    buf = io.StringIO()
    rc = run_doctor(out=buf, **kw)
    return rc, buf.getvalue()


def test_doctor_loopback_hostfile_resolves_and_reports_ssh_clearly(tmp_path):
    hostfile = write_hostfile(tmp_path / "hosts.txt", "localhost slots=1\n127.0.0.1 slots=1\n")
    with socket.socket() as s:  # a port nothing listens on: refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc, out = _doctor(hardware="cpu", hostfile=str(hostfile), cards=1, ssh_port=port,
                      environ={"HF_TOKEN": SECRET})
    assert rc == 0, out  # loopback hosts need no sshd (CPU multi-node uses --no_ssh)
    for host in ("localhost", "127.0.0.1"):
        line = next(ln for ln in out.splitlines() if f": {host}:" in ln)
        assert "resolves to" in line and "127.0.0.1" in line and "not reachable" in line and f"port {port}" in line
    assert "HF_TOKEN: set" in out and SECRET not in out


def test_doctor_hostfile_errors_show_line_and_column(tmp_path):
    hostfile = write_hostfile(tmp_path / "hosts.txt", "localhost slots=1\nnode-1 slots\n")
    rc, out = _doctor(hardware="cpu", hostfile=str(hostfile), cards=1, environ={})
    assert rc == 1 and f"{hostfile}:2:8: malformed slots" in out and "slots=N" in out


def test_doctor_sees_a_real_ssh_banner_and_an_unresolvable_host(tmp_path):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    port = server.getsockname()[1]

    def serve():
        for _ in range(2):
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"SSH-2.0-OpenSSH_test\r\n")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        hostfile = write_hostfile(tmp_path / "hosts.txt", "127.0.0.1 slots=1\nno-such-host.invalid slots=1\n")
        rc, out = _doctor(hardware="cpu", hostfile=str(hostfile), cards=1, ssh_port=port, environ={})
    finally:
        server.close()
    line = next(ln for ln in out.splitlines() if ": 127.0.0.1:" in ln)
    assert line.lstrip().startswith("[ OK ]") and "SSH-2.0-OpenSSH_test" in line
    bad = next(ln for ln in out.splitlines() if "no-such-host.invalid:" in ln)
    assert bad.lstrip().startswith("[FAIL]") and "does not resolve" in bad
    assert rc == 1


def test_doctor_more_cards_than_visible_names_the_visible_count():
    from launch.doctor import collect_checks

    checks = collect_checks(hardware="gaudi2", cards=8, environ={"PT_HPU_LAZY_MODE": "1", "PT_ENABLE_INT64_SUPPORT": "1",
                                                                 "HABANA_VISIBLE_DEVICES": "0,1,2,3"},
                            run_tool=lambda argv: "0\n1\n2\n3\n4\n5\n6\n7\n" if argv[0] == "hl-smi" else None)
    by = {c.name: c for c in checks}
    assert by["PT_HPU_LAZY_MODE"].status == "ok"
    assert by["visible cards"].status == "fail" and "only 4" in by["visible cards"].detail
    assert "--cards 4" in by["visible cards"].fix
    checks = collect_checks(hardware="gaudi3", cards=8, environ={"PT_HPU_LAZY_MODE": "1"},
                            run_tool=lambda argv: "\n".join(map(str, range(8))) + "\n")
    assert {c.name: c for c in checks}["visible cards"].status == "ok"
    checks = collect_checks(hardware="cuda", cards=2, environ={},
                            run_tool=lambda argv: "GPU 0: H100 (UUID: GPU-x)\n" if argv[0] == "nvidia-smi" else None)
    vis = {c.name: c for c in checks}["visible cards"]
    assert vis.status == "fail" and "only 1" in vis.detail


def test_doctor_version_rules():
    from launch.doctor import collect_checks, version_status
    from launch.pins import checked_pins

    GAUDI_PINS = checked_pins(gaudi=True)

    assert version_status("2.13.0+cpu", "2.13.0") == "ok"
    assert version_status("0.17.1", "0.17.0") == "warn"
    assert version_status("0.22.2", "0.9.6") == "fail"
    assert version_status(None, "1.0.0") == "fail"
    assert version_status("4.55.4", "4.55.*") == "ok"
    assert version_status("4.56.0", "4.55.*") == "fail"
    gaudi = dict(GAUDI_PINS, deepspeed="0.16.1+hpu.synapse.v1.22.0", torch="2.7.1a0")
    checks = collect_checks(hardware="gaudi2", environ={}, version_of=lambda d: gaudi.get(d, "").replace("*", "0") or None,
                            run_tool=lambda argv: None)
    by = {(c.section, c.name): c for c in checks}
    assert all(by[("versions", d)].status == "ok" for d in GAUDI_PINS)
    assert by[("versions", "deepspeed")].status == "ok"
    pypi = dict(gaudi, deepspeed="0.19.8")
    checks = collect_checks(hardware="gaudi2", environ={}, version_of=pypi.get, run_tool=lambda argv: None)
    ds = {(c.section, c.name): c for c in checks}[("versions", "deepspeed")]
    assert ds.status == "fail" and "HabanaAI/DeepSpeed" in ds.fix


def test_doctor_never_prints_env_values():
    environ = {"HF_TOKEN": SECRET, "HUGGING_FACE_HUB_TOKEN": SECRET + "2", "PT_HPU_LAZY_MODE": "1",
               "MY_API_KEY": SECRET + "3"}
    rc, out = _doctor(hardware="gaudi2", environ=environ)
    assert SECRET not in out
    assert "HF_TOKEN: set" in out and "huggingface-cli login" in out


def test_batch_flags_after_double_dash_win_and_the_ds_config_follows(tmp_path):
    import launch.cli as cli

    a = cli.TrainArguments(model="google/gemma-3-270m", hardware="cpu", cards=2, run_dir=str(tmp_path / "run"))
    run = cli.prepare_run(a, ["--per_device_train_batch_size", "3", "--gradient_accumulation_steps=2"], environ={})
    plan = run.plan
    ds = json.loads((run.run_dir / "ds_config.json").read_text())
    assert (plan.micro_batch_size, plan.gradient_accumulation_steps) == (3, 2)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (3, 2, 12)
    with pytest.raises(cli.LaunchError, match="positive integer"):
        cli.apply_batch_overrides(plan, ["--per_device_train_batch_size", "0"])


# --------------------------------------------------------------------------- #
# Batch shaping the plan turns on (packing, buckets, the reference cache)
# --------------------------------------------------------------------------- #

def test_cpu_train_dry_run_packs_buckets_and_caches_by_default(capsys, tmp_path, tiny_assets):
    """On cpu/cuda the plan packs micro-batches into <= 8 bucket totals, sized by the data's measured
    tokens per pair, and takes the reference from the cache; the ranks get the flags."""
    run_dir = tmp_path / "run"
    rc, out = cli(capsys, "train", "--model", tiny_assets.llama_dir, "--hardware", "cpu", "--cards", "2", "--full",
                  "--max_length", 256, "--max_prompt_length", 128, "--dry-run", "--run_dir", run_dir, "--",
                  "--dataset_name", tiny_assets.data_dir, "--max_train_samples", 64)
    assert rc == 0, out
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["packing"] and plan["length_buckets"] == 8 and plan["reference"] == "precomputed"
    note = next(n for n in plan["notes"] if n.startswith("data: "))
    assert "64 training pairs" in note and "tokens per pair on average" in note
    assert plan["micro_batch_size"] <= 32  # 64 pairs over 2 ranks: no micro-batch repeats pairs
    assert "micro-batch packed into one row, padded to <= 8 bucket totals" in out
    argv = exec_argv(run_dir / "command.sh")
    assert "--packing" in argv and value_after(argv, "--length_buckets") == "8"
    assert value_after(argv, "--reference") == "precomputed"


def test_packing_can_be_turned_off_after_the_dashes_and_gaudi_packs_with_a_block_mask(capsys, tmp_path):
    run_dir = tmp_path / "run"
    rc, out = cli(capsys, "train", "--model", "google/gemma-3-270m", "--hardware", "cpu", "--cards", "1",
                  "--dry-run", "--run_dir", run_dir, "--", "--attn_implementation", "eager", "--length_buckets", "0")
    assert rc == 0, out
    argv = exec_argv(run_dir / "command.sh")
    assert "--packing" not in argv and value_after(argv, "--length_buckets") == "0"
    note = next(n for n in json.loads((run_dir / "plan.json").read_text())["notes"] if n.startswith("token lengths"))
    assert "not a local path" in note  # a hub dataset is not read by the launcher
    rc, out = cli(capsys, "train", *LLAMA70, "--dry-run", "--run_dir", tmp_path / "g")
    argv = exec_argv(tmp_path / "g" / "command.sh")
    assert rc == 0 and "--packing" in argv and value_after(argv, "--length_buckets") == "8"
    assert "packed into one row, padded to <= 8 bucket totals" in out and "block-diagonal mask" in out


def test_bad_pair_tokens_is_a_usage_error(capsys):
    rc, out = cli(capsys, "plan", "--model", "google/gemma-3-270m", "--hardware", "cpu", "--cards", "1",
                  "--pair_tokens", "lots")
    assert rc == 2 and "--pair_tokens 'lots': expected MEAN,MAX" in out
    rc, out = cli(capsys, "plan", "--model", "google/gemma-3-270m", "--hardware", "cpu", "--cards", "1",
                  "--pair_tokens", "500,2000")
    assert rc == 0 and "data: --pair_tokens 500,2000" in out


def test_plan_sizes_the_lora_given_after_the_dashes(capsys):
    """The plan sizes (and prints) the LoRA the ranks will train: their defaults, or --lora_r /
    --lora_target_modules given after `--`; a target the model lacks is a usage error naming it."""
    from launch.cli import main

    assert main(["plan", *LLAMA70, "--", "--lora_r", "8", "--lora_target_modules=q_proj,v_proj"]) == 0
    assert "LoRA r=8 on q_proj, v_proj:" in capsys.readouterr().out
    assert main(["plan", *LLAMA70]) == 0
    assert "LoRA r=16 on q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj:" in capsys.readouterr().out
    assert main(["plan", *LLAMA70, "--", "--lora_target_modules", "foo"]) == 2
    assert "unknown LoRA target module 'foo'" in capsys.readouterr().err
