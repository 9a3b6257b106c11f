"""A busy --master_port is refused before anything starts (launch/masterport.py), not found 17 s later as "rank 0
died": the decision with a stub probe, the probe on real sockets, and `launch train` with a port this test holds."""

from __future__ import annotations

import errno
import socket

import pytest

import launch.cli as cli
from launch.command.hostfile import HostEntry
from launch.masterport import bind_error, master_port_problem, master_port_problem_for


def busy_except(*free: int):
    """A probe that finds every port busy but `free`."""
    return lambda port: None if port in free else OSError(errno.EADDRINUSE, "Address already in use")


def test_decision():
    assert master_port_problem(29500, None, busy_except(29500)) is None
    msg = master_port_problem(29500, None, busy_except(29503))
    assert "--master_port 29500 is in use" in msg and "--master_port 29503 (free now)" in msg and "Fix:" in msg
    msg = master_port_problem(29500, None, busy_except())
    assert "pass --master_port with a free TCP port" in msg
    denied = master_port_problem(80, None, lambda p: OSError(errno.EACCES, "Permission denied") if p == 80 else None)
    assert "--master_port 80 cannot be opened (Permission denied)" in denied and "--master_port 81" in denied
    # the first node is this machine: probed; another machine: not probed from here
    assert master_port_problem(29500, [HostEntry("localhost", 2, 1), HostEntry("127.0.0.1", 2, 2)], busy_except())
    assert master_port_problem(29500, [HostEntry("worker-0", 8, 1), HostEntry("localhost", 8, 2)], busy_except()) is None
    # out of range: the launch command refuses it with its own message
    assert master_port_problem(0, None, busy_except()) is None and master_port_problem(70000, None, busy_except()) is None


def test_hostfile_hosts(tmp_path):
    local, remote = tmp_path / "local.txt", tmp_path / "remote.txt"
    local.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    remote.write_text("worker-0 slots=8\nworker-1 slots=8\n")
    assert master_port_problem_for(29500, str(local), busy_except())
    assert master_port_problem_for(29500, str(remote), busy_except()) is None
    assert master_port_problem_for(29500, str(tmp_path / "missing.txt"), busy_except()) is None  # the planner's to refuse


@pytest.mark.parametrize("address", ["127.0.0.1", "0.0.0.0"])
def test_probe_on_a_held_socket(address):
    with socket.socket() as held:
        held.bind((address, 0))
        held.listen(1)
        port = held.getsockname()[1]
        err = bind_error(port)
        assert err is not None and err.errno == errno.EADDRINUSE
    assert bind_error(port) is None  # closed: free again (SO_REUSEADDR, as the rendezvous store binds)


def test_train_refuses_a_busy_master_port(capsys, monkeypatch, tmp_path, tiny_assets):
    spawned = []
    monkeypatch.setattr(cli, "spawn", lambda *a, **k: spawned.append(a))
    run_dir = tmp_path / "run"
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        args = ["train", "--model", str(tiny_assets.llama_dir), "--hardware", "cpu", "--cards", "1", "--run_dir", str(run_dir),
                "--master_port", str(port), "--pair_tokens", "300,600"]
        rc = cli.main(args)
        err = capsys.readouterr().err
        assert rc == 2, err
        assert f"--master_port {port} is in use" in err and "Fix: pass --master_port" in err, err
        assert not spawned and not run_dir.exists()  # nothing started, nothing written
        assert cli.main([*args, "--dry-run"]) == 0  # a dry run launches nothing: the port is not its concern
    capsys.readouterr()
