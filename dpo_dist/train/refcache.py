"""Reference log-prob cache: one distributed pass before training, stored on disk, reused.

``--reference precomputed``, on every backend. TRL's own precompute refuses ZeRO-3 and keeps the
reference model in memory, and trl 0.9.6's (the Gaudi trainer's) reads the precomputed columns only
when ``rpo_alpha`` is set, so it silently recomputes the reference from the live policy; this does
none of that:

1. Key = sha256 of (the reference weights: the model folder's ``*.safetensors`` / ``*.bin``
   bytes; the tokenised train and eval data: their token ids; the engine's settings: max_length,
   max_prompt_length, max_completion_length, truncation mode, length normalisation, how the
   forward runs; dtype; the tokenizer's chat template, so that a changed template is a miss even where
   it would render the same token ids).
2. Hit: ``<cache_dir>/<key>.pt`` exists → load it (log "reference cache hit").
3. Miss: load a reference copy from the model path (the reference IS the initial policy: for
   LoRA the adapter-off model equals the base weights), wrap it as the trainer wraps its own reference
   under DeepSpeed (ZeRO-3 shards it: every rank runs forward on its shard of the pairs; shards
   are padded to equal length so the all-gathers inside forward line up), gather the
   log-probs to every rank, rank 0 writes the file atomically, then the reference is deleted.
4. The columns ``ref_chosen_logps`` / ``ref_rejected_logps`` are attached to the trainer's
   datasets; the engine's collator carries them into every batch, and the loss takes them from
   there instead of running a reference forward.

The log-probs come from the trainer's own ``concatenated_forward`` (the engine's, or TRL's in the
fallback), batched by the trainer's own collator, so they equal what a live reference would give
for the same rows.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
from pathlib import Path

from dpo_dist.data.chat_templates import template_fingerprint
from dpo_dist.util.atomic import write_atomic
from dpo_dist.util.paths import cache_root

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
FULL_HASH_LIMIT = 4 * 2**30  # hash every weight byte up to 4 GiB; beyond, size + header + sampled blocks
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def default_cache_dir() -> Path:
    return cache_root() / "refcache"


def weights_hash(model_path: str) -> str:
    """sha256 over the weight files of a local model folder (name, size, bytes). Above
    FULL_HASH_LIMIT in total, each file contributes its size, first and last 16 MiB and 64
    evenly spaced 1 MiB blocks (a 140 GB checkpoint would otherwise take minutes). A hub id
    that is not a folder hashes as its name (the hub revision is then the user's to pin)."""
    p = Path(model_path).expanduser()
    h = hashlib.sha256()
    if not p.is_dir():
        h.update(f"hub:{model_path}".encode())
        return h.hexdigest()
    files = sorted(f for f in p.iterdir() if f.suffix in WEIGHT_SUFFIXES and f.is_file())
    total = sum(f.stat().st_size for f in files)
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}\n".encode())
        with open(f, "rb") as fh:
            if total <= FULL_HASH_LIMIT:
                for block in iter(lambda: fh.read(2**24), b""):
                    h.update(block)
            else:
                offsets = [0, max(0, size - 2**24)] + [size * i // 64 for i in range(64)]
                for off in offsets:
                    fh.seek(off)
                    h.update(fh.read(2**24 if off in (0, max(0, size - 2**24)) else 2**20))
    return h.hexdigest()


def data_hash(dataset, columns=("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")) -> str:
    """sha256 over the token ids of a TRL-tokenised dataset, row order included."""
    import numpy as np

    h = hashlib.sha256(f"rows:{len(dataset)}".encode())
    for col in columns:
        for start in range(0, len(dataset), 4096):
            for ids in dataset[start:start + 4096][col]:
                a = np.asarray(ids, dtype=np.int64)
                h.update(np.int64(len(a)).tobytes())
                h.update(a.tobytes())
    return h.hexdigest()


def cache_key(*, weights: str, train: str, eval_: str | None, settings: dict) -> str:
    blob = json.dumps({"v": CACHE_VERSION, "weights": weights, "train": train, "eval": eval_, "settings": settings},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def trainer_settings(trainer, bf16: bool) -> dict:
    """What the cached log-probs depend on beside the weights and the token ids: the engine's row layout,
    length normalisation, how they were computed (chunked, packed, static, attention keywords), the dtype and the
    chat template the rows were rendered with. The trainer's fallback forward (no engine) is keyed by trl's own
    settings."""
    tokenizer = getattr(trainer, "processing_class", None) or getattr(trainer, "tokenizer", None)
    template = template_fingerprint(tokenizer)
    e = getattr(trainer, "dpodist_engine", None)
    if e is None:
        a = trainer.args
        return dict(engine=False, max_length=trainer.max_length, max_prompt_length=a.max_prompt_length,
                    max_completion_length=a.max_completion_length, truncation_mode=trainer.truncation_mode,
                    ipo="ipo" in trainer.loss_type, bf16=bf16, chat_template=template)
    return dict(engine=True, max_length=e.max_length, max_prompt_length=e.max_prompt_length,
                max_completion_length=e.max_completion_length, truncation_mode=e.truncation_mode,
                length_normalised=e.length_normalised, chunked=e.chunked, packing=e.packing,
                packing_attention=e.packing_attention, share_prompt=e.share_prompt, static_shapes=e.static_shapes,
                forward_kwargs=sorted(e.forward_kwargs.items()), bf16=bf16, chat_template=template)


def _dist():
    import torch.distributed as dist

    ok = dist.is_available() and dist.is_initialized()
    return (dist.get_rank(), dist.get_world_size()) if ok else (0, 1)


def compute_logps(trainer, ref_model, dataset, batch_size: int) -> tuple[list[float], list[float]]:
    """Every rank runs forward on rows rank::world (padded to equal count), results gathered."""
    import torch
    import torch.distributed as dist

    rank, world = _dist()
    n = len(dataset)
    # Longest first, dealt round-robin: each batch holds rows of similar length (little padding,
    # the first batch shows the peak), and every rank gets the same number of rows.
    lens = [len(p) + max(len(c), len(r)) for p, c, r in zip(
        dataset["prompt_input_ids"], dataset["chosen_input_ids"], dataset["rejected_input_ids"])]
    order = sorted(range(n), key=lambda i: -lens[i])
    mine = order[rank::world]
    per_rank = -(-n // world)
    mine += [mine[-1] if mine else 0] * (per_rank - len(mine))  # equal forwards on every rank (ZeRO-3)
    device = trainer.accelerator.device
    chosen, rejected = [], []
    ref_model.eval()
    with torch.no_grad():
        for s in range(0, len(mine), batch_size):
            rows = [dataset[i] for i in mine[s:s + batch_size]]
            batch = trainer.data_collator(rows)
            batch = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in batch.items()}
            out = trainer.concatenated_forward(ref_model, batch, is_ref_model=True)
            chosen += out["chosen_logps"].float().cpu().tolist()
            rejected += out["rejected_logps"].float().cpu().tolist()
    local = (mine, chosen, rejected)
    parts = [local]
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, local)
    c_all, r_all = [0.0] * n, [0.0] * n
    for idx, c, r in parts:
        for i, a, b in zip(idx, c, r):
            c_all[i], r_all[i] = a, b
    return c_all, r_all


def prepare_reference_model(trainer, model):
    """A reference copy made ready the way the trainer prepares its own: a DeepSpeed inference engine under
    DeepSpeed (ZeRO-3 shards it, no optimizer), else moved to the device."""
    if trainer.is_deepspeed_enabled:
        own = getattr(trainer, "_prepare_deepspeed", None)  # trl 0.9.6 (the Gaudi trainer) has it as a method
        if own is not None:
            return own(model)
        from trl.models.utils import prepare_deepspeed  # trl 0.22

        return prepare_deepspeed(model, trainer.accelerator)
    return model.to(trainer.accelerator.device)


def _free(model) -> None:
    destroy = getattr(model, "destroy", None)
    if callable(destroy):
        try:
            destroy()
        except Exception:  # best effort: only frees hooks
            pass
    del model
    gc.collect()
    release_host_memory()


def release_host_memory() -> None:
    """Hand freed heap back to the OS (glibc malloc_trim). Without it the reference pass's
    activations stay in this process's RSS and training allocates on top (measured on CPU: +2 GiB
    per rank on the bench model)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def attach_reference_cache(trainer, *, model_path: str, load_model, cache_dir: str | None = None,
                           batch_size: int | None = None, bf16: bool = False) -> dict:
    """Attach cached (or freshly computed) reference log-probs to trainer.train/eval_dataset.

    ``load_model()`` returns a fresh reference model (only called on a miss). Returns
    {"hit": bool, "path": str, "key": str, "seconds": float}.
    """
    import time

    import torch

    t0 = time.perf_counter()
    rank, world = _dist()
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    train, evald = trainer.train_dataset, trainer.eval_dataset
    if isinstance(evald, dict):
        raise ValueError("reference cache: several eval datasets are not supported")
    key = cache_key(weights=weights_hash(model_path), train=data_hash(train),
                    eval_=data_hash(evald) if evald is not None else None, settings=trainer_settings(trainer, bf16))
    path = cache / f"{key}.pt"
    hit = path.is_file()
    if world > 1:  # all ranks must agree (a file appearing between checks would split them)
        import torch.distributed as dist

        flags = [None] * world
        dist.all_gather_object(flags, hit)
        hit = all(flags)
    if hit:
        data = torch.load(path, map_location="cpu", weights_only=True)
        logger.info("reference cache hit: %s", path)
    else:
        logger.info("reference cache miss: computing reference log-probs for %d + %d pairs -> %s",
                    len(train), len(evald) if evald is not None else 0, path)
        # The training micro-batch: its no-grad forward stays well inside the training peak.
        bs = batch_size or trainer.args.per_device_train_batch_size
        ref = prepare_reference_model(trainer, load_model())
        data = {}
        for name, ds in (("train", train), ("eval", evald)):
            if ds is None:
                continue
            c, r = compute_logps(trainer, ref, ds, bs)
            data[f"{name}_chosen"] = torch.tensor(c, dtype=torch.float32)
            data[f"{name}_rejected"] = torch.tensor(r, dtype=torch.float32)
        _free(ref)
        ref = None
        if rank == 0:
            write_atomic(path, lambda tmp: torch.save(data, tmp))
    trainer.train_dataset = _with_columns(train, data["train_chosen"], data["train_rejected"])
    if evald is not None:
        trainer.eval_dataset = _with_columns(evald, data["eval_chosen"], data["eval_rejected"])
    return {"hit": bool(hit), "path": str(path), "key": key, "seconds": time.perf_counter() - t0}


def _with_columns(ds, chosen, rejected):
    for name in ("ref_chosen_logps", "ref_rejected_logps"):
        if name in ds.column_names:
            ds = ds.remove_columns(name)
    ds = ds.add_column("ref_chosen_logps", chosen.numpy().tolist())
    return ds.add_column("ref_rejected_logps", rejected.numpy().tolist())
