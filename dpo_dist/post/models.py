"""The models of the merge post-step, built in memory from what `dpo_dist.post.sources` found.

Everything runs on the CPU in fp32. Gemma 3 ties ``lm_head`` to ``embed_tokens``. ``zero_to_fp32
--safe_serialization`` fails on such shared tensors, so the Python API is used: both names point at one tensor,
it is loaded into a model whose weights are tied, and ``save_pretrained`` writes it once; after reload they must
be tied again (`dpo_dist.post.verify` checks).

torch, transformers and peft are imported inside the functions that use them: importing them takes seconds,
and ``--help`` or an argument error needs none of them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpo_dist.post.errors import MergeArgumentError, MergeError
from dpo_dist.post.sources import ADAPTER_CONFIG, Source, adapter_weight_file, has_tokenizer, tensor_shapes

logger = logging.getLogger("dpo_dist.merge")


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


def count_params_from_config(config) -> int:
    import torch  # deferred: see the module doc
    from transformers import AutoModelForCausalLM  # deferred: see the module doc

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(config)
    return count_params(m)


def load_causal_lm(src: str, what: str):
    import torch  # deferred: see the module doc
    from transformers import AutoModelForCausalLM  # deferred: see the module doc

    try:
        model = AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32, attn_implementation="eager")
    except Exception as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise MergeError(f"{what} {src}: cannot be loaded ({type(e).__name__}: {first}).") from e
    return model.eval()


def cast_params(model, dtype) -> None:
    """Cast parameters only: buffers that are not saved (rotary inv_freq, Gemma's embed_scale) stay as
    from_pretrained would build them, so the in-memory model computes what the reloaded folder will."""
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)


def is_tied(model) -> bool:
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    return out is not None and inp is not None and out.weight.data_ptr() == inp.weight.data_ptr()


def load_gathered_full(source: Source, sd: dict, base: str | None):
    """A causal LM built from the checkpoint's config and loaded with the gathered fp32 state dict."""
    import torch  # deferred: see the module doc
    from transformers import AutoConfig, AutoModelForCausalLM  # deferred: see the module doc

    candidates = [source.folder, source.zero_dir, source.zero_dir.parent if source.zero_dir else None]
    cfg_src = next((c for c in candidates if c is not None and (c / "config.json").exists()), None)
    if cfg_src is None and base is None:
        raise MergeArgumentError(f"{source.folder}: a ZeRO checkpoint without config.json; pass --base_model so the "
                                 "model's architecture is known.")
    config = AutoConfig.from_pretrained(str(cfg_src) if cfg_src else base)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    expected = set(model.state_dict().keys())
    tied = is_tied(model)
    if tied:  # Gemma 3: lm_head.weight and model.embed_tokens.weight are one parameter
        emb = model.get_input_embeddings().weight
        names = [n for n, p in model.named_parameters(remove_duplicate=False) if p is emb]
        present = [n for n in names if n in sd]
        if not present:
            raise MergeError(f"{source.zero_dir}: the gathered weights have none of {names}.")
        first = sd[present[0]]
        for n in present[1:]:
            if sd[n] is not first and not torch.equal(sd[n], first):
                raise MergeError(f"{source.zero_dir}: the config ties {n} to {present[0]}, but the gathered weights "
                                 "differ; a tied model cannot represent this checkpoint.")
        sd = dict(sd)
        for n in names:
            sd[n] = first
    missing = sorted(expected - set(sd))
    unexpected = sorted(set(sd) - expected)
    if missing or unexpected:
        raise MergeError(
            f"{source.zero_dir}: the gathered weights do not fit the model of {cfg_src or base}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}. Is this a LoRA checkpoint without adapter_config.json, "
            "or the wrong --base_model?"
        )
    model.load_state_dict(sd, strict=True)
    if tied and not is_tied(model):
        model.tie_weights()
    return model.eval()


def peft_from_gathered(source: Source, sd: dict, base_model):
    """Base + LoRA structure from adapter_config.json, loaded with the gathered PEFT-named state dict."""
    from peft import PeftConfig, get_peft_model  # deferred: see the module doc

    cfg_dir = source.folder if (source.folder / ADAPTER_CONFIG).exists() else source.zero_dir
    peft_config = PeftConfig.from_pretrained(str(cfg_dir))
    peft_config.inference_mode = True
    model = get_peft_model(base_model, peft_config)
    own = set(model.state_dict().keys())
    lora_keys = {k for k in own if "lora_" in k}
    unexpected = sorted(set(sd) - own)
    missing = sorted(lora_keys - set(sd))
    if unexpected or missing:
        raise MergeError(
            f"{source.zero_dir}: the gathered ZeRO weights do not match the adapter in {cfg_dir}/adapter_config.json: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}."
        )
    model.load_state_dict(sd, strict=False)
    return model.eval()


def load_adapter(source: Source, base_model, base: str):
    """PEFT's own loading of an adapter folder onto `base_model`, checked tensor by tensor."""
    from peft import PeftModel, get_peft_model_state_dict  # deferred: see the module doc

    try:
        model = PeftModel.from_pretrained(base_model, str(source.folder), is_trainable=False)
    except Exception as e:
        raise MergeError(f"{source.folder}: PEFT cannot load the adapter onto {base} ({type(e).__name__}: {e}).") from e
    adapter_file = adapter_weight_file(source.folder)
    want = set(tensor_shapes(adapter_file))
    have = set(get_peft_model_state_dict(model).keys())
    if want != have:
        raise MergeError(f"{adapter_file}: adapter tensors do not match the model: in the file only "
                         f"{sorted(want - have)[:5]}, in the model only {sorted(have - want)[:5]}.")
    return model


@dataclass
class Loaded:
    """The model to write (unmerged for an adapter), and what its verification expects."""

    model: Any
    reference: str  # what the written folder's logits are compared with
    expected_params: int
    expect_tied: bool


def load_for_merge(source: Source, sd: dict | None, base: str | None) -> Loaded:
    """The in-memory model of `source`: base + adapter (adapter enabled) for an adapter, else the full model
    (from the gathered ZeRO state dict `sd`, or the checkpoint folder)."""
    if source.is_adapter:
        base_lm = load_causal_lm(base, "base model")
        expected_params, expect_tied = count_params(base_lm), is_tied(base_lm)
        if source.kind == "adapter":
            model = load_adapter(source, base_lm, base)
        else:
            model = peft_from_gathered(source, sd, base_lm)
        # The PEFT model holds base_lm; merge_and_unload returns it merged (no second copy).
        return Loaded(model, "unmerged PEFT model (base + adapter, adapter enabled)", expected_params, expect_tied)
    if source.kind == "zero":
        model = load_gathered_full(source, sd, base)
        reference = "in-memory model gathered from the ZeRO checkpoint"
    else:
        model = load_causal_lm(str(source.folder), "--checkpoint")
        reference = "in-memory model loaded from the checkpoint"
    if base:
        from transformers import AutoConfig  # deferred: see the module doc

        expected_params = count_params_from_config(AutoConfig.from_pretrained(base))
    else:
        expected_params = count_params(model)
    return Loaded(model, reference, expected_params, is_tied(model))


def load_tokenizer(source: Source, base: str | None) -> tuple[Any, str | None]:
    """(tokenizer, where it came from): the checkpoint folder's, else the base model's; (None, None) when none."""
    candidates = [source.folder, source.zero_dir, source.folder.parent if source.zero_dir == source.folder else None,
                  Path(base) if base and os.path.isdir(base) else base]
    for cand in candidates:
        if cand is None:
            continue
        if isinstance(cand, Path) and not has_tokenizer(cand):
            continue
        from transformers import AutoTokenizer  # deferred: see the module doc

        try:
            return AutoTokenizer.from_pretrained(str(cand)), str(cand)
        except Exception as e:  # a hub id that is not reachable
            logger.warning("tokenizer from %s: %s", cand, e)
    logger.warning("no tokenizer found in the checkpoint or the base model; the output has none, and "
                   "verification uses fixed random token ids")
    return None, None
