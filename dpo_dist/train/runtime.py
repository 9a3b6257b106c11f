"""The rank's life around training, shared by the DPO and SFT entries: parse and check the arguments (exit 2,
nothing created), run, tear the process group down, run the merge post-step on global rank 0, and leave."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from dpo_dist.args import parse_args, validate
from dpo_dist.backend import cleanup_shm_buffers, global_rank
from dpo_dist.util.checkpoint import check_output_dir
from dpo_dist.util.disk import is_no_space, no_space_message
from dpo_dist.util.errors import ArgumentError, UserError
from dpo_dist.util.lock import FolderBusy, hold_folder
from dpo_dist.util.logs import setup_logging

logger = logging.getLogger("dpo_dist")


def process_group_timeout_s(device) -> float | None:
    """The collective timeout the default process group really has (what --dist_timeout became), or None."""
    try:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return None
        backend = dist.distributed_c10d._get_default_group()._get_backend(device)
        return float(backend.options._timeout.total_seconds())
    except Exception:  # private API: report nothing rather than guess
        return None


def shutdown_distributed() -> None:
    """Barrier, then destroy the process group: a rank that exits with live gloo threads can abort
    (`terminate called without an active exception`, rc -6) and make torchrun's exit barrier wait 300 s."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    except Exception:  # best effort at exit
        pass
    if os.environ.get("DS_ACCELERATOR") == "cpu" and os.environ.get("MASTER_PORT"):
        cleanup_shm_buffers(os.environ["MASTER_PORT"], os.environ.get("LOCAL_RANK", "0"))


def post_step(model_args, train_args) -> int:
    """Merge into `<output_dir>_merged` on global rank 0, after the process group is gone.

    Why here and not in the launcher: it then runs the same under every launcher (deepspeed,
    torchrun, gaudi_spawn, plain python), on the node that holds rank 0's output. Why after the
    process group is torn down: a long merge (70B) cannot trip a collective timeout on the ranks
    that already finished. It runs as a fresh process so no DeepSpeed/ZeRO state of training
    (zero.Init hooks, device memory) leaks into loading and verifying the merged model.
    """
    if train_args.no_merge or global_rank() != 0:
        return 0
    out = str(train_args.output_dir).rstrip("/")
    argv = [sys.executable, "-m", "dpo_dist.merge", "--checkpoint", out, "--output", out + "_merged",
            "--base_model", model_args.model_name_or_path, "--dtype", "bf16" if train_args.bf16 else "fp32"]
    if train_args.overwrite_output_dir:
        argv.append("--overwrite")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "CROSS_RANK", "CROSS_SIZE") and not k.startswith(("OMPI_", "PMI_", "PMIX_"))}
    logger.info("post-step: merging %s into %s_merged", out, out)
    rc = subprocess.call(argv, env=env)
    if rc != 0:
        print(f"dpo_dist: merge failed (exit {rc}); the training output in {out} is intact. Re-run: "
              f"python -m dpo_dist.merge --checkpoint {out} --output {out}_merged", file=sys.stderr)
    return rc


def hold_output_dir(train_args) -> Path | None:
    """Global rank 0 holds the output dir (util.lock) for the life of the run, merge included: a second run into
    the same folder is refused while this one lives, and a crashed run leaves no stale lock. Returns the folder
    when this call made it (so that a run refused later removes it again while it is still empty)."""
    if global_rank() != 0:
        return None
    out = Path(train_args.output_dir).expanduser()
    made = None if out.is_dir() else out
    out.mkdir(parents=True, exist_ok=True)
    try:
        hold_folder(out)
        return made
    except FolderBusy:
        raise ArgumentError(
            f"--output_dir {out} is in use by another run that is going on now. Nothing was changed. Wait for it to "
            "end, or choose a new --output_dir."
        ) from None


def _remove_if_empty(folder: Path | None) -> None:
    if folder is not None:
        try:
            folder.rmdir()  # only when nothing was written into it
        except OSError:
            pass


def rank_main(prog: str, argv, dataclass_types, run_fn, *, task: str = "dpo") -> int:
    """The rank entry shared by dpo and sft: parse and check (exit 2, nothing created), run (exit 1 on a
    user error; 2 for a bad argument found late), tear the process group down, then the merge post-step."""
    setup_logging()
    try:
        parsed = parse_args(argv, dataclass_types, task=task)  # task: which options apply (dpo_dist.args)
        model_args, data_args, train_args = parsed[:3]
        validate(model_args, data_args, train_args, task=task)
        check_output_dir(train_args)
        made = hold_output_dir(train_args)
    except ArgumentError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    try:
        run_fn(*parsed)
    except UserError as e:
        logger.error("%s", e)
        print(f"{prog}: error: {e}", file=sys.stderr)
        shutdown_distributed()
        _remove_if_empty(made)
        return 2 if isinstance(e, ArgumentError) else 1
    except Exception as e:
        if not is_no_space(e):
            raise
        # A full disk mid-run (a checkpoint, the model, the metrics): one plain message, not a traceback. What
        # was being written is incomplete and the resume check (util.checkpoint) will not take it.
        msg = no_space_message(train_args.output_dir) or f"no space left on {train_args.output_dir} ({e})"
        logger.error("%s", msg)
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 1
    shutdown_distributed()
    return post_step(model_args, train_args)


def exit_now(code: int) -> None:
    """Leave without the interpreter's teardown, once everything is written and the process group is destroyed.
    Teardown can still abort a rank (SIGABRT, "terminate called without an active exception") when it frees gloo
    objects that other modules keep referenced: measured here once in about a dozen 2-rank runs,
    after a successful run; DeepSpeed's launcher then fails the whole job."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    logging.shutdown()
    os._exit(code)
