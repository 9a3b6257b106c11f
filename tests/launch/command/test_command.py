"""launch/command/ (builder.py and its launcher builders) and quoting.py: golden launch commands, .deepspeed_env,
command.sh, injection and secrets.

Fast and pure apart from a few `bash` runs of rendered scripts whose launcher is replaced by a
harmless stand-in program (a `python -c` that records its argv), in a temporary directory.
DeepSpeed and optimum-habana sources are used as oracles: the argv we build must parse with the
installed DeepSpeed runner's own argparse, must match what optimum-habana's DistributedRunner
builds, and words we let through must survive the re-joining those tools do.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from conftest import ROOT
from dpo_dist.util.logs import is_secret_name
from launch.command.builder import (
    CommandError,
    LaunchCommand,
    build_launch_command,
    format_command,
    render_command_sh,
    render_deepspeed_env,
)
from launch.command.hostfile import HostEntry, is_loopback, parse_hostfile
from launch.command.quoting import PDSH_SAFE_CHARS, QuotingError, check_reshell_safe, quote
from launch.doctor import is_loopback as doctor_is_loopback
from launch.gaudi_spawn import parse_args

REPO = ROOT
GAUDI_2X8 = REPO / "hostfiles" / "gaudi_2x8.txt"
LOOPBACK = REPO / "hostfiles" / "cpu_loopback_2x1.txt"
PLANTED = "hf_PLANTEDtokenVALUE0123456789abcdef"
ARGS = ["--model_name_or_path", "meta-llama/Llama-3-70B", "--use_peft", "--output_dir", "runs/a b"]
SPAWN = "/opt/optimum-habana/examples/gaudi_spawn.py"

HOSTILE = [
    "x; touch X",
    "$(touch X)",
    "`touch X`",
    "a && touch X",
    "a || touch X",
    "a | tee X",
    "> X",
    "a'b\"c",
    "'; touch X; echo '",
    "$HOME ${PATH} $0 $1",
    "* ? [a-z] ~ ~root",
    "!! !$",
    "#not-a-comment",
    "back\\slash \\$(touch X)",
    "--model_name_or_path=$(touch X)",
    "",
    " leading and trailing ",
    "ünïcödé 模型",
    "-",
    "%n %h",
]


def gaudi_hosts():
    return parse_hostfile(GAUDI_2X8, expected_slots=8)


def loop_hosts():
    return parse_hostfile(LOOPBACK, expected_slots=1)


def hpu_multi(**kw):
    kw.setdefault("environ", {})
    return build_launch_command("gaudi2", 8, gaudi_hosts(), ARGS, hostfile_path=str(GAUDI_2X8), **kw)


# ------------------------------------------------------------------------------- golden argv


def test_hpu_single_node_gaudi_spawn():
    cmd = build_launch_command("gaudi2", 8, None, ARGS, master_port=29611, environ={"GAUDI_SPAWN": SPAWN})
    assert cmd.argv == ["python", SPAWN, "--world_size", "8", "--use_deepspeed", "--master_port", "29611",
                        "dpo_dist/dpo.py"] + ARGS
    assert cmd.env == {"PT_HPU_LAZY_MODE": "1", "PT_ENABLE_INT64_SUPPORT": "1"}
    assert cmd.deepspeed_env == {} and cmd.per_node == []
    assert (cmd.launcher, cmd.hardware, cmd.world_size, cmd.num_nodes) == ("gaudi_spawn", "hpu", 8, 1)
    assert "deepspeed --num_nodes 1 --num_gpus 8 --no_local_rank --master_port 29611" in cmd.description


def test_hpu_single_node_without_gaudi_spawn_uses_the_same_launcher_from_the_wheel():
    cmd = build_launch_command("gaudi3", 8, None, ARGS, environ={}, python="python")
    assert cmd.argv == ["python", "-m", "launch.gaudi_spawn", "--world_size", "8", "--use_deepspeed", "--master_port",
                        "29500", "dpo_dist/dpo.py"] + ARGS
    assert cmd.env == {"PT_HPU_LAZY_MODE": "1", "PT_ENABLE_INT64_SUPPORT": "1"}
    assert "GAUDI_SPAWN is not set" in cmd.description


def test_hpu_ddp_plan_starts_ranks_with_mpi_like_the_upstream_dpo_baseline():
    """A plan without DeepSpeed (ZeRO-0 on Gaudi) goes through gaudi_spawn --use_mpi; one card is a plain process."""
    cmd = build_launch_command("gaudi2", 8, None, ARGS, master_port=29611, environ={"GAUDI_SPAWN": SPAWN},
                               deepspeed=False)
    assert cmd.argv == ["python", SPAWN, "--world_size", "8", "--use_mpi", "--master_port", "29611",
                        "dpo_dist/dpo.py"] + ARGS
    assert "--deepspeed" not in cmd.argv and "mpirun -n 8" in cmd.description
    a = parse_args(cmd.argv[2:])
    assert a.use_mpi and not a.use_deepspeed and a.world_size == 8
    one = build_launch_command("gaudi2", 1, None, ARGS, environ={}, deepspeed=False)
    assert one.argv[:6] == ["python", "-m", "launch.gaudi_spawn", "--world_size", "1", "--master_port"]


def test_plan_environment_goes_to_every_rank_and_the_users_value_wins():
    zero3 = {"PT_HPU_MAX_COMPOUND_OP_SIZE": "1000", "PT_HPU_POOL_MEM_ACQUIRE_PERC": "100"}
    cmd = build_launch_command("gaudi2", 8, None, ARGS, environ={"PT_HPU_POOL_MEM_ACQUIRE_PERC": "90"}, plan_env=zero3)
    assert cmd.env["PT_HPU_MAX_COMPOUND_OP_SIZE"] == "1000" and cmd.env["PT_HPU_POOL_MEM_ACQUIRE_PERC"] == "90"
    multi = hpu_multi(plan_env=zero3, workdir="/work/main")
    assert multi.deepspeed_env["PT_HPU_MAX_COMPOUND_OP_SIZE"] == "1000"  # pdsh does not carry it: .deepspeed_env does


def test_launch_gaudi_spawn_parses_like_upstream_gaudi_spawn():
    a = parse_args(["--world_size", "8", "--use_deepspeed", "--master_port", "29501", "dpo_dist/dpo.py", *ARGS])
    assert (a.world_size, a.use_deepspeed, a.master_port, a.training_script) == (8, True, 29501, "dpo_dist/dpo.py")
    assert a.training_script_args == ARGS


def test_hpu_single_node_deepspeed_launcher_is_what_gaudi_spawn_builds():
    cmd = build_launch_command("gaudi3", 8, None, ARGS, launcher="deepspeed", environ={})
    assert cmd.argv == ["deepspeed", "--num_nodes", "1", "--num_gpus", "8", "--master_port", "29500",
                        "--no_local_rank", "--module", "dpo_dist.dpo"] + ARGS


def test_hpu_lazy_mode_forced_even_if_environment_says_0():
    cmd = build_launch_command("hpu", 2, None, ARGS, environ={"PT_HPU_LAZY_MODE": "0"})
    assert cmd.env["PT_HPU_LAZY_MODE"] == "1"
    assert "was '0'" in cmd.description


def test_hpu_multi_node():
    environ = {"PT_HPU_MAX_COMPOUND_OP_SIZE": "16", "HCCL_SOCKET_IFNAME": "eth0", "HCCL_OVER_OFI": "1",
               "HF_HUB_OFFLINE": "1", "UNRELATED": "x", "HF_TOKEN": PLANTED}
    cmd = hpu_multi(environ=environ, master_port=29700, ssh_port=3022, extra_env_names=["HF_HUB_OFFLINE"],
                    deepspeed_env_path="/runs/r1/.deepspeed_env", workdir="/work/main")
    assert cmd.argv == ["deepspeed", "--hostfile", str(GAUDI_2X8), "--master_addr", "gaudi-node-0",
                        "--master_port", "29700", "--ssh_port", "3022", "--no_local_rank", "--module",
                        "dpo_dist.dpo"] + ARGS
    assert cmd.deepspeed_env == {
        "PT_HPU_LAZY_MODE": "1",
        "PT_ENABLE_INT64_SUPPORT": "1",
        "HCCL_OVER_OFI": "1",
        "HCCL_SOCKET_IFNAME": "eth0",
        "PT_HPU_MAX_COMPOUND_OP_SIZE": "16",
        "HF_HUB_OFFLINE": "1",
    }
    assert cmd.env == {"PT_HPU_LAZY_MODE": "1", "PT_ENABLE_INT64_SUPPORT": "1",
                       "DS_ENV_FILE": "/runs/r1/.deepspeed_env"}
    assert (cmd.world_size, cmd.num_nodes, cmd.master_addr) == (16, 2, "gaudi-node-0")
    assert "huggingface-cli login" in cmd.description
    assert render_deepspeed_env(cmd.deepspeed_env) == (
        "PT_HPU_LAZY_MODE=1\nPT_ENABLE_INT64_SUPPORT=1\nHCCL_OVER_OFI=1\nHCCL_SOCKET_IFNAME=eth0\n"
        "PT_HPU_MAX_COMPOUND_OP_SIZE=16\nHF_HUB_OFFLINE=1\n"
    )


def test_hpu_multi_node_without_ssh_port_or_env_path():
    cmd = hpu_multi(workdir="/work/main")
    assert cmd.argv == ["deepspeed", "--hostfile", str(GAUDI_2X8), "--master_addr", "gaudi-node-0",
                        "--master_port", "29500", "--no_local_rank", "--module", "dpo_dist.dpo"] + ARGS
    assert "DS_ENV_FILE" not in cmd.env


def test_cuda_single_node_deepspeed_and_torchrun():
    cmd = build_launch_command("cuda", 4, None, ARGS, environ={})
    assert cmd.argv == ["deepspeed", "--num_gpus", "4", "--master_port", "29500", "--no_local_rank",
                        "--module", "dpo_dist.dpo"] + ARGS
    assert cmd.env == {} and cmd.deepspeed_env == {}
    tr = build_launch_command("cuda", 4, None, ARGS, launcher="torchrun", master_port=29555, environ={})
    assert tr.argv == ["torchrun", "--nproc_per_node", "4", "--master_port", "29555", "-m", "dpo_dist.dpo"] + ARGS


def test_cuda_visible_devices_become_include():
    cmd = build_launch_command("cuda", 2, None, ARGS, environ={"CUDA_VISIBLE_DEVICES": "2,3"})
    assert cmd.argv[:5] == ["deepspeed", "--include", "localhost:2,3", "--master_port", "29500"]
    with pytest.raises(CommandError, match="makes 3 GPU"):
        build_launch_command("cuda", 2, None, ARGS, environ={"CUDA_VISIBLE_DEVICES": "0,1,2"})
    with pytest.raises(CommandError, match="not a list of device numbers"):
        build_launch_command("cuda", 1, None, ARGS, environ={"CUDA_VISIBLE_DEVICES": "GPU-1234"})


def test_cpu_single_node_deepspeed_and_torchrun():
    cmd = build_launch_command("cpu", 2, None, ARGS, environ={}, cpu_count=16)
    assert cmd.argv == ["deepspeed", "--num_accelerators", "2", "--master_port", "29500", "--no_local_rank",
                        "--module", "dpo_dist.dpo"] + ARGS
    assert cmd.env == {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "8"}
    tr = build_launch_command("cpu", 2, None, ARGS, launcher="torchrun", environ={}, cpu_count=1)
    assert tr.argv == ["torchrun", "--nproc_per_node", "2", "--master_port", "29500", "-m", "dpo_dist.dpo"] + ARGS
    assert tr.env == {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    user = build_launch_command("cpu", 2, None, ARGS, environ={"OMP_NUM_THREADS": "3"}, cpu_count=16)
    assert user.env["OMP_NUM_THREADS"] == "3"


def test_cpu_multi_node_loopback_one_command_per_node():
    cmd = build_launch_command("cpu", 1, loop_hosts(), ARGS, hostfile_path=str(LOOPBACK), master_port=29601,
                               environ={}, cpu_count=8)
    assert cmd.argv == []
    assert cmd.per_node == [
        ["deepspeed", "--hostfile", str(LOOPBACK), "--no_ssh", "--node_rank", str(r), "--master_addr", "127.0.0.1",
         "--master_port", "29601", "--no_local_rank", "--module", "dpo_dist.dpo"] + ARGS
        for r in (0, 1)
    ]
    # both "nodes" share this machine: 8 cores / 2 ranks
    assert cmd.env == {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "4"}
    assert cmd.deepspeed_env == {}
    assert (cmd.world_size, cmd.num_nodes, cmd.master_addr) == (2, 2, "127.0.0.1")
    assert cmd.commands == cmd.per_node


def test_cpu_multi_node_torchrun_and_pdsh_variants():
    tr = build_launch_command("cpu", 1, loop_hosts(), ARGS, launcher="torchrun", environ={}, cpu_count=2)
    assert tr.per_node[1] == ["torchrun", "--nnodes", "2", "--node_rank", "1", "--nproc_per_node", "1",
                              "--master_addr", "127.0.0.1", "--master_port", "29500", "-m", "dpo_dist.dpo"] + ARGS
    pd = build_launch_command("cpu", 1, loop_hosts(), ARGS, hostfile_path=str(LOOPBACK), no_ssh=False,
                              ssh_port=2222, environ={}, cpu_count=2, workdir="/work/main")
    assert pd.argv == ["deepspeed", "--hostfile", str(LOOPBACK), "--master_addr", "127.0.0.1", "--master_port",
                       "29500", "--ssh_port", "2222", "--no_local_rank", "--module", "dpo_dist.dpo"] + ARGS
    assert pd.deepspeed_env == {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def test_ds_config_is_appended_once():
    cmd = build_launch_command("cpu", 1, None, ["--use_peft"], ds_config="runs/r1/ds_config.json", environ={})
    assert cmd.argv[-3:] == ["--use_peft", "--deepspeed", "runs/r1/ds_config.json"]
    with pytest.raises(CommandError, match="already have --deepspeed"):
        build_launch_command("cpu", 1, None, ["--deepspeed", "x.json"], ds_config="y.json", environ={})


# ------------------------------------------------------------ agreement with the real tools


def _ds_parse(argv):
    runner = pytest.importorskip("deepspeed.launcher.runner")
    assert argv[0] == "deepspeed"
    return runner.parse_args(argv[1:])


def test_every_deepspeed_argv_parses_with_the_installed_runner():
    a = _ds_parse(build_launch_command("cpu", 2, None, ARGS, environ={}).argv)
    assert (a.num_gpus, a.module, a.no_local_rank, a.user_script, a.user_args) == (2, True, True, "dpo_dist.dpo", ARGS)
    a = _ds_parse(build_launch_command("gaudi2", 8, None, ARGS, launcher="deepspeed", environ={}).argv)
    assert (a.num_nodes, a.num_gpus, a.master_port, a.no_local_rank) == (1, 8, 29500, True)
    a = _ds_parse(build_launch_command("cuda", 2, None, ARGS, environ={"CUDA_VISIBLE_DEVICES": "4,5"}).argv)
    assert a.include == "localhost:4,5"
    a = _ds_parse(hpu_multi(ssh_port=3022, workdir="/w").argv)
    assert (a.hostfile, a.master_addr, a.ssh_port, a.no_ssh, a.user_args) == (str(GAUDI_2X8), "gaudi-node-0", 3022, False, ARGS)
    per = build_launch_command("cpu", 1, loop_hosts(), ARGS, hostfile_path=str(LOOPBACK), environ={}).per_node
    for r, argv in enumerate(per):
        a = _ds_parse(argv)
        # runner.main asserts 0 <= node_rank < len(hosts) under --no_ssh and needs --master_addr,
        # otherwise it would ssh to the first host for `hostname -I`.
        assert (a.no_ssh, a.node_rank, a.master_addr, a.num_gpus) == (True, r, "127.0.0.1", -1)
        assert a.user_script == "dpo_dist.dpo" and a.user_args == ARGS


def test_torchrun_argv_parses_with_torch():
    run = pytest.importorskip("torch.distributed.run")
    argv = build_launch_command("cpu", 1, loop_hosts(), ARGS, launcher="torchrun", environ={}).per_node[1]
    a = run.get_args_parser().parse_args(argv[1:])
    assert (a.nnodes, a.node_rank, a.nproc_per_node, a.master_addr, a.module) == ("2", 1, "1", "127.0.0.1", True)
    assert a.training_script == "dpo_dist.dpo" and a.training_script_args == ARGS


@pytest.fixture
def distributed_runner(monkeypatch):
    """optimum-habana 1.21.2's DistributedRunner, loaded from its file with a stub for
    `optimum.utils.logging` (importing `optimum.habana` needs habana_frameworks)."""
    spec = importlib.util.find_spec("optimum")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("optimum-habana not installed")
    path = None
    for base in spec.submodule_search_locations:
        cand = Path(base) / "habana" / "distributed" / "distributed_runner.py"
        if cand.exists():
            path = cand
    if path is None:
        pytest.skip("optimum-habana's distributed_runner.py not found")
    log = types.ModuleType("optimum.utils.logging")
    log.INFO = 20
    log.get_logger = lambda name=None: types.SimpleNamespace(warning=lambda *a, **k: None, error=lambda *a, **k: None)
    for fn in ("set_verbosity", "enable_default_handler", "enable_explicit_format"):
        setattr(log, fn, lambda *a, **k: None)
    utils = types.ModuleType("optimum.utils")
    utils.logging = log
    monkeypatch.setitem(sys.modules, "optimum.utils", utils)
    monkeypatch.setitem(sys.modules, "optimum.utils.logging", log)
    mspec = importlib.util.spec_from_file_location("_oh_distributed_runner", path)
    mod = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(mod)
    return mod.DistributedRunner


def test_fallback_and_multinode_match_distributed_runner(distributed_runner, tmp_path):
    # one node: gaudi_spawn --world_size 8 --use_deepspeed --master_port P
    dr = distributed_runner(command_list=["x"], world_size=8, use_deepspeed=True, master_port=29611)
    theirs = _ds_parse(dr._interpreter.split() + ["dpo_dist/dpo.py"])
    ours = _ds_parse(build_launch_command("gaudi2", 8, None, [], master_port=29611, launcher="deepspeed",
                                          environ={}).argv)
    for f in ("num_nodes", "num_gpus", "no_local_rank", "master_port", "hostfile", "master_addr", "no_ssh", "force_multi"):
        assert getattr(ours, f) == getattr(theirs, f), f
    # several nodes: DistributedRunner reads the hostfile itself, and cannot read comments ...
    with pytest.raises(ValueError):
        distributed_runner(command_list=["x"], hostfile=str(GAUDI_2X8), use_deepspeed=True)
    plain = tmp_path / "hosts"
    plain.write_text("gaudi-node-0 slots=8\ngaudi-node-1 slots=8\n")
    dr = distributed_runner(command_list=["x"], hostfile=str(plain), use_deepspeed=True, master_port=29612)
    theirs = _ds_parse(dr._interpreter.split() + ["dpo_dist/dpo.py"])
    ours = _ds_parse(build_launch_command("gaudi2", 8, parse_hostfile(plain), [], hostfile_path=str(plain),
                                          master_port=29612, environ={}, workdir="/w").argv)
    for f in ("hostfile", "master_addr", "no_local_rank", "master_port", "num_nodes", "num_gpus", "no_ssh", "force_multi"):
        assert getattr(ours, f) == getattr(theirs, f), f
    # ... which is why multi-node never goes through gaudi_spawn
    with pytest.raises(CommandError, match="process_hostfile"):
        build_launch_command("gaudi2", 8, gaudi_hosts(), [], launcher="gaudi_spawn", hostfile_path=str(GAUDI_2X8),
                             environ={"GAUDI_SPAWN": SPAWN})


# ------------------------------------------------------------------------- input errors


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: build_launch_command("tpu", 1, None, [], environ={}), "unknown hardware 'tpu'"),
        (lambda: build_launch_command("gaudi2", 16, None, [], environ={}), "1..8 on gaudi2"),
        (lambda: build_launch_command("cpu", 0, None, [], environ={}), "cards per node"),
        (lambda: build_launch_command("cpu", 1, None, [], master_port=70000, environ={}), "master_port"),
        (lambda: build_launch_command("cpu", 1, None, [], launcher="mpirun", environ={}), "unknown launcher"),
        (lambda: build_launch_command("cpu", 1, None, [], module="dpo_dist.dpo;id", environ={}), "module"),
        (lambda: build_launch_command("cpu", 1, None, "--use_peft", environ={}), "list of words"),
        (lambda: build_launch_command("cuda", 1, None, [], launcher="gaudi_spawn", environ={}), "Gaudi"),
        (lambda: build_launch_command("gaudi2", 8, None, [], launcher="torchrun", environ={}), "not supported on HPU"),
        (lambda: build_launch_command("gaudi2", 8, gaudi_hosts(), [], environ={}), "needs hostfile_path"),
        (lambda: build_launch_command("gaudi2", 4, gaudi_hosts(), [], hostfile_path="h", environ={}), "slots=8 but 4"),
        (lambda: build_launch_command("cpu", 1, loop_hosts(), [], hostfile_path="h", ssh_port=22, environ={}),
         "ssh_port only applies"),
        (lambda: hpu_multi(deepspeed_env_path="rel/.deepspeed_env", workdir="/w"), "must be absolute"),
        (lambda: hpu_multi(extra_env_names=["NOT_SET_HERE"], workdir="/w"), "NOT_SET_HERE is not set"),
        (lambda: hpu_multi(extra_env_names=["1BAD"], workdir="/w"), "not a valid environment variable name"),
        (lambda: hpu_multi(workdir="/work/my project"), "working directory"),
        (lambda: hpu_multi(workdir="/work/$(id)"), "working directory"),
    ],
)
def test_input_errors(call, match):
    with pytest.raises(CommandError, match=match.replace("(", r"\(").replace(")", r"\)").replace("$", r"\$")):
        call()


@pytest.mark.parametrize("host", ["a;touch X", "$(id)", "`id`", "a b", "a\nb", "-oProxyCommand=id", ""])
def test_hostile_host_entries_refused_by_builder(host):
    """Hosts built by hand (not from parse_hostfile) are validated again."""
    hosts = [HostEntry(host, 1, 1), HostEntry("ok", 1, 2)]
    with pytest.raises(CommandError):
        build_launch_command("cpu", 1, hosts, [], hostfile_path="h", environ={})
    with pytest.raises(CommandError):
        build_launch_command("cpu", 1, loop_hosts(), [], hostfile_path="h", master_addr=host, environ={})


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "a\x00b", "\x1b[2J", "a\tb", "a\u2028b"])
def test_control_characters_refused_naming_the_argument(bad):
    with pytest.raises(CommandError, match=r"script argument #1 .* contains"):
        build_launch_command("cpu", 1, None, ["--output_dir", bad], environ={})
    raw = LaunchCommand(argv=["deepspeed", "--x", bad])
    with pytest.raises(CommandError, match=r"argument #2 of the command"):
        render_command_sh(raw)
    with pytest.raises(CommandError, match="the value of FOO"):
        render_command_sh(LaunchCommand(argv=["true"], env={"FOO": bad}))


def test_render_refuses_bad_or_secret_env_names():
    with pytest.raises(CommandError, match="not a valid environment variable name"):
        render_command_sh(LaunchCommand(argv=["true"], env={"A;id": "1"}))
    with pytest.raises(CommandError, match="looks like a secret"):
        render_command_sh(LaunchCommand(argv=["true"], env={"HF_TOKEN": "x"}))
    with pytest.raises(CommandError, match="looks like a secret"):
        render_deepspeed_env({"WANDB_API_KEY": "x"})


# ------------------------------------------------------------------ injection

RECORDER = (  # one line: command.sh refuses newlines in words
    "import json, os, sys; "
    "rec = {'argv': sys.argv[2:], 'env': {k: os.environ.get(k) for k in ('DS_ACCELERATOR', 'OMP_NUM_THREADS', "
    "'PT_HPU_LAZY_MODE')}}; "
    "open(sys.argv[1], 'a').write(json.dumps(rec) + chr(10))"
)


def _stand_in(cmd: LaunchCommand, out: Path) -> LaunchCommand:
    """The same command with the launcher program (argv[0]) replaced by a recorder."""
    swap = lambda argv: [sys.executable, "-c", RECORDER, str(out)] + argv[1:]  # noqa: E731
    return dataclasses.replace(cmd, argv=swap(cmd.argv) if cmd.argv else [],
                               per_node=[swap(a) for a in cmd.per_node])


def _run_sh(script: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    (cwd / "command.sh").write_text(script)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(cwd)}
    return subprocess.run(["bash", "command.sh", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def test_hostile_arguments_reach_the_program_verbatim(tmp_path):
    args = ["--model_name_or_path"] + HOSTILE + ["--output_dir", "$(touch X)/out"]
    cmd = build_launch_command("cpu", 2, None, args, environ={}, cpu_count=2)
    out = tmp_path / "out.jsonl"
    script = render_command_sh(_stand_in(cmd, out))
    assert script.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail\n" in script
    r = _run_sh(script, tmp_path)
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 1
    assert records[0]["argv"] == cmd.argv[1:]
    assert records[0]["argv"][-len(args):] == args
    assert records[0]["env"] == {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PT_HPU_LAZY_MODE": None}
    assert sorted(os.listdir(tmp_path)) == ["command.sh", "out.jsonl"]  # no X, nothing else
    # the one-line dry-run form is the same quoting
    assert "'x; touch X'" in format_command(cmd)


def test_hostile_arguments_reach_every_node_of_the_loopback_script(tmp_path):
    args = ["--model_name_or_path", "x; touch X", "--output_dir", "$(touch X)", "`touch X`"]
    cmd = build_launch_command("cpu", 1, loop_hosts(), args, hostfile_path=str(LOOPBACK), environ={}, cpu_count=2)
    out = tmp_path / "out.jsonl"
    stand = _stand_in(cmd, out)
    r = _run_sh(render_command_sh(stand), tmp_path)  # no argument: all nodes here
    assert r.returncode == 0, r.stderr
    got = sorted((json.loads(line)["argv"] for line in out.read_text().splitlines()), key=lambda a: a[a.index("--node_rank") + 1])
    assert got == [a[1:] for a in cmd.per_node]
    out.unlink()
    r = _run_sh(render_command_sh(stand), tmp_path, "1")  # one node, as on a real cluster
    assert r.returncode == 0, r.stderr
    assert [json.loads(line)["argv"] for line in out.read_text().splitlines()] == [cmd.per_node[1][1:]]
    single = render_command_sh(stand, node_rank=0)
    assert "--node_rank 0" in single and "--node_rank 1" not in single
    assert _run_sh(render_command_sh(stand), tmp_path, "7").returncode == 2
    assert not (tmp_path / "X").exists()


def test_loopback_script_propagates_a_node_failure(tmp_path):
    cmd = LaunchCommand(argv=[], per_node=[["true"], ["bash", "-c", "exit 3"]])
    r = _run_sh(render_command_sh(cmd), tmp_path)
    assert r.returncode == 3


def test_hpu_single_node_deepspeed_quotes_hostile_model_id(tmp_path):
    """Without gaudi_spawn nothing re-joins the words: hostile text is quoted and passes through."""
    cmd = build_launch_command("gaudi2", 8, None, ["--model_name_or_path", "$(touch X)"], launcher="deepspeed",
                               environ={})
    out = tmp_path / "out.jsonl"
    assert _run_sh(render_command_sh(_stand_in(cmd, out)), tmp_path).returncode == 0
    rec = json.loads(out.read_text())
    assert rec["argv"] == cmd.argv[1:] and rec["env"]["PT_HPU_LAZY_MODE"] == "1"
    assert not (tmp_path / "X").exists()


ALLOWED_HOSTILE_LOOKING = ("-", " leading and trailing ")


@pytest.mark.parametrize("bad", [h for h in HOSTILE if h not in ALLOWED_HOSTILE_LOOKING])
def test_gaudi_spawn_and_pdsh_refuse_words_their_shells_would_reinterpret(bad):
    """Non-ASCII and '' are refused too: not portable / an empty word vanishes when re-joined."""
    if bad != "%n %h":  # '%' means nothing to bash, only to pdsh
        with pytest.raises(CommandError, match="script argument #1"):
            build_launch_command("gaudi2", 8, None, ["--model_name_or_path", bad], environ={"GAUDI_SPAWN": SPAWN})
    with pytest.raises(CommandError, match="script argument #1"):
        build_launch_command("gaudi2", 8, gaudi_hosts(), ["--model_name_or_path", bad], hostfile_path=str(GAUDI_2X8),
                             environ={}, workdir="/w")


def _gaudi_spawn_join(words):
    # optimum-habana examples/gaudi_spawn.py (1.21-1.22), verbatim logic:
    #   argv = ['"{}"'.format(arg) if " " in arg and arg[0] != '"' and arg[-1] != '"' else arg for arg in sys.argv]
    #   command_list = [" ".join(argv)]   -> DistributedRunner.run(): Popen(shell=True, executable="/bin/bash")
    return " ".join(f'"{a}"' if " " in a and a[0] != '"' and a[-1] != '"' else a for a in words)


def _bash_words(line: str, cwd: Path):
    r = subprocess.run(["bash", "-c", "printf '%s\\0' " + line], cwd=cwd, capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.decode().split("\0")[:-1]


SAFE_WORDS = ["--output_dir", "runs/my run", "meta-llama/Llama-3-70B", "a=b,c:d@e+f.g-h_i", "50%", " padded "]


def test_words_we_allow_survive_gaudi_spawns_rejoin(tmp_path):
    cmd = build_launch_command("gaudi2", 8, None, SAFE_WORDS, environ={"GAUDI_SPAWN": SPAWN})
    script_and_args = cmd.argv[cmd.argv.index("dpo_dist/dpo.py"):]
    assert _bash_words(_gaudi_spawn_join(script_and_args), tmp_path) == script_and_args
    # the refusal is needed: unchecked, gaudi_spawn's join would run the text
    assert _bash_words(_gaudi_spawn_join(["$(echo injected)"]), tmp_path) == ["injected"]
    assert not (tmp_path / "X").exists()


def test_words_we_allow_survive_deepspeed_pdsh_rejoin(tmp_path):
    mnr = pytest.importorskip("deepspeed.launcher.multinode_runner")
    words = [w for w in SAFE_WORDS if "%" not in w]
    cmd = build_launch_command("gaudi2", 8, gaudi_hosts(), words, hostfile_path=str(GAUDI_2X8), environ={}, workdir="/w")
    user_args = cmd.argv[cmd.argv.index("dpo_dist.dpo") + 1:]
    fake = types.SimpleNamespace(args=types.SimpleNamespace(user_args=user_args))
    processed = mnr.PDSHRunner.parse_user_args(fake)  # what PDSHRunner sends to the remote shell
    assert _bash_words(" ".join(processed), tmp_path) == user_args
    fake.args.user_args = ["$(echo injected)", "a b`echo x`"]
    assert _bash_words(" ".join(mnr.PDSHRunner.parse_user_args(fake)), tmp_path) == ["injected", "a bx"]
    with pytest.raises(CommandError, match="pdsh substitutes|pdsh runner"):
        build_launch_command("gaudi2", 8, gaudi_hosts(), ["50%"], hostfile_path=str(GAUDI_2X8), environ={}, workdir="/w")


def test_quoting_helpers():
    assert quote("a b", "x") == "'a b'"
    assert quote("", "x") == "''"
    with pytest.raises(QuotingError, match="my arg"):
        quote("a\nb", "my arg")
    assert check_reshell_safe("runs/a b", "w", "via") == "runs/a b"
    with pytest.raises(QuotingError, match="'%'"):
        check_reshell_safe("50%", "w", "pdsh", PDSH_SAFE_CHARS)


# --------------------------------------------------------------- .deepspeed_env and secrets


def test_deepspeed_env_round_trips_through_deepspeeds_reader(tmp_path):
    """Write with render_deepspeed_env, read back the way runner.main does, export the way
    PDSHRunner does, and check a remote bash sees the same values."""
    mnr = pytest.importorskip("deepspeed.launcher.multinode_runner")
    env = {"PT_HPU_LAZY_MODE": "1", "HCCL_SOCKET_IFNAME": "eth0,eth1", "A_PATH": "/opt/x y/z:/q",
           "EMPTY": "", "ODD": "a;b|c&d<e>f(g)'h'*?~#{}[]"}
    text = render_deepspeed_env(env)
    assert text.endswith("\n") and "\n\n" not in text and "#" not in text.split("=")[0]
    fake = types.SimpleNamespace(exports={})
    for line in text.splitlines(keepends=True):  # runner.main: key, val = var.split('=', maxsplit=1)
        key, val = line.split("=", maxsplit=1)
        mnr.MultiNodeRunner.add_export(fake, key, val)
    exports = "".join(f"export {k}={v}; " for k, v in fake.exports.items())
    names = " ".join(f'"${k}"' for k in env)
    r = subprocess.run(["bash", "-c", exports + "printf '%s\\0' " + names], cwd=tmp_path, capture_output=True)
    assert r.stdout.decode().split("\0")[:-1] == list(env.values())


@pytest.mark.parametrize("value", ["$(touch X)", "`touch X`", 'a"b', "a\\b", "a\nb", " lead_val1", "trail_val2 ", "%n", "é", "!x"])
def test_deepspeed_env_refuses_values_a_remote_shell_would_reinterpret(value):
    with pytest.raises(CommandError, match="FOO"):
        render_deepspeed_env({"FOO": value})
    with pytest.raises(CommandError, match="FOO") as ei:
        hpu_multi(environ={"FOO": value}, extra_env_names=["FOO"], workdir="/w")
    if len(value.strip()) > 2:
        assert value.strip() not in str(ei.value)  # values are never echoed (they may be sensitive)


@pytest.mark.parametrize("name", ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "hf_token", "WANDB_API_KEY", "MY_SECRET",
                                  "DB_PASSWORD", "AWS_SECRET_ACCESS_KEY"])
def test_naming_a_secret_to_forward_is_refused(name):
    with pytest.raises(CommandError, match="huggingface-cli login") as ei:
        hpu_multi(environ={name: PLANTED}, extra_env_names=[name], workdir="/w")
    assert name in str(ei.value) and PLANTED not in str(ei.value)
    with pytest.raises(CommandError):  # on every path, not only multi-node
        build_launch_command("cpu", 1, None, [], environ={name: PLANTED}, extra_env_names=[name])


def test_planted_hf_token_never_reaches_deepspeed_env_or_command_sh():
    environ = {"HF_TOKEN": PLANTED, "HUGGING_FACE_HUB_TOKEN": PLANTED, "HCCL_AUTH_TOKEN": PLANTED,
               "PT_HPU_SECRET_KEY": PLANTED, "HCCL_SOCKET_IFNAME": "eth0", "GAUDI_SPAWN": SPAWN, "HF_HUB_OFFLINE": "1"}
    cmds = [
        hpu_multi(environ=environ, extra_env_names=["HF_HUB_OFFLINE"], workdir="/w"),
        build_launch_command("gaudi2", 8, None, ARGS, environ=environ),
        build_launch_command("cpu", 1, loop_hosts(), ARGS, hostfile_path=str(LOOPBACK), no_ssh=False, environ=environ,
                             workdir="/w"),
        build_launch_command("cpu", 1, loop_hosts(), ARGS, hostfile_path=str(LOOPBACK), environ=environ),
    ]
    for cmd in cmds:
        for text in (render_deepspeed_env(cmd.deepspeed_env), render_command_sh(cmd), format_command(cmd),
                     cmd.description, json.dumps(dataclasses.asdict(cmd))):
            assert PLANTED not in text
    ds = cmds[0].deepspeed_env
    assert "HCCL_SOCKET_IFNAME" in ds and "HF_HUB_OFFLINE" in ds
    assert not any("TOKEN" in k or "KEY" in k for k in ds)
    assert "HCCL_AUTH_TOKEN" in cmds[0].description  # names (never values) of what was held back


def test_secret_values_in_arguments_or_forwarded_vars_are_refused():
    environ = {"HF_TOKEN": PLANTED}
    with pytest.raises(CommandError, match="value of HF_TOKEN") as ei:
        build_launch_command("cpu", 1, None, ["--hub_token", PLANTED], environ=environ)
    assert PLANTED not in str(ei.value)
    with pytest.raises(CommandError, match="value of HF_TOKEN"):
        hpu_multi(environ={**environ, "HCCL_COPY": PLANTED}, workdir="/w")
    # short or path-like values of secret-named variables are not treated as secrets
    build_launch_command("cpu", 1, None, ["--x", "/etc/ssl/key.pem"], environ={"SSL_KEY_FILE": "/etc/ssl/key.pem"})


def test_single_remote_host_forces_multi_node_mode():
    one = [HostEntry("gaudi-node-7", 8, 1)]
    cmd = build_launch_command("gaudi2", 8, one, [], hostfile_path="h", environ={}, workdir="/w")
    assert "--force_multi" in cmd.argv and _ds_parse(cmd.argv).force_multi is True
    local = build_launch_command("gaudi2", 8, [HostEntry("localhost", 8, 1)], [], hostfile_path="h", environ={}, workdir="/w")
    assert "--force_multi" not in local.argv


def test_secret_names_are_whole_words_so_tokenizers_parallelism_is_not_one():
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD"):
        assert is_secret_name(name), name
    for name in ("TOKENIZERS_PARALLELISM", "PT_HPU_LAZY_MODE", "HCCL_SOCKET_IFNAME", "OMP_NUM_THREADS"):
        assert not is_secret_name(name), name
    cmd = build_launch_command("gaudi2", 8, gaudi_hosts(), ARGS, hostfile_path=str(GAUDI_2X8), workdir="/w",
                               extra_env_names=["TOKENIZERS_PARALLELISM"], environ={"TOKENIZERS_PARALLELISM": "false"})
    assert cmd.deepspeed_env["TOKENIZERS_PARALLELISM"] == "false"


@pytest.mark.parametrize("host, loopback", [
    ("localhost", True), ("LOCALHOST", True), ("ip6-loopback", True), ("127.0.0.2", True), ("::1", True),
    ("::1%lo", True), ("127.example", False), ("10.0.0.1", False), ("gaudi-node-0", False),
])
def test_one_loopback_rule_for_the_builder_and_the_doctor(host, loopback):
    assert is_loopback(host) is loopback
    assert doctor_is_loopback is is_loopback
    if "%" not in host:  # a zone id is a resolved address, never a hostfile entry
        # pdsh to one remote host needs --force_multi; one loopback host is started here
        cmd = build_launch_command("cpu", 1, [HostEntry(host, 1, 1)], [], hostfile_path="h", no_ssh=False, environ={},
                                   workdir="/w")
        assert ("--force_multi" in cmd.argv) is not loopback
