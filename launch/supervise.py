"""Automatic restart: when a rank dies or the job hangs, stop everything and relaunch from the newest complete
checkpoint, at most --max_restarts times, and record what each restart cost.

The spawn (launch.spawn) already stops every rank when one fails and says why. This loop only decides whether
to go again and from where. A torn checkpoint (a rank died while writing it) is skipped and named. Failures a
restart cannot fix are not retried: a usage error (exit 2: the same arguments are refused again), a full disk,
or a stop the user asked for (Ctrl-C, SIGTERM). (Hand-written: DeepSpeed's elastic agent restarts only under
torchrun's rendezvous, not under DeepSpeed's pdsh/ssh runner or gaudi_spawn's mpirun, which Gaudi clusters use.)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from dpo_dist.args import TrainArguments as RankTrainArguments
from dpo_dist.util.atomic import write_json_atomic
from dpo_dist.util.checkpoint import checkpoint_step, newest_complete_checkpoint
from dpo_dist.util.disk import no_space_message
from dpo_dist.util.layout import METRICS_FILE, TRAINER_STATE
from launch.spawn import FAILED, HANG, NO_SPACE, SpawnResult

RESTARTS_FILE = "restarts.json"  # in the run dir: each restart as it happens (training_metrics.json gets them at the end)
EXIT_USAGE = 2  # the ranks' exit code for a refused argument (dpo_dist.train.runtime.rank_main)
# The ranks' own --dist_timeout default: a job silent for longer than that (plus a margin for the collective's
# own error to surface) is hung.
DEFAULT_DIST_TIMEOUT_S = next(f.default for f in fields(RankTrainArguments) if f.name == "dist_timeout")
HANG_MARGIN_S = 60.0


@dataclass
class Restart:
    restart: int  # 1, 2, ...
    cause: str  # why the previous launch ended, in words
    step: int  # the global step training resumed from (0: from the start, no complete checkpoint)
    checkpoint: str | None  # the checkpoint it resumed from
    skipped: list[str]  # torn checkpoints that were newer, with what was wrong with each
    seconds_lost: float  # work redone since that checkpoint was written, plus the time to stop and relaunch


def _written_at(ckpt: Path | None) -> float | None:
    try:
        return (ckpt / TRAINER_STATE).stat().st_mtime if ckpt else None
    except OSError:
        return None


def not_restartable(result: SpawnResult, disk_paths: Sequence[Path]) -> str | None:
    """Why a restart cannot help with this failure (None: it may)."""
    if result.kind == NO_SPACE:
        return result.failed
    for p in disk_paths:  # a rank that died of a full disk says so in its own words; the free space says it here
        if msg := no_space_message(p):
            return msg
    if result.kind not in (FAILED, HANG):
        return result.failed or "stopped"
    if result.returncode == EXIT_USAGE:
        return "the ranks refused their arguments (exit 2): the same arguments would be refused again"
    return None


def supervise(launch_once: Callable[[list[str]], SpawnResult], *, output_dir: Path, world_size: int, deepspeed: bool,
              max_restarts: int, record: Path | None = None, disk_paths: Sequence[Path] = (),
              log=print, clock=time.time) -> tuple[SpawnResult, list[Restart]]:
    """Launch, and relaunch after a failure, at most max_restarts times. launch_once(more rank args) runs one launch
    to its end. Returns (the last launch's result, with the reason when it gave up; the restarts)."""
    restarts: list[Restart] = []
    started = clock()
    result = launch_once([])
    while result.returncode != 0:
        ended = clock()
        why_not = not_restartable(result, disk_paths)
        if why_not is not None:
            if result.kind in (FAILED, HANG) and why_not.startswith("no space"):
                result.failed, result.kind = why_not, NO_SPACE  # the cause, not the rank that happened to die of it
            elif max_restarts and why_not != result.failed:
                result.failed = f"{result.failed}; not restarted: {why_not}"
            return result, restarts
        if len(restarts) >= max_restarts:
            if max_restarts:
                result.failed = (f"{result.failed}; gave up after {len(restarts)} restart(s) (--max_restarts "
                                 f"{max_restarts}): each launch failed. Causes: "
                                 + " | ".join(r.cause for r in restarts) + ". Fix the cause, then resume with "
                                 "--resume_from_checkpoint latest")
            return result, restarts
        ckpt, skipped = newest_complete_checkpoint(output_dir, world_size, deepspeed)
        for torn, problems in skipped:
            log(f"launch: skipping torn checkpoint {torn}: {'; '.join(problems[:3])}")
        more = ["--resume_from_checkpoint", str(ckpt)] if ckpt else ["--overwrite_output_dir"]
        since = _written_at(ckpt) or started
        restart = Restart(
            restart=len(restarts) + 1, cause=result.failed or f"exit {result.returncode}",
            step=(checkpoint_step(ckpt) or 0) if ckpt else 0, checkpoint=str(ckpt) if ckpt else None,
            skipped=[f"{t.name}: {'; '.join(p[:3])}" for t, p in skipped],
            seconds_lost=round(max(0.0, clock() - since), 1),
        )
        restarts.append(restart)
        log(f"launch: restart {restart.restart}/{max_restarts} after: {restart.cause}. Resuming from "
            f"{ckpt or 'the start (no complete checkpoint)'}; {ended - since:.0f} s of work since then is redone.")
        if record is not None:
            write_json_atomic(record, [asdict(r) for r in restarts])
        started = clock()
        result = launch_once(more)
    return result, restarts


def record_restarts_in_metrics(output_dir: Path, restarts: list[Restart]) -> None:
    """training_metrics.json (written by rank 0 at the end of the last launch) gets `restarts`: step, cause and
    seconds lost of each."""
    import json

    path = Path(output_dir) / METRICS_FILE
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    metrics["restarts"] = [asdict(r) for r in restarts]
    write_json_atomic(path, metrics)
