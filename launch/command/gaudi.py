"""The gaudi_spawn builder: HPU, one node (N = cards, P = master port, ARGS = the rank script's arguments).

    python $GAUDI_SPAWN --world_size N --use_deepspeed --master_port P dpo_dist/dpo.py ARGS

with `GAUDI_SPAWN` set (optimum-habana's `examples/gaudi_spawn.py`; it is not in the wheel), else
`python -m launch.gaudi_spawn ...` (the same launcher over the class it wraps, which is in the wheel).
gaudi_spawn then runs `deepspeed --num_nodes 1 --num_gpus N --no_local_rank --master_port P
dpo_dist/dpo.py ARGS` through `bash` (optimum-habana `DistributedRunner`), so ARGS must be free of shell
metacharacters: they are checked, not just quoted (see launch/command/quoting.py). A plan without
DeepSpeed (ZeRO-0 on Gaudi: plain DDP) passes `--use_mpi` instead: `mpirun -n N ... python
dpo_dist/dpo.py ARGS`, as optimum-habana's own DPO baseline runs.

gaudi_spawn is not used for several nodes (the DeepSpeed runner builder does those): its
`DistributedRunner.process_hostfile` rejects comment lines, which our hostfiles have.
"""

from __future__ import annotations

from launch.command.common import Builder, Built, CommandError, LaunchRequest, check_reshell_args
from launch.command.quoting import RESHELL_SAFE_CHARS, check_no_control

__all__ = ["GaudiSpawn"]

_VIA_GAUDI_SPAWN = "gaudi_spawn.py (optimum-habana's DistributedRunner runs the joined command with bash)"


class GaudiSpawn(Builder):
    """optimum-habana's gaudi_spawn.py: DeepSpeed (`--use_deepspeed`) or MPI/DDP (`--use_mpi`) on one node."""

    name = "gaudi_spawn"

    def unsupported(self, req: LaunchRequest) -> str:
        return f"launcher gaudi_spawn is for Gaudi (hpu) only, not {req.hw_name}. Fix: use deepspeed or torchrun."

    def auto_notes(self, req: LaunchRequest) -> list[str]:
        if req.environ.get("GAUDI_SPAWN"):
            return []
        return [("GAUDI_SPAWN is not set, so this runs `python -m launch.gaudi_spawn`, the same launcher over "
                 "optimum-habana's DistributedRunner (in the wheel); set GAUDI_SPAWN=/path/to/optimum-habana/"
                 "examples/gaudi_spawn.py to use the upstream script.")]

    def check(self, req: LaunchRequest) -> None:
        if req.multi:
            raise CommandError(
                "launcher gaudi_spawn is not used for multi-node: optimum-habana's DistributedRunner.process_hostfile "
                "rejects comment lines, and on several nodes gaudi_spawn only builds `deepspeed --hostfile F "
                "--master_addr <first host> --no_local_rank --master_port P`, which launcher=deepspeed (the default) "
                "runs directly."
            )

    def build(self, req: LaunchRequest) -> Built:
        cards, port, script, args = req.cards, req.master_port, req.script_path, req.script_args
        spawn = ([check_no_control(req.environ["GAUDI_SPAWN"], "GAUDI_SPAWN", CommandError)]
                 if req.environ.get("GAUDI_SPAWN") else ["-m", "launch.gaudi_spawn"])
        check_reshell_args(args, _VIA_GAUDI_SPAWN, RESHELL_SAFE_CHARS)
        # One card without DeepSpeed is a plain process: no launcher flag (gaudi_spawn would ignore --use_mpi).
        mode = ["--use_deepspeed"] if req.deepspeed else (["--use_mpi"] if cards > 1 else [])
        out = Built(argv=[req.python, *spawn, "--world_size", str(cards), *mode, "--master_port", str(port), script]
                    + args)
        # What DistributedRunner runs in turn, for the notes.
        if req.deepspeed:
            inner = (f"deepspeed --num_nodes 1 --num_gpus {cards} --no_local_rank --master_port {port}" if cards > 1
                     else f"deepspeed --num_gpus 1 --master_port {port}")
        else:
            inner = (f"mpirun -n {cards} --bind-to core --map-by socket:PE=<cores per rank> --rank-by slot "
                     f"--report-bindings --allow-run-as-root python" if cards > 1 else "python")
            out.notes.append("no DeepSpeed (a ZeRO-0 plan on Gaudi): plain DDP started by MPI, which keeps Habana's "
                             "fused AdamW (optimum-habana's own DPO baseline runs this way); mpirun must be "
                             "installed (Habana's images ship Open MPI).")
        out.notes.append(f"gaudi_spawn.py runs `{inner} {script} ...` with bash; the script arguments were checked "
                         "for shell metacharacters because it re-joins them into one shell line.")
        out.notes.append(f"{script} is run as a script: dpo_dist must be importable from it (installed package or "
                         "PYTHONPATH with the project root).")
        if cards == 1 and req.deepspeed:
            out.notes.append("with --world_size 1 gaudi_spawn drops --no_local_rank, so the rank also gets "
                             "--local_rank=0.")
        return out
