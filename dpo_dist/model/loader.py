"""Load the tokenizer, the policy and (when needed) a separate reference model.

`from_pretrained` does the loading, on a hub id or a local folder; this module picks the
per-family defaults (attention implementation, LoRA targets) and turns load failures into
errors that say what to fix.
"""

from __future__ import annotations

import os
from pathlib import Path

from dpo_dist.data.chat_templates import apply_chat_template_arg
from dpo_dist.model.lora import default_lora_targets
from dpo_dist.util.errors import UserError


class ModelLoadError(UserError):
    """A model or tokenizer that cannot be loaded: names the argument and the fix."""


def family_of(model_type: str) -> str:
    if model_type.startswith("gemma3"):
        return "gemma3"
    if model_type == "llama":
        return "llama"
    return model_type


def looks_like_path(name: str) -> bool:
    """A model name that means a local path rather than a hub id (`org/name`): it starts with /, ./, ../, ~ or .,
    names something that exists, has more than one slash, or uses Windows separators."""
    return (name.startswith(("/", "./", "../", "~", ".")) or os.path.exists(os.path.expanduser(name))
            or name.count("/") > 1 or (os.sep == "\\" and "\\" in name))


def check_source(name: str, flag: str, *, model: bool = True, error: type[Exception] = ModelLoadError,
                 fix: str = "Check the path (it must be a folder with config.json).") -> str:
    """The local folder `name` names (`~` expanded), or `name` itself as a hub id. A folder that does not exist,
    or (for a model) has no config.json, raises `error` naming `flag` and the fix. Only stat calls."""
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        if model and not (Path(expanded) / "config.json").exists():
            raise error(f"{flag} {name}: the folder has no config.json, so it is not a Hugging Face model folder.")
        return expanded
    if looks_like_path(name):
        raise error(f"{flag} {name}: no such model folder. {fix}")
    return name


def hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is on: the hub is never asked."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "on", "yes", "true")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_error(e: Exception, name: str, flag: str) -> ModelLoadError:
    """A failed `from_pretrained` as an error that says what to do (download elsewhere, log in for gated models)."""
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    if hub_offline():
        cache = ("HF_HUB_OFFLINE=1 is set and it is not in the local Hugging Face cache, so the hub was not asked; "
                 "unset HF_HUB_OFFLINE where there is network, or")
    else:
        cache = "the hub may be unreachable from here (or the id is wrong):"
    return ModelLoadError(
        f"{flag} {name}: could not load it ({type(e).__name__}: {first}). If it is a hub id, {cache} download it "
        "where there is network (`huggingface-cli download ID --local-dir DIR`) and pass the local folder instead. "
        "Gated models also need a token (`huggingface-cli login` on every node)."
    )


def load_config(name: str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    src = check_source(name, "--model_name_or_path")
    try:
        return AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise hub_error(e, name, "--model_name_or_path") from e


def load_tokenizer_from(name: str, flag: str, trust_remote_code: bool = False, *, need_eos: bool = False):
    """AutoTokenizer with a pad token (EOS when it has none: Llama tokenizers ship without one, and DPO pads
    chosen/rejected pairs). `need_eos`: a tokenizer without EOS is an error (generation could not stop)."""
    from transformers import AutoTokenizer  # deferred: transformers loads torch

    src = check_source(name, flag, model=False)
    try:
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise hub_error(e, name, flag) from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if need_eos and tok.eos_token_id is None:
        raise UserError(f"{flag} {name}: the tokenizer has no EOS token, so a response cannot end; use the model's tokenizer.")
    return tok


def load_tokenizer(model_args):
    """The ranks' tokenizer: --tokenizer_name_or_path, else the model's; with --chat_template's template when it is
    given (the trained model's saved tokenizer then carries it too)."""
    name = model_args.tokenizer_name_or_path or model_args.model_name_or_path
    flag = "--tokenizer_name_or_path" if model_args.tokenizer_name_or_path else "--model_name_or_path"
    tok = load_tokenizer_from(name, flag, model_args.trust_remote_code)
    return apply_chat_template_arg(tok, model_args.chat_template)


def default_attn_implementation(family: str, device: str) -> str:
    # Gemma 3's docs advise eager attention for training (soft-capping / sliding window).
    if family == "gemma3":
        return "eager"
    return "sdpa"


def load_model(model_args, *, device: str, bf16: bool, extra_kwargs: dict | None = None, packing: bool = False):
    """The causal LM at model_args.model_name_or_path. Under ZeRO-3 the caller has already built the
    training arguments, so `from_pretrained` partitions the weights as they load. ``packing``: the
    attention is dpo-dist's varlen wrapper around it (dpo_dist/model/packing.py), the same for unpacked calls."""
    import torch
    from transformers import AutoModelForCausalLM

    config = load_config(model_args.model_name_or_path, model_args.trust_remote_code)
    family = family_of(config.model_type)
    attn = model_args.attn_implementation or default_attn_implementation(family, device)
    if packing:
        from dpo_dist.model.packing import register_varlen_attention, varlen_name  # deferred: torch

        register_varlen_attention()
        attn = varlen_name(attn)
    kwargs = {
        "torch_dtype": torch.bfloat16 if bf16 else torch.float32,
        "attn_implementation": attn,
        "trust_remote_code": model_args.trust_remote_code,
    }
    kwargs.update(extra_kwargs or {})
    src = check_source(model_args.model_name_or_path, "--model_name_or_path")
    try:
        model = AutoModelForCausalLM.from_pretrained(src, **kwargs)
    except Exception as e:
        raise hub_error(e, model_args.model_name_or_path, "--model_name_or_path") from e
    return model, family


def load_eval_model(name: str, flag: str, *, device, trust_remote_code: bool = False,
                    attn_implementation: str | None = None):
    """A model to score or generate with (compare, generate): fp32, eval mode, on `device`, the family's attention.
    Size-0 weights (a ZeRO-3 save without the 16-bit gather) are an error that names the merge step."""
    import torch  # deferred: torch
    from transformers import AutoConfig, AutoModelForCausalLM  # deferred: transformers loads torch

    src = check_source(name, flag)
    try:
        config = AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
        family = family_of(config.model_type)
        model = AutoModelForCausalLM.from_pretrained(
            src, torch_dtype=torch.float32, trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation or default_attn_implementation(family, device.type),
        )
    except Exception as e:
        raise hub_error(e, name, flag) from e
    if any(p.numel() == 0 for p in model.parameters()):
        raise UserError(
            f"{flag} {name}: some weights have size 0 (a ZeRO-3 save without the 16-bit gather); "
            "merge the checkpoint with `python -m dpo_dist.merge` and pass the merged folder."
        )
    model.to(device).eval()
    return model


def lora_config(model_args, family: str):
    from peft import LoraConfig

    if model_args.lora_target_modules:
        targets = [t.strip() for t in model_args.lora_target_modules.split(",") if t.strip()]
    else:
        targets = default_lora_targets(family)
    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
