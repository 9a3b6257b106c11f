"""`launch plan` and `launch train` give the same verdict on the same inputs: the same exit code, and the same
refusal message where train refuses. Both plan first (build_plan), then train checks the cards this node has
(check_cards_available) and builds the launch command; plan applies the same rules (in build_plan, or right after
it), and shows the plan anyway. Nothing here launches: train runs with --dry-run into a temporary run dir."""

from __future__ import annotations

import os

import pytest

from launch.cli import main
from launch.command.common import DEVICE_LAUNCH
from launch.plan import HARDWARE

MODEL = "google/gemma-3-270m"
PAIR_TOKENS = ("--pair_tokens", "300,600")  # no data to measure: the verdict must not depend on the hub


def verdict(capsys, monkeypatch, tmp_path, command: str, args: list[str], environ: dict) -> tuple[int, str]:
    """(exit code, the `launch: error:` line or '') of `launch <command> args` with `environ` on top of a clean
    environment (no visible-devices variable, no hl-smi on PATH)."""
    for var in ("HABANA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES", "GAUDI_SPAWN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", os.defpath)  # no hl-smi: a laptop, whatever this machine has installed
    for k, v in environ.items():
        monkeypatch.setenv(k, v)
    extra = ["--dry-run", "--run_dir", str(tmp_path / f"run-{len(list(tmp_path.iterdir()))}")] if command == "train" else []
    rc = main([command, *args, *PAIR_TOKENS, *extra])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("launch: error:")]
    return rc, lines[0] if lines else ""


def hostfile(tmp_path, hosts: list[str], slots: int) -> str:
    path = tmp_path / f"hosts-{'-'.join(hosts)}-{slots}.txt"
    path.write_text("".join(f"{h} slots={slots}\n" for h in hosts))
    return str(path)


GRID = [(hw, cards) for hw in ("gaudi2", "gaudi3", "cuda", "cpu") for cards in (1, 2, 8, 16)]


@pytest.mark.parametrize(("hardware", "cards"), GRID)
def test_plan_and_train_agree_on_one_node(capsys, monkeypatch, tmp_path, hardware, cards):
    args = ["--model", MODEL, "--hardware", hardware, "--cards", str(cards)]
    plan = verdict(capsys, monkeypatch, tmp_path, "plan", args, {})
    train = verdict(capsys, monkeypatch, tmp_path, "train", args, {})
    assert plan == train
    top = DEVICE_LAUNCH[HARDWARE[hardware].device].max_cards  # a node's fixed size, whichever machine plans
    if top is not None and cards > top:
        assert plan[0] == 2 and f"has {top} cards" in plan[1] and f"--cards {top}" in plan[1]
    if HARDWARE[hardware].device == "cpu" and cards > (os.cpu_count() or 1):  # the CPU ranks of this machine
        assert plan[0] == 2 and f"--cards {cards} asks for more CPU ranks" in plan[1]
    if plan[0] != 0:  # a refusal writes nothing
        assert not [p for p in tmp_path.iterdir() if p.name.startswith("run-")]


@pytest.mark.parametrize(("hardware", "cards", "visible"), [
    ("gaudi2", 8, "0,1"), ("gaudi2", 2, "0,1"), ("gaudi3", 4, "0,1,2"), ("cuda", 4, "0"), ("cuda", 1, "0"),
])
def test_plan_and_train_agree_on_the_visible_cards_of_this_node(capsys, monkeypatch, tmp_path, hardware, cards, visible):
    var = HARDWARE[hardware].backend.visible_devices_env
    args = ["--model", MODEL, "--hardware", hardware, "--cards", str(cards)]
    plan = verdict(capsys, monkeypatch, tmp_path, "plan", args, {var: visible})
    train = verdict(capsys, monkeypatch, tmp_path, "train", args, {var: visible})
    assert plan == train
    assert (plan[0] == 2) == (cards > len(visible.split(","))), plan


@pytest.mark.parametrize(("hardware", "hosts", "cards", "nodes"), [
    ("gaudi2", ["worker-0", "worker-1"], 8, None),  # another cluster: this machine's cards do not count
    ("gaudi2", ["worker-0", "worker-1"], 16, None),
    ("cpu", ["localhost", "127.0.0.1"], 1, None),
    ("cpu", ["localhost", "127.0.0.1"], 64, None),
    ("gaudi2", ["worker-0", "worker-1"], 8, 3),  # --nodes that the hostfile contradicts
])
def test_plan_and_train_agree_on_a_hostfile(capsys, monkeypatch, tmp_path, hardware, hosts, cards, nodes):
    args = ["--model", MODEL, "--hardware", hardware, "--cards", str(cards), "--hostfile", hostfile(tmp_path, hosts, cards)]
    if nodes:
        args += ["--nodes", str(nodes)]
    plan = verdict(capsys, monkeypatch, tmp_path, "plan", args, {})
    train = verdict(capsys, monkeypatch, tmp_path, "train", args, {})
    assert plan == train
    if nodes:
        assert plan[0] == 2 and f"--nodes {nodes}" in plan[1] and "lists 2 node(s)" in plan[1]
    if cards > (DEVICE_LAUNCH[HARDWARE[hardware].device].max_cards or cards):
        assert plan[0] == 2 and "a Gaudi node has 8 cards" in plan[1]


def test_plan_shows_the_plan_of_a_refused_launch(capsys, monkeypatch, tmp_path):
    """Planning a CPU node bigger than this machine still prints the plan; the exit code and message are train's."""
    cards = (os.cpu_count() or 1) + 1
    rc, line = verdict(capsys, monkeypatch, tmp_path, "plan", ["--model", MODEL, "--hardware", "cpu", "--cards", str(cards)], {})
    assert rc == 2 and f"--cards {cards}" in line
    rc = main(["plan", "--model", MODEL, "--hardware", "cpu", "--cards", str(cards), *PAIR_TOKENS, "--json"])
    assert rc == 2 and '"world_size"' in capsys.readouterr().out


def test_train_refuses_nodes_without_a_hostfile(capsys, monkeypatch, tmp_path):
    """train starts the nodes a hostfile names: `--nodes 2` alone would plan for 16 cards and start 8. plan keeps
    --nodes (it sizes a cluster that need not exist yet)."""
    args = ["--model", MODEL, "--hardware", "gaudi2", "--cards", "8", "--nodes", "2"]
    rc, line = verdict(capsys, monkeypatch, tmp_path, "train", args, {})
    assert rc == 2 and "--nodes 2 without --hostfile" in line and "--hostfile" in line.split("Fix:")[1]
    assert not list(tmp_path.iterdir())
    assert verdict(capsys, monkeypatch, tmp_path, "plan", args, {}) == (0, "")
    rc, line = verdict(capsys, monkeypatch, tmp_path, "plan", [*args[:-1], "0"], {})
    assert rc == 2 and "--nodes must be a positive integer" in line


def test_the_planner_and_the_launch_command_agree_on_a_node():
    """Gaudi's cards per node live in the hardware table (the planner's node size) and in the launch command's device
    table (the limit plan and train enforce): they must be one number."""
    for name, hw in HARDWARE.items():
        top = DEVICE_LAUNCH[hw.device].max_cards
        assert top is None or top == hw.cards_per_node, (name, top, hw.cards_per_node)
    assert DEVICE_LAUNCH[HARDWARE["gaudi2"].device].max_cards == 8
