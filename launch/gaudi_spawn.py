"""`python -m launch.gaudi_spawn`: optimum-habana's `examples/gaudi_spawn.py`, for installs without it.

gaudi_spawn.py lives in optimum-habana's repository, not in its wheel; the class it wraps,
`optimum.habana.distributed.DistributedRunner`, is in the wheel. This module is the same small
launcher over that class, with the same flags, so a Gaudi node with only `pip install
optimum-habana` launches exactly as the upstream script would:

    python -m launch.gaudi_spawn --world_size 8 --use_deepspeed --master_port 29500 dpo_dist/dpo.py ARGS

DistributedRunner runs each command as one bash line (`subprocess.Popen(shell=True)`), so every word
is shell-quoted here (`shlex.join`): an argument with a space reaches the rank as one word.
`launch.command.gaudi` also refuses script arguments with shell metacharacters for this path. Habana
modules are imported only here, when it runs (on HPU, or in the Gaudi twin).
"""

from __future__ import annotations

import shlex
import sys
from argparse import REMAINDER, ArgumentParser


def parse_args(argv=None):
    p = ArgumentParser(description="Habana Gaudi distributed launch (optimum-habana DistributedRunner)")
    p.add_argument("--world_size", type=int, default=1, help="Number of HPUs to use")
    p.add_argument("--hostfile", type=str, default=None, help="DeepSpeed hostfile (multi-node)")
    p.add_argument("--use_mpi", action="store_true", help="Use MPI for distributed training")
    p.add_argument("--use_deepspeed", action="store_true", help="Use DeepSpeed for distributed training")
    p.add_argument("--master_port", type=int, default=29500, help="Master port used by DeepSpeed and MPI")
    p.add_argument("training_script", type=str, help="The training script, followed by its arguments")
    p.add_argument("training_script_args", nargs=REMAINDER)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from optimum.habana.distributed import DistributedRunner  # deferred: HPU only

    command_list = [shlex.join([args.training_script, *args.training_script_args])]
    runner = DistributedRunner(
        command_list=command_list,
        world_size=args.world_size,
        hostfile=args.hostfile,
        use_mpi=args.use_mpi,
        use_deepspeed=args.use_deepspeed,
        master_port=args.master_port,
    )
    return int(runner.run() or 0)


if __name__ == "__main__":
    sys.exit(main())
