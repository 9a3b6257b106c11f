"""Post-step: turn a training output into a verified Hugging Face model folder.

    python -m dpo_dist.merge --checkpoint DIR --output DIR [--base_model M] [--dtype fp32|bf16]
                             [--no_verify] [--overwrite] [--max_shard_size 2GB]

``--checkpoint`` is a full model folder, a PEFT adapter folder, a DeepSpeed ZeRO checkpoint (with or without
an adapter), or an output folder with ``checkpoint-*`` subfolders; saves without ZeRO-3's 16-bit gather are
re-gathered or refused (`dpo_dist.post.sources` says how each is recognised). The stages, each in its module:

1. gather / load (`dpo_dist.post.sources`, `dpo_dist.post.models`): ZeRO shards are gathered with DeepSpeed's
   ``zero_to_fp32``; an adapter is put on its base (``--base_model``, else the adapter's
   ``base_model_name_or_path``);
2. merge: PEFT's ``merge_and_unload`` for an adapter;
3. write: ``save_pretrained`` into ``<output>.tmp-<pid>`` in ``--dtype``;
4. verify (`dpo_dist.post.verify`, on by default): the written folder reloads, and its fp32 logits match the
   reference within ``verify.TOLERANCES[--dtype]`` and the in-memory model it was saved from within
   ``verify.ROUNDTRIP_TOLERANCE``;
5. publish (`dpo_dist.post.publish`): swapped into place atomically. An existing non-empty ``<output>`` is
   refused unless ``--overwrite``; the leftovers of a killed merge are cleaned up by the next one; a failed or
   interrupted merge leaves no ``<output>``.

Output: sharded safetensors (with ``model.safetensors.index.json`` when sharded), ``config.json``,
``generation_config.json``, the tokenizer (from the checkpoint folder, else the base model), a model card
``README.md`` with the training metrics (`dpo_dist.post.card`: allow-listed keys only, never environment
values), and ``merge_report.json`` (the report `merge_model` returns).

Memory: everything runs on the CPU of one host in fp32; the peak is about two fp32 copies of the model
(the gathered state dict while it is loaded, or base + merged-in-place model; the in-memory model is freed
before the written folder is reloaded for verification).

Exit codes: 0 ok; 1 merge or verification failure (``MergeError``); 2 bad arguments (``MergeArgumentError``:
missing or unrecognised ``--checkpoint``, an existing ``--output`` without ``--overwrite``, an unreachable base
model path, a bad ``--max_shard_size``). Test hook: ``DPO_DIST_MERGE_PAUSE_BEFORE_RENAME=<seconds>`` (see
`dpo_dist.post.publish`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from dpo_dist.post.card import model_card
from dpo_dist.post.errors import MergeArgumentError, MergeError
from dpo_dist.post.models import cast_params, load_for_merge, load_tokenizer
from dpo_dist.post.publish import clean_stale, make_temp, output_nonempty, publish, unlock
from dpo_dist.post.sources import (
    check_zero_files,
    detect_source,
    gather_zero,
    resolve_base,
    tensor_shapes,
    weight_files,
)
from dpo_dist.post.verify import TOLERANCES, logits, verify_batch, verify_folder
from dpo_dist.util.errors import ArgumentError
from dpo_dist.util.hfargs import parse_dataclasses
from dpo_dist.util.layout import MERGE_REPORT
from dpo_dist.util.logs import setup_logging

__all__ = ["MergeArgumentError", "MergeArguments", "MergeError", "main", "merge_model", "parse_args"]

logger = logging.getLogger("dpo_dist.merge")

DTYPES = tuple(TOLERANCES)  # the dtypes verification has a tolerance for: fp32, bf16


@dataclass
class MergeArguments:
    checkpoint: str = field(
        metadata={"help": "Training output to merge: a model folder, a PEFT adapter folder, a DeepSpeed ZeRO "
                          "checkpoint folder (global_stepN/ + latest), or an output_dir with checkpoint-* folders."}
    )
    output: str = field(metadata={"help": "Folder to write the merged Hugging Face model into (written atomically)."})
    base_model: str | None = field(
        default=None,
        metadata={"help": "Base model (hub id or folder). Default: the adapter's base_model_name_or_path, else the "
                          "'model' in training_metrics.json."},
    )
    dtype: str = field(default="fp32", metadata={"help": "dtype of the written weights.", "choices": list(DTYPES)})
    no_verify: bool = field(default=False, metadata={"help": "Skip the verification (not recommended)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing non-empty --output folder."})
    max_shard_size: str = field(default="2GB", metadata={"help": "Largest safetensors shard, e.g. 500MB, 2GB, 5GB."})


@contextlib.contextmanager
def _stage(name: str, timings: dict):
    logger.info("%s ...", name)
    t0 = time.perf_counter()
    yield
    dt = time.perf_counter() - t0
    timings[name] = round(dt, 3)
    logger.info("%s done in %.2fs", name, dt)


def _validate(checkpoint, output, dtype, max_shard_size) -> tuple[Path, Path]:
    # deferred: transformers takes seconds to import; --help does not need it
    from transformers.utils.hub import convert_file_size_to_int

    if not checkpoint:
        raise MergeArgumentError("--checkpoint is required.")
    if not output:
        raise MergeArgumentError("--output is required.")
    ckpt = Path(checkpoint).expanduser()
    if not ckpt.exists():
        raise MergeArgumentError(f"--checkpoint {checkpoint}: no such folder.")
    if not ckpt.is_dir():
        raise MergeArgumentError(f"--checkpoint {checkpoint}: not a folder.")
    if dtype not in DTYPES:
        raise MergeArgumentError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}.")
    try:
        if convert_file_size_to_int(max_shard_size) <= 0:
            raise ValueError
    except (ValueError, TypeError):
        raise MergeArgumentError(f"--max_shard_size {max_shard_size!r}: expected a size such as 500MB, 2GB or 5GB.") from None
    out = Path(output).expanduser()
    ckpt_r, out_r = ckpt.resolve(), out.resolve()
    if out_r == ckpt_r or out_r in ckpt_r.parents:
        raise MergeArgumentError(f"--output {output}: it is, or contains, --checkpoint {checkpoint}; choose another folder.")
    if out.exists() and not out.is_dir():
        raise MergeArgumentError(f"--output {output}: exists and is not a folder.")
    parent = out_r.parent
    if not parent.exists():
        parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MergeArgumentError(f"--output {output}: {parent} is not writable.")
    return ckpt, out_r


def merge_model(checkpoint, output, *, base_model: str | None = None, dtype: str = "fp32", verify: bool = True,
                overwrite: bool = False, max_shard_size: str = "2GB") -> dict:
    """Merge a training output into a verified Hugging Face folder at `output` (see the module doc).

    Returns a report: kind, checkpoint, output, base_model, dtype, params, tensors, max_logit_diff, tolerance,
    seconds (and per-stage timings, notes). Raises MergeArgumentError (bad arguments) or MergeError."""
    t_start = time.perf_counter()
    ckpt, out = _validate(checkpoint, output, dtype, max_shard_size)
    cleaned = clean_stale(out)
    if output_nonempty(out) and not overwrite:
        raise MergeArgumentError(f"--output {output}: exists and is not empty. Nothing was changed. Pass --overwrite "
                                 "to replace it, or choose another folder.")
    if output_nonempty(out) and not (out.is_dir() and (out / "config.json").is_file()):
        # --overwrite replaces a model folder, never a folder of other files (a home folder, a source tree).
        raise MergeArgumentError(f"--output {output}: holds files that are not a model folder (no config.json). "
                                 "Nothing was changed. --overwrite replaces only an earlier merged model: choose "
                                 "another --output.")
    timings: dict = {}
    source = detect_source(ckpt)
    logger.info("input: %s (%s)%s", ckpt, source.kind,
                f", ZeRO checkpoint {source.zero_dir}/{source.zero_tag}" if source.zero_dir else "")
    base, base_from = resolve_base(base_model, source)

    import torch  # deferred: torch takes seconds to import; argument errors above do not need it

    tmp, lock = make_temp(out)
    try:
        # 1. Gather / load.
        sd = None
        if source.zero_dir is not None:
            with _stage("gathering ZeRO shards", timings):
                check_zero_files(source.zero_dir, source.zero_tag)
                sd = gather_zero(source.zero_dir, source.zero_tag)
                logger.info("gathered %d tensors from %s/%s", len(sd), source.zero_dir, source.zero_tag)
        with _stage("loading", timings):
            loaded = load_for_merge(source, sd, base)
            sd = None  # loaded into the model: free the gathered copy
            # `model` is the only reference, so `del model` below frees it before the verification reloads.
            model, loaded.model = loaded.model, None
            expected_params = loaded.expected_params
            tokenizer, tokenizer_from = load_tokenizer(source, base)
            batch = verify_batch(tokenizer, model.get_input_embeddings().weight.shape[0])
            ref_logits = logits(model, batch) if verify else None

        # 2. Merge.
        if source.is_adapter:
            with _stage("merging LoRA (merge_and_unload)", timings):
                model = model.merge_and_unload()
                model.eval()
        # 3. Write.
        with _stage("writing", timings):
            target = torch.bfloat16 if dtype == "bf16" else torch.float32
            cast_params(model, target)
            model.config.torch_dtype = target
            # bf16 -> fp32 -> bf16 is lossless: the fp32 logits of exactly the weights being written.
            saved_logits = None
            if verify:
                cast_params(model, torch.float32)
                saved_logits = logits(model, batch)
                cast_params(model, target)
            bad = [n for n, p in model.state_dict().items() if p.numel() == 0]
            if bad:
                raise MergeError(f"the merged model has size-0 tensors: {', '.join(bad[:5])}")
            gen_src = next((p for p in (source.folder, source.zero_dir) if p and (p / "generation_config.json").exists()), None)
            if gen_src is None and base:
                gen_src = base
            if gen_src is not None:
                from transformers import GenerationConfig  # deferred: transformers takes seconds to import

                with contextlib.suppress(Exception):
                    model.generation_config = GenerationConfig.from_pretrained(str(gen_src))
            model.save_pretrained(str(tmp), safe_serialization=True, max_shard_size=max_shard_size)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            del model
        report = {
            "kind": source.kind, "checkpoint": str(ckpt), "output": str(out), "base_model": base,
            "base_model_from": base_from, "zero_checkpoint": f"{source.zero_dir}/{source.zero_tag}" if source.zero_dir else None,
            "tokenizer_from": tokenizer_from, "dtype": dtype, "reference": loaded.reference,
            "notes": source.notes + cleaned,
        }
        # 4. Verify.
        if verify:
            with _stage("verifying", timings):
                v = verify_folder(tmp, reference_logits=ref_logits, saved_logits=saved_logits, batch=batch,
                                  expected_params=expected_params, expect_tied=loaded.expect_tied, dtype=dtype)
            logger.info("verified: %d params (base %d), %d tensors, tied embeddings %s, max logit diff %.3g <= %.3g",
                        v["params"], expected_params, v["tensors"], v["tied_embeddings"], v["max_logit_diff"], v["tolerance"])
            report.update(verification=v, params=v["params"], tensors=v["tensors"], max_logit_diff=v["max_logit_diff"],
                          tolerance=v["tolerance"])
        else:
            files = weight_files(tmp)
            report.update(verification=None, params=expected_params, tensors=sum(len(tensor_shapes(f)) for f in files),
                          max_logit_diff=None, tolerance=None)
            logger.warning("verification skipped (--no_verify)")
        report["expected_params"] = expected_params
        report["timings"] = timings
        report["seconds"] = round(time.perf_counter() - t_start, 3)
        (tmp / "README.md").write_text(model_card(report, source.metrics))
        (tmp / MERGE_REPORT).write_text(json.dumps(report, indent=2) + "\n")

        # 5. Into place.
        publish(tmp, out, overwrite=overwrite, output_arg=output)
        report["seconds"] = round(time.perf_counter() - t_start, 3)
        logger.info("wrote %s (%s, %s) in %.1fs", out, source.kind, dtype, report["seconds"])
        return report
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        unlock(lock)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> MergeArguments:
    (args,) = parse_dataclasses(MergeArguments, argv, prog="python -m dpo_dist.merge", description=(
        "Gather ZeRO shards / merge LoRA, verify, and write a Hugging Face model folder atomically."))
    return args


def _on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    try:
        args = parse_args(argv)  # argparse's own usage errors exit 2 with the usage
    except ArgumentError as e:
        print(f"dpo_dist.merge: error: {e}", file=sys.stderr)
        return 2
    with contextlib.suppress(ValueError):  # not in the main thread
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        report = merge_model(args.checkpoint, args.output, base_model=args.base_model, dtype=args.dtype,
                             verify=not args.no_verify, overwrite=args.overwrite, max_shard_size=args.max_shard_size)
    except ArgumentError as e:
        print(f"dpo_dist.merge: error: {e}", file=sys.stderr)
        return 2
    except MergeError as e:
        logger.error("merge failed: %s", e)
        print(f"dpo_dist.merge: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dpo_dist.merge: interrupted; no output was written.", file=sys.stderr)
        return 130
    print(json.dumps({k: report[k] for k in ("kind", "output", "params", "tensors", "max_logit_diff", "tolerance",
                                             "seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
