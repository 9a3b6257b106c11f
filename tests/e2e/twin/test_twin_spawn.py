"""launch.gaudi_spawn over optimum-habana's real DistributedRunner (which runs each command through bash): what the
rank receives is exactly the words it was given, spaces included, and a ZeRO-0 plan starts its ranks with mpirun."""

from __future__ import annotations

import json

import pytest

from conftest import free_port, run_cmd
from support.twin import TWIN_PY, mpirun_skip_reason, twin_env, twin_skip_reason

# Each rank writes what it received to its own file (the ranks' stdout lines can interleave under mpirun).
ECHO = ("import json, os, sys, pathlib; rank = os.environ.get('OMPI_COMM_WORLD_RANK', '-'); "
        "pathlib.Path(__file__).with_name(f'argv-{rank}.json').write_text(json.dumps([rank, sys.argv[1:]]))")


@pytest.fixture
def echo_script(tmp_path):
    p = tmp_path / "echo.py"
    p.write_text(ECHO + "\n")
    return p


def _argvs(folder) -> list:
    return sorted(json.loads(f.read_text()) for f in folder.glob("argv-*.json"))


@pytest.mark.parametrize("cards", [1, 2])
def test_words_reach_the_rank_unsplit(echo_script, cards):
    for reason in (twin_skip_reason(), mpirun_skip_reason() if cards > 1 else None):
        if reason:
            pytest.skip(reason)
    words = ["--model_name_or_path", "my model dir", "--note", "it's"]
    mode = ["--use_mpi"] if cards > 1 else []
    r = run_cmd([str(TWIN_PY), "-m", "launch.gaudi_spawn", "--world_size", str(cards), *mode, "--master_port",
                 str(free_port()), str(echo_script), *words], timeout=300, env=twin_env())
    assert r.returncode == 0, r.stdout[-3000:]
    got = _argvs(echo_script.parent)
    assert [a for _, a in got] == [words] * cards, r.stdout[-3000:]
    if cards > 1:  # optimum-habana's MPI launch: one process per rank
        assert sorted(rank for rank, _ in got) == ["0", "1"]
        assert "command = mpirun -n 2" in r.stdout
