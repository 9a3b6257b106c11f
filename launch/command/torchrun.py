"""The torchrun builder: CUDA or CPU (N = cards per node, P = master port, M = `dpo_dist.dpo`, ARGS = its
arguments; CPU adds `DS_ACCELERATOR=cpu OMP_NUM_THREADS=T` to the environment, as for DeepSpeed).

- one node: `torchrun --nproc_per_node N --master_port P -m M ARGS`; on CUDA a set `CUDA_VISIBLE_DEVICES`
  must name exactly N cards.
- several nodes: one command per node R, `torchrun --nnodes K --node_rank R --nproc_per_node N
  --master_addr A --master_port P -m M ARGS`, to be run on node R (all on this machine for loopback).

Not for HPU: Gaudi ranks start with gaudi_spawn or DeepSpeed's runner.
"""

from __future__ import annotations

from launch.command.common import Builder, Built, LaunchRequest, visible_devices

__all__ = ["Torchrun"]


class Torchrun(Builder):
    name = "torchrun"

    def unsupported(self, req: LaunchRequest) -> str:
        return "launcher torchrun is not supported on HPU; use gaudi_spawn or deepspeed (the default)."

    def build(self, req: LaunchRequest) -> Built:
        rank = ["-m", req.module] + req.script_args
        if not req.multi:
            visible_devices(req)  # checked only: when set, it must name exactly the cards asked for
            return Built(argv=["torchrun", "--nproc_per_node", str(req.cards), "--master_port", str(req.master_port)]
                         + rank)
        per_node = [["torchrun", "--nnodes", str(req.nodes), "--node_rank", str(r), "--nproc_per_node", str(req.cards),
                     "--master_addr", req.master_addr, "--master_port", str(req.master_port)] + rank
                    for r in range(req.nodes)]
        return Built(per_node=per_node,
                     notes=[("torchrun multi-node: run the command for node R on node R (all on this machine "
                             "for loopback).")])
