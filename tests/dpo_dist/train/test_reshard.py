"""Resharding a checkpoint to another number of ranks (dpo_dist.train.reshard), without launching ranks: the plan
from small stand-in checkpoints (the file names and rank 0's DeepSpeed state, as DeepSpeed writes them), every
refusal with its numbers and fix, the reuse of a complete conversion, and the claim the reshard rests on: the pairs
of a global step do not depend on the number of ranks when ranks x accumulation is kept (both samplers).
The real conversion and the loss curve across it: tests/e2e/test_reshard_runs.py."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dpo_dist.train.reshard import (
    LATEST_UNIVERSAL,
    convert_to_universal,
    finish_reshard,
    plan_reshard,
    prepare_reshard,
    universal_problems,
)
from dpo_dist.util.checkpoint import checkpoint_problems, saved_world_size
from dpo_dist.util.errors import ArgumentError, UserError

TAG = "global_step6"
GROUP = {"lr": 1e-3, "initial_lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}


def make_checkpoint(root: Path, *, ranks=2, stage=3, micro=4, accum=1, weight_decays=(0.0, 0.0), offload=None,
                    deepspeed=True, drop_rank=None) -> Path:
    """A stand-in checkpoint-6 folder: the names HF's trainer and DeepSpeed write, rank 0's DeepSpeed state with
    its ds_config (what the plan reads), tiny optimizer shards."""
    ckpt = root / "checkpoint-6"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 6, "log_history": []}))
    torch.save({}, ckpt / "scheduler.pt")
    for r in range(ranks):
        torch.save({}, ckpt / (f"rng_state_{r}.pth" if ranks > 1 else "rng_state.pth"))
    if not deepspeed:
        torch.save({}, ckpt / "optimizer.pt")
        torch.save({}, ckpt / "pytorch_model.bin")
        torch.save(SimpleNamespace(per_device_train_batch_size=micro, gradient_accumulation_steps=accum),
                   ckpt / "training_args.bin")
        return ckpt
    (ckpt / "latest").write_text(TAG)
    tag = ckpt / TAG
    tag.mkdir()
    zero = {"stage": stage, **({"offload_optimizer": {"device": offload}} if offload else {})}
    ds_config = {"train_batch_size": micro * accum * ranks, "train_micro_batch_size_per_gpu": micro,
                 "gradient_accumulation_steps": accum, "zero_optimization": zero}
    groups = [{**GROUP, "weight_decay": wd, "params": [i]} for i, wd in enumerate(weight_decays)]
    for r in range(ranks):
        if r == drop_rank:
            continue
        state = {"module": None, "dp_world_size": ranks, "mp_world_size": 1, "ds_config": ds_config,
                 "ds_version": "0.19.8", "global_steps": 6}
        torch.save(state, tag / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
        optim = {"optimizer_state_dict": {"zero_stage": stage, "partition_count": ranks,
                                          "optimizer_state_dict": {"state": {}, "param_groups": groups}}}
        torch.save(optim, tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    return ckpt


def ds_file(tmp_path, **zero) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": "auto", "gradient_accumulation_steps": "auto",
                                "zero_optimization": {"stage": 3, **zero}}))
    return str(path)


def targs(ckpt, ds, *, micro=4, accum=1):
    return SimpleNamespace(resume_from_checkpoint=str(ckpt), deepspeed=ds, per_device_train_batch_size=micro,
                           gradient_accumulation_steps=accum, output_dir=str(Path(ckpt).parent))


def refused(ckpt, args, world_size) -> str:
    with pytest.raises(ArgumentError) as e:
        plan_reshard(ckpt, args, world_size=world_size)
    msg = str(e.value)
    assert "Nothing was changed" in msg, msg
    return msg


def test_same_world_size_resumes_as_saved(tmp_path):
    ckpt = make_checkpoint(tmp_path)
    assert saved_world_size(ckpt) == 2
    assert plan_reshard(ckpt, targs(ckpt, ds_file(tmp_path)), world_size=2) is None
    assert plan_reshard(None, targs(ckpt, ds_file(tmp_path)), world_size=1) is None


def test_checkpoint_of_another_world_size_is_complete(tmp_path):
    """The completeness check counts the files of the ranks that saved it, not this run's ranks."""
    ckpt = make_checkpoint(tmp_path)
    for world_size in (1, 2, 4):
        assert checkpoint_problems(ckpt, world_size=world_size, deepspeed=True) == []
    (ckpt / TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    (ckpt / "rng_state_0.pth").unlink()
    problems = checkpoint_problems(ckpt, world_size=1, deepspeed=True)
    assert f"{TAG}/zero_pp_rank_1_mp_rank_00_optim_states.pt is missing" in problems
    assert "rng_state_0.pth is missing (the RNG state of that rank)" in problems


@pytest.mark.parametrize("saved,now,accum,new_accum", [(2, 1, 1, 2), (1, 2, 2, 1), (2, 4, 4, 2), (4, 2, 3, 6)])
def test_plan_scales_the_accumulation(tmp_path, monkeypatch, saved, now, accum, new_accum):
    ckpt = make_checkpoint(tmp_path, ranks=saved, accum=accum)
    args = targs(ckpt, ds_file(tmp_path), accum=accum)
    plan = plan_reshard(ckpt, args, world_size=now)
    assert (plan.saved_world_size, plan.world_size, plan.zero_stage, plan.tag) == (saved, now, 3, TAG)
    assert (plan.saved_accumulation, plan.accumulation, plan.global_batch) == (accum, new_accum, 4 * accum * saved)
    assert plan.universal_tag == TAG + "_universal"
    # This run's arguments: the scaled accumulation, and DeepSpeed's universal load on top of the user's config.
    monkeypatch.setenv("WORLD_SIZE", str(now))
    assert prepare_reshard(ckpt, args) == plan
    assert args.gradient_accumulation_steps == new_accum
    assert args.deepspeed["checkpoint"] == {"load_universal": True}
    assert args.deepspeed["zero_optimization"]["stage"] == 3
    # Passing the scaled value yourself is the same plan.
    assert plan_reshard(ckpt, targs(ckpt, ds_file(tmp_path), accum=new_accum), world_size=now) == plan


def test_refuses_an_accumulation_that_does_not_divide(tmp_path):
    ckpt = make_checkpoint(tmp_path, ranks=3, accum=1)
    msg = refused(ckpt, targs(ckpt, ds_file(tmp_path)), world_size=2)
    assert "global batch is 12 pairs (3 ranks x 4 pairs x 1 accumulation steps)" in msg, msg
    assert "2 ranks x 4 pairs do not divide it" in msg, msg
    assert "Launch with a number of ranks that divides 3 (1, 3)" in msg, msg


def test_a_checkpoint_without_deepspeed_keeps_its_global_batch(tmp_path, monkeypatch):
    """DDP (or one process): the whole optimizer state is in optimizer.pt; no conversion, the accumulation scaled."""
    ckpt = make_checkpoint(tmp_path, ranks=2, accum=2, deepspeed=False)
    assert saved_world_size(ckpt) == 2 and checkpoint_problems(ckpt, world_size=4) == []
    assert plan_reshard(ckpt, targs(ckpt, None, accum=2), world_size=2) is None
    args = targs(ckpt, None, accum=2)
    monkeypatch.setenv("WORLD_SIZE", "4")
    plan = prepare_reshard(ckpt, args)
    assert (plan.tag, plan.universal_tag, plan.saved_accumulation, plan.accumulation) == (None, None, 2, 1)
    assert args.gradient_accumulation_steps == 1 and args.deepspeed is None
    finish_reshard(plan, _Args(0))  # nothing to convert
    msg = refused(ckpt, targs(ckpt, None, accum=2), world_size=3)
    assert "(saved by 2 ranks without DeepSpeed; this run has 3)" in msg and "divides 4 (1, 2, 4)" in msg, msg


def test_refuses_a_changed_micro_batch_or_accumulation(tmp_path):
    ckpt = make_checkpoint(tmp_path, ranks=2, accum=2)
    msg = refused(ckpt, targs(ckpt, ds_file(tmp_path), micro=8, accum=2), world_size=1)
    assert msg.startswith("--per_device_train_batch_size 8:") and "Pass --per_device_train_batch_size 4" in msg, msg
    msg = refused(ckpt, targs(ckpt, ds_file(tmp_path), accum=3), world_size=1)
    assert msg.startswith("--gradient_accumulation_steps 3:"), msg
    assert "global batch is 16 pairs" in msg and "Pass --gradient_accumulation_steps 4 (or 2, the saved value" in msg


@pytest.mark.parametrize("where", ["run", "checkpoint"])
def test_refuses_nvme_offload(tmp_path, where):
    ckpt = make_checkpoint(tmp_path, offload="nvme" if where == "checkpoint" else None)
    ds = ds_file(tmp_path, **({"offload_optimizer": {"device": "nvme"}} if where == "run" else {}))
    msg = refused(ckpt, targs(ckpt, ds), world_size=1)
    assert "DeepSpeed cannot reshard with NVMe offload (zero_optimization.offload_optimizer.device=nvme)" in msg, msg
    assert "Launch with 2 ranks" in msg, msg
    if where == "run":  # CPU offload is resharded
        assert plan_reshard(ckpt, targs(ckpt, ds_file(tmp_path, offload_optimizer={"device": "cpu"})), 1) is not None


def test_refuses_zero3_groups_with_different_hyperparameters(tmp_path):
    ckpt = make_checkpoint(tmp_path, weight_decays=(0.1, 0.0))
    msg = refused(ckpt, targs(ckpt, ds_file(tmp_path)), world_size=1)
    assert "differ in weight_decay (0.1, 0.0)" in msg and "first group's hyperparameters" in msg, msg
    # Stage 1 and 2 load each group's own: no refusal.
    other = make_checkpoint(tmp_path / "z2", stage=2, weight_decays=(0.1, 0.0))
    assert plan_reshard(other, targs(other, ds_file(tmp_path)), world_size=1).zero_stage == 2


def test_refuses_what_it_cannot_check(tmp_path):
    plain = make_checkpoint(tmp_path / "plain", deepspeed=False)
    msg = refused(plain, targs(plain, ds_file(tmp_path)), world_size=1)
    assert msg.startswith("--deepspeed: ") and "saved by 2 ranks without DeepSpeed" in msg, msg
    assert "holds no DeepSpeed engine state" in msg and "Resume it without --deepspeed" in msg, msg
    (plain / "training_args.bin").unlink()
    msg = refused(plain, targs(plain, None), world_size=1)
    assert "does not record its micro-batch and accumulation" in msg and "Launch with 2 ranks" in msg, msg

    ckpt = make_checkpoint(tmp_path / "ds")
    msg = refused(ckpt, targs(ckpt, None), world_size=1)
    assert "this run has no --deepspeed" in msg, msg

    # Every file of rank 1 is gone (shards and RNG): the names say 1 rank, rank 0's state says 2.
    short = make_checkpoint(tmp_path / "short", drop_rank=1)
    (short / "rng_state_1.pth").unlink()
    msg = refused(short, targs(short, ds_file(tmp_path)), world_size=1)
    assert "was saved by 2 ranks (dp_world_size in its rank-0 model state), but only the files of 1" in msg, msg


class _Args:
    """The part of TrainingArguments finish_reshard uses, for one process."""

    def __init__(self, rank):
        self.process_index = rank

    @contextlib.contextmanager
    def main_process_first(self, local=True, desc=""):
        yield


def _complete_universal(ckpt: Path):
    udir = ckpt / (TAG + "_universal")
    (udir / "zero").mkdir(parents=True)
    torch.save({}, udir / "zero" / "optimizer_state.pt")
    torch.save({}, udir / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    (ckpt / LATEST_UNIVERSAL).write_text(TAG + "_universal")


def test_a_complete_conversion_is_reused_and_a_missing_one_is_reported(tmp_path, caplog):
    ckpt = make_checkpoint(tmp_path)
    plan = plan_reshard(ckpt, targs(ckpt, ds_file(tmp_path)), world_size=1)
    assert universal_problems(ckpt, TAG) == [f"{LATEST_UNIVERSAL} does not name {TAG}_universal",
                                             f"{TAG}_universal/zero/optimizer_state.pt is missing",
                                             f"{TAG}_universal/ holds no *_model_states.pt"]
    with pytest.raises(UserError, match="rank 1 does not see the universal checkpoint rank 0 was to write"):
        finish_reshard(plan, _Args(1))
    _complete_universal(ckpt)
    assert universal_problems(ckpt, TAG) == []
    with caplog.at_level(logging.INFO, logger="dpo_dist"):
        finish_reshard(plan, _Args(0))
    assert "reusing DeepSpeed's universal checkpoint" in caplog.text
    finish_reshard(None, _Args(0))  # nothing to do


def test_a_failed_conversion_leaves_the_checkpoint_as_it_was(tmp_path):
    ckpt = make_checkpoint(tmp_path)  # stand-in shards: DeepSpeed's converter cannot read them
    before = sorted(p.relative_to(ckpt) for p in ckpt.rglob("*"))
    with pytest.raises(UserError, match="DeepSpeed's ds_to_universal failed"):
        convert_to_universal(ckpt, TAG)
    assert sorted(p.relative_to(ckpt) for p in ckpt.rglob("*")) == before


# --- the pairs of a global step, for any number of ranks ---------------------------------------------------


def _steps(per_rank: list[list[list[int]]], accum: int) -> list[list[int]]:
    """The sorted pairs of every optimizer step: rank r's micro-batches s*accum .. s*accum+accum-1, all ranks."""
    n = min(len(b) for b in per_rank) // accum
    return [sorted(i for batches in per_rank for m in range(accum) for i in batches[s * accum + m]) for s in range(n)]


def _trainer_sampler(world, n=96, micro=4, seed=7):
    """What HF's Trainer builds on every rank (a RandomSampler, prepared by accelerate with its seedable sampler
    and the data seed, as transformers' default AcceleratorConfig does)."""
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader, RandomSampler

    out = []
    for rank in range(world):
        data = list(range(n))
        loader = prepare_data_loader(DataLoader(data, batch_size=micro, sampler=RandomSampler(data)),
                                     device=torch.device("cpu"), num_processes=world, process_index=rank,
                                     put_on_device=False, use_seedable_sampler=True, data_seed=seed)
        loader.set_epoch(1)
        out.append([b.tolist() for b in loader])
    return out


def _bucket_sampler(world, n=96, micro=4, seed=7, packed=False):
    from dpo_dist.data.bucketing import BucketBatchSampler, PackedBatchSampler

    lengths = [(17 * i) % 61 + 5 for i in range(n)]
    out = []
    for rank in range(world):
        if packed:
            s = PackedBatchSampler([2 * x for x in lengths], micro, num_replicas=world, rank=rank, seed=seed, window=4)
        else:
            s = BucketBatchSampler(lengths, lengths[::-1], [20, 40, 66], micro, num_replicas=world, rank=rank,
                                   seed=seed)
        s.set_epoch(1)
        out.append(list(s))
    return out


@pytest.mark.parametrize("sampler", ["trainer", "buckets", "packed"])
def test_the_pairs_of_a_step_do_not_depend_on_the_number_of_ranks(sampler):
    make = {"trainer": _trainer_sampler, "buckets": _bucket_sampler,
            "packed": lambda w: _bucket_sampler(w, packed=True)}[sampler]
    two, one, four = _steps(make(2), 1), _steps(make(1), 2), _steps(make(4), 1)
    assert len(two) == len(one) == 12 and two == one, "2 ranks x 1 micro-step vs 1 rank x 2"
    assert _steps(make(1), 4) == _steps(make(2), 2) == four, "global batch 16: 1x4, 2x2, 4x1"
    assert len({tuple(s) for s in two}) == len(two)  # and the steps are not all the same
