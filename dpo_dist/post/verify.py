"""Verification of a written model folder, before it is moved into place.

Hand-written: no library checks a merged model end to end. `verify_folder` checks that

* no written tensor has size 0, and a sharded save has its index covering every shard;
* the parameter count (unique parameters: tied ones count once) equals the base model's;
* tied input/output embeddings (Gemma 3) are still tied after reload (same ``data_ptr``);
* the folder reloads with ``AutoModelForCausalLM.from_pretrained`` and its fp32 logits on a fixed batch
  (`verify_batch`: `VERIFY_SENTENCES`, tokenized) match the reference: the unmerged PEFT model (base + adapter,
  adapter enabled) for an adapter, the in-memory model before saving otherwise. On the maximum absolute
  difference over real (unpadded) tokens, the tolerance is ``atol + rtol * max|reference logit|`` with
  ``(atol, rtol) = TOLERANCES[dtype]``: for fp32 merging only changes the summation order; for bf16 every
  weight is rounded to 8 significant bits (the written model is reloaded in fp32 for the comparison), and
  the comment at `TOLERANCES` gives the measured size of that rounding;
* the folder's logits equal those of the in-memory model it was saved from (after the dtype cast, evaluated
  in fp32): a save/reload round trip is exact, so its tolerance, ``ROUNDTRIP_TOLERANCE``, is tight whatever
  the dtype, which keeps a bf16 verification strict.

The tolerance and the rule actually applied are in the result (``tolerance``, ``tolerance_rule``), which the
merge report and the model card quote.
"""

from __future__ import annotations

from pathlib import Path

from dpo_dist.post.errors import MergeError
from dpo_dist.post.models import count_params, is_tied, load_causal_lm
from dpo_dist.post.sources import empty_tensors, read_json, tensor_shapes, weight_files

# (atol, rtol) per written dtype: max |logits_written - logits_reference| <= atol + rtol * max |logits_reference|.
# bf16, measured on the tiny models (this batch; every weight rounded to bf16 and back, logits in fp32): max |diff|
# up to 0.6% of max |logit| for Llama and 3.9% for Gemma 3 (at most 0.06, max |logit| 1.3 to 1.7), as built, with
# perturbed weights and with merged LoRA adapters (B ~ N(0, 0.01..0.05)); the worst case used 46% of this tolerance.
# An untrained adapter with B as large as A (peft's init_lora_weights=False) on Gemma 3 used 93% of it.
TOLERANCES = {"fp32": (1e-4, 1e-5), "bf16": (5e-2, 5e-2)}
# The written folder against the in-memory model it was saved from (after the dtype cast): a save/reload
# round trip is exact, so this is tight whatever the dtype; it is what makes a bf16 verification strict.
ROUNDTRIP_TOLERANCE = (1e-5, 1e-6)
VERIFY_SENTENCES = (
    "Human: How do I make banana bread?\n\nAssistant: Mash three ripe bananas and mix them with flour.",
    "Human: What should I pack for a week in Japan?\n\nAssistant: Check the weather before you pack.",
    "The quick brown fox jumps over the lazy dog.",
    "Write a unit test for each function so you notice when something breaks.",
)
VERIFY_MAX_TOKENS = 64


def tolerance_rule(dtype: str) -> str:
    """`TOLERANCES[dtype]` in words, as the report and the model card show it."""
    atol, rtol = TOLERANCES[dtype]
    return f"{atol:g} + {rtol:g} * max|reference logit| ({dtype})"


def verify_batch(tokenizer, vocab_size: int):
    """`VERIFY_SENTENCES` tokenized and right-padded; fixed random token ids when there is no tokenizer."""
    import torch  # deferred: torch takes seconds to import; --help and argument errors do not need it

    if tokenizer is not None:
        # One sentence at a time, padded here: the tokenizer (saved later) is not changed, even without a pad token.
        rows = [tokenizer(s, truncation=True, max_length=VERIFY_MAX_TOKENS)["input_ids"] for s in VERIFY_SENTENCES]
        rows = [r for r in rows if r]
        if rows:
            width = max(len(r) for r in rows)
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            mask = torch.zeros(len(rows), width, dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, : len(r)] = torch.tensor(r).clamp(0, vocab_size - 1)
                mask[i, : len(r)] = 1
            return {"input_ids": ids, "attention_mask": mask}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (len(VERIFY_SENTENCES), 32), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits(model, batch):
    """fp32 logits of `batch`, without gradients."""
    import torch  # deferred: torch takes seconds to import; --help and argument errors do not need it

    with torch.no_grad():
        return model(**batch).logits.float()


def verify_folder(folder: Path, *, reference_logits, saved_logits, batch, expected_params: int, expect_tied: bool,
                  dtype: str) -> dict:
    """Check the written folder; raise MergeError listing every failed check."""
    failures, result = [], {}
    files = weight_files(folder)
    if not files:
        failures.append("no weight files were written")
    index = folder / "model.safetensors.index.json"
    if len(files) > 1 or index.exists():
        data = read_json(index) or {}
        listed = set((data.get("weight_map") or {}).values())
        on_disk = {p.name for p in folder.glob("model-*-of-*.safetensors")}
        if not listed or listed != on_disk:
            failures.append(f"the shard index does not match the shards on disk: index {sorted(listed)}, "
                            f"disk {sorted(on_disk)}")
    empty = empty_tensors(files) if files else []
    if empty:
        failures.append(f"size-0 tensors: {', '.join(empty[:5])}")
    result["tensors"] = sum(len(tensor_shapes(f)) for f in files)
    model = load_causal_lm(str(folder), "the written folder")
    params = count_params(model)
    result["params"] = params
    if params != expected_params:
        failures.append(f"parameter count {params:,} != base model's {expected_params:,}")
    tied = is_tied(model)
    result["tied_embeddings"] = tied
    if expect_tied and not tied:
        failures.append("input and output embeddings are not tied after reload (lm_head.weight is not embed_tokens.weight)")
    got = logits(model, batch)
    mask = batch["attention_mask"].bool()

    def compare(ref, atol, rtol, what):
        if got.shape != ref.shape:
            failures.append(f"logits shape {tuple(got.shape)} != {what} {tuple(ref.shape)}")
            return float("inf"), 0.0
        diff = float((got - ref).abs()[mask].max())
        tol = atol + rtol * float(ref[mask].abs().max())
        if not diff <= tol:  # also catches NaN
            failures.append(f"logits differ from the {what} by {diff:.3g} > tolerance {tol:.3g}")
        return diff, tol

    diff, tol = compare(reference_logits, *TOLERANCES[dtype], "reference")
    rt_diff, rt_tol = compare(saved_logits, *ROUNDTRIP_TOLERANCE, "in-memory model it was saved from")
    result.update(max_logit_diff=diff, tolerance=tol, tolerance_rule=tolerance_rule(dtype),
                  roundtrip_max_logit_diff=rt_diff, roundtrip_tolerance=rt_tol)
    del model
    if failures:
        raise MergeError("verification failed: " + "; ".join(failures) + ". Nothing was written to the output.")
    return result
