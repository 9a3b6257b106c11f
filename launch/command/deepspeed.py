"""The DeepSpeed runner builder (`deepspeed`, i.e. `python -m deepspeed.launcher.runner`), one node or several
(N = cards per node, P = master port, M = `dpo_dist.dpo`, ARGS = its arguments).

- One node: `deepspeed <cards> --master_port P --no_local_rank --module M ARGS`, where <cards> is the
  device's `deepspeed_cards` flags and N: HPU `--num_nodes 1 --num_gpus N` (what optimum-habana's
  DistributedRunner runs), CUDA `--num_gpus N` (`--include localhost:<ids>` instead when
  `CUDA_VISIBLE_DEVICES` is set, because DeepSpeed drops that variable when `--num_gpus` is given), CPU
  `--num_accelerators N` with `DS_ACCELERATOR=cpu OMP_NUM_THREADS=T` in the environment.
- Several nodes over ssh (pdsh; the default except on CPU): `deepspeed --hostfile F --master_addr <first
  host> --master_port P [--ssh_port S] --no_local_rank --module M ARGS` (what optimum-habana's
  `DistributedRunner.create_multi_node_setup` builds, plus `--module`), and `.deepspeed_env` with what
  pdsh does not carry: the launch environment (on HPU `PT_HPU_LAZY_MODE=1`, `PT_ENABLE_INT64_SUPPORT=1`
  and every `PT_HPU_*` / `HCCL_*` of the environment; on CPU `DS_ACCELERATOR`/`OMP_NUM_THREADS`) and
  the variables the user names. pdsh re-joins ARGS into a remote shell line, so they are checked for
  shell metacharacters (and `%`, which pdsh substitutes).
- Several nodes with `no_ssh` (the CPU default, testable on loopback): one command per node R,
  `deepspeed --hostfile F --no_ssh --node_rank R --master_addr A --master_port P --no_local_rank
  --module M ARGS`.
"""

from __future__ import annotations

import os

from launch.command.common import (
    Builder,
    Built,
    CommandError,
    LaunchRequest,
    check_reshell_args,
    forwarded_env,
    visible_devices,
)
from launch.command.hostfile import is_loopback
from launch.command.quoting import PDSH_SAFE_CHARS

__all__ = ["DeepSpeedRunner"]

_VIA_PDSH = "DeepSpeed's pdsh runner (it sends the command line to a shell on every node)"


class DeepSpeedRunner(Builder):
    name = "deepspeed"

    def check(self, req: LaunchRequest) -> None:
        if req.multi and not req.hostfile_path:
            raise CommandError("a multi-node DeepSpeed launch needs hostfile_path (DeepSpeed reads the hostfile itself).")

    def uses_ssh(self, req: LaunchRequest) -> bool:
        return req.multi and not req.no_ssh

    def build(self, req: LaunchRequest) -> Built:
        if not req.multi:
            out = self._one_node(req)
        elif req.no_ssh:
            out = self._per_node(req)
        else:
            out = self._pdsh(req)
        if req.multi and req.no_ssh and req.extra_env_names:
            out.notes.append("no_ssh: every node runs its own command in its own environment; the extra variables ("
                             + ", ".join(req.extra_env_names) + ") must be set there.")
        return out

    def _one_node(self, req: LaunchRequest) -> Built:
        port = ["--master_port", str(req.master_port)]
        visible = visible_devices(req)
        if visible is None:
            return Built(argv=["deepspeed", *req.device.deepspeed_cards, str(req.cards), *port] + req.deepspeed_tail)
        var = req.device.visible_devices
        return Built(argv=["deepspeed", "--include", f"localhost:{visible}", *port] + req.deepspeed_tail,
                     notes=[(f"{var} is set, so --include localhost:{visible} replaces --num_gpus "
                             f"(DeepSpeed ignores and unsets {var} when --num_gpus is given).")])

    def _per_node(self, req: LaunchRequest) -> Built:
        per_node = [["deepspeed", "--hostfile", req.hostfile_path, "--no_ssh", "--node_rank", str(r),
                     "--master_addr", req.master_addr, "--master_port", str(req.master_port)] + req.deepspeed_tail
                    for r in range(req.nodes)]
        return Built(per_node=per_node,
                     notes=[("--no_ssh: one command per node (node R runs the command with --node_rank R); on "
                             "loopback all run on this machine. Slots come from the hostfile.")])

    def _pdsh(self, req: LaunchRequest) -> Built:
        out = Built(argv=["deepspeed", "--hostfile", req.hostfile_path, "--master_addr", req.master_addr,
                          "--master_port", str(req.master_port)])
        if req.ssh_port is not None:
            out.argv += ["--ssh_port", str(req.ssh_port)]
        first = req.hosts[0].host
        if req.nodes == 1 and not is_loopback(first):
            out.argv.append("--force_multi")
            out.notes.append(f"one remote host ({first}): --force_multi makes DeepSpeed start the ranks there "
                             "over pdsh instead of on this machine.")
        out.argv += req.deepspeed_tail
        check_reshell_args(req.script_args, _VIA_PDSH, PDSH_SAFE_CHARS)
        cwd = req.workdir if req.workdir is not None else os.getcwd()
        for i, ch in enumerate(cwd):
            if ch not in PDSH_SAFE_CHARS or ch == " ":
                raise CommandError(
                    f"the working directory {cwd!r} has {ch!r} at position {i + 1}; DeepSpeed's pdsh runner sends "
                    f"`cd {cwd};` unquoted to every node. Fix: run from a directory whose path has only letters, "
                    "digits and _@+=:,./- (the same path must exist on every node)."
                )
        out.deepspeed_env, skipped = forwarded_env(req)
        if req.deepspeed_env_path is not None:
            out.env["DS_ENV_FILE"] = req.deepspeed_env_path
            out.notes.append(f"DS_ENV_FILE={req.deepspeed_env_path}: DeepSpeed reads .deepspeed_env from there (and "
                             "then not from ~/.deepspeed_env or ./.deepspeed_env).")
        else:
            out.notes.append("write .deepspeed_env into the directory the launcher runs from (DeepSpeed also reads "
                             "~/.deepspeed_env; check it holds no secrets).")
        if skipped:
            out.notes.append("not forwarded (secret-like names): " + ", ".join(skipped) + ".")
        out.notes.append("pdsh starts the ranks over ssh: passwordless ssh to every host, the same project path, the "
                         "same Python path (DeepSpeed runs its own sys.executable remotely) and "
                         "Python environment on every node. Script arguments were checked for shell metacharacters "
                         "because pdsh re-joins them into a remote shell line.")
        out.notes.append("The Hugging Face token is not forwarded: run `huggingface-cli login` once per node "
                         "(~/.cache/huggingface/token) or set HF_TOKEN in each node's own environment.")
        return out
