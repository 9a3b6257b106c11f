"""The seed's generation test, and the one generation helper that `compare_base_vs_dpo` shares.

    python -m dpo_dist.generate --model_name_or_path runs/demo/dpo_sanity_merged \
        --prompt "How do I make pancakes?" --hh_format --max_new_tokens 64 --num_return_sequences 2

It loads the model with `from_pretrained` (hub id or local folder), generates, prints every
sequence, and exits:

* 0 when at least one sequence has new tokens;
* 1 when the model cannot be loaded or produces no new token at all (every sequence ends at
  once with EOS): the check is deliberately simple; it does not judge the text's quality;
* 2 for bad arguments (the message names the argument and the fix).

`--prompt` is a user turn: it goes through the tokenizer's chat template (with its generation prompt) when the
tokenizer has one (or `--chat_template` names one), as conversational training data does; `--hh_format` wraps it
in the hh-rlhf turn format instead, and `--raw_prompt` passes the text as it is (text already formatted).
Prompts get the tokenizer's BOS text in front (as `dpo_dist.data.preference.with_bos` does for training)
and are tokenised without special tokens, so the model sees exactly what TRL trained it on.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from dpo_dist.backend import detect_device
from dpo_dist.data.chat_templates import apply_chat_template_arg
from dpo_dist.data.conversation import prompt_text
from dpo_dist.model.loader import check_source, load_eval_model, load_tokenizer_from
from dpo_dist.util.errors import ArgumentError, UserError
from dpo_dist.util.hfargs import parse_dataclasses
from dpo_dist.util.logs import setup_logging

logger = logging.getLogger("dpo_dist.generate")

HH_HUMAN, HH_ASSISTANT = "\n\nHuman: ", "\n\nAssistant:"


# --------------------------------------------------------------------------------------
# Loading (shared with compare_base_vs_dpo)
# --------------------------------------------------------------------------------------

def check_model_source(name: str | None, flag: str) -> str:
    """A local model folder must exist and hold config.json; anything else is taken as a hub id. An ArgumentError
    naming `flag` (exit 2). Only stat calls."""
    if not name:
        raise ArgumentError(f"{flag} is required: pass a hub id or a local model folder.")
    return check_source(name, flag, error=ArgumentError)


def check_tokenizer_source(name: str, flag: str) -> str:
    """Like check_model_source, but a tokenizer folder need not hold config.json."""
    return check_source(name, flag, model=False, error=ArgumentError)


def resolve_device(requested: str = "auto"):
    """torch.device for evaluation/generation; the backend module decides which accelerator exists."""
    import torch  # deferred: torch

    device = detect_device(requested)
    if device == "hpu":
        import habana_frameworks.torch.core  # noqa: F401 (deferred, HPU only: registers the hpu device)
    return torch.device(device)


def check_tokenizer_fits(tokenizer, model, flag: str, name: str) -> None:
    n_embed = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > n_embed:
        raise UserError(
            f"{flag} {name}: the tokenizer has {len(tokenizer)} tokens but the model only {n_embed} "
            "embeddings; pass the model's own tokenizer with --tokenizer_name_or_path."
        )


# --------------------------------------------------------------------------------------
# Generation (one function, used by the CLI below and by compare_base_vs_dpo)
# --------------------------------------------------------------------------------------

def hh_prompt(text: str) -> str:
    """Wrap a bare question in the hh-rlhf turn format the DPO data uses."""
    return f"{HH_HUMAN}{text.strip()}{HH_ASSISTANT}"


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Prompt ids as the trainer sees them: BOS text in front (when the tokenizer has one), no other specials."""
    bos = getattr(tokenizer, "bos_token", None)
    if bos and not prompt.startswith(bos):
        prompt = bos + prompt
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def _eos_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(gen_eos)
    return {i for i in ids if i is not None}


def generate_responses(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.7,
    top_p: float = 0.9,
    greedy: bool = False,
    seed: int = 42,
    num_return_sequences: int = 1,
    batch_size: int = 8,
    max_prompt_length: int | None = None,
) -> list[list[dict]]:
    """Generate for each prompt; returns, per prompt, `num_return_sequences` dicts:
    `{"response": text, "num_tokens": n, "token_ids": [...], "prompt_ids": [...], "ended_with_eos": bool}`.

    `num_tokens` counts the new tokens before EOS (EOS itself and padding excluded). `token_ids` are
    the new tokens including the EOS when one was generated (what the model's probability covers).
    Batches are left-padded. The torch RNG is seeded once with `seed` before the first batch, so a
    call is reproducible on the same machine; `greedy` ignores temperature/top_p and the seed.
    Prompts are left-truncated to `max_prompt_length` tokens when it is given. Only the decoding settings
    named here apply: sampling is plain temperature + top-p (top-k off), and nothing is inherited from the
    model's generation_config.json (such as a repetition penalty).
    """
    import torch
    from transformers import GenerationConfig

    if greedy and num_return_sequences != 1:
        raise ArgumentError("--greedy gives one sequence per prompt; drop --greedy or --num_return_sequences.")
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = _eos_ids(model, tokenizer)
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    if max_prompt_length:
        encoded = [ids[-max_prompt_length:] for ids in encoded]
    if any(len(ids) == 0 for ids in encoded):
        raise UserError("an empty prompt cannot be continued (it has no tokens and the tokenizer adds no BOS).")
    # A fresh GenerationConfig: only the settings named here apply (no repetition penalty or top-k inherited
    # from the model's generation_config.json), so samples come from the distribution the arguments describe.
    settings = dict(max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=sorted(eos),
                    bos_token_id=tokenizer.bos_token_id)
    if greedy:
        settings.update(do_sample=False, num_beams=1)
    else:
        settings.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                        num_return_sequences=num_return_sequences)
    gen_config = GenerationConfig(**settings)
    torch.manual_seed(seed)
    results: list[list[dict]] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        width = max(len(ids) for ids in chunk)
        input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in chunk], device=device)
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in chunk], device=device)
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=attention, generation_config=gen_config)
        new = out[:, width:].tolist()
        n_ret = 1 if greedy else num_return_sequences
        for i, ids in enumerate(chunk):
            seqs = []
            for row in new[i * n_ret:(i + 1) * n_ret]:
                cut = next((j for j, t in enumerate(row) if t in eos), None)
                body = row if cut is None else row[:cut]
                seqs.append({
                    "response": tokenizer.decode(body, skip_special_tokens=True),
                    "num_tokens": len(body),
                    "token_ids": row if cut is None else row[:cut + 1],
                    "prompt_ids": ids,
                    "ended_with_eos": cut is not None,
                })
            results.append(seqs)
    return results


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------

@dataclass
class GenerateArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "Hub id or local model folder (required)."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Tokenizer; defaults to the model's."})
    prompt: str | None = field(default=None, metadata={"help": "Text to continue (required)."})
    hh_format: bool = field(
        default=False, metadata={"help": "Wrap the prompt as '\\n\\nHuman: P\\n\\nAssistant:' (the hh-rlhf format DPO trained on)."}
    )
    raw_prompt: bool = field(
        default=False, metadata={"help": "Pass --prompt as it is: no chat template, no hh-rlhf wrapping (text already formatted)."}
    )
    chat_template: str | None = field(
        default=None, metadata={"help": "Chat template for --prompt: a .jinja file, a tokenizer folder or a name (llama3, gemma3, "
                                "hh); default: the tokenizer's own."}
    )
    max_new_tokens: int = field(default=64, metadata={"help": "New tokens per sequence at most."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=0.9, metadata={"help": "Nucleus sampling mass."})
    num_return_sequences: int = field(default=1, metadata={"help": "Sequences to sample."})
    seed: int = field(default=42, metadata={"help": "Sampling seed."})
    greedy: bool = field(default=False, metadata={"help": "Deterministic greedy decoding (one sequence)."})
    device: str = field(default="auto", metadata={"help": "auto, hpu, cuda or cpu.", "choices": ["auto", "hpu", "cuda", "cpu"]})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom modeling code from the hub."})


def validate_sampling(max_new_tokens: int, temperature: float, top_p: float, greedy: bool) -> None:
    if max_new_tokens < 1:
        raise ArgumentError(f"--max_new_tokens must be a positive integer (got {max_new_tokens}).")
    if not greedy and not temperature > 0:
        raise ArgumentError(f"--temperature must be > 0 (got {temperature}); use --greedy for deterministic decoding.")
    if not 0 < top_p <= 1:
        raise ArgumentError(f"--top_p must be in (0, 1] (got {top_p}).")


def validate(a: GenerateArguments) -> None:
    check_model_source(a.model_name_or_path, "--model_name_or_path")
    if a.tokenizer_name_or_path:
        check_tokenizer_source(a.tokenizer_name_or_path, "--tokenizer_name_or_path")
    if a.prompt is None or not a.prompt.strip():
        raise ArgumentError("--prompt is required and must not be empty.")
    validate_sampling(a.max_new_tokens, a.temperature, a.top_p, a.greedy)
    if a.num_return_sequences < 1:
        raise ArgumentError(f"--num_return_sequences must be a positive integer (got {a.num_return_sequences}).")
    if a.greedy and a.num_return_sequences != 1:
        raise ArgumentError("--greedy gives one sequence; drop --greedy or --num_return_sequences.")
    if a.raw_prompt and (a.hh_format or a.chat_template):
        raise ArgumentError("--raw_prompt passes the text as it is; drop --hh_format / --chat_template, or --raw_prompt.")
    if a.hh_format and a.chat_template:
        raise ArgumentError("--hh_format and --chat_template both format the prompt; give one of them.")


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    prog = "python -m dpo_dist.generate"
    try:
        (a,) = parse_dataclasses(GenerateArguments, argv, prog=prog)
        validate(a)
    except ArgumentError as e:
        print(f"dpo_dist.generate: error: {e}", file=sys.stderr)
        return 2
    try:
        device = resolve_device(a.device)
        tok_name = a.tokenizer_name_or_path or a.model_name_or_path
        tok_flag = "--tokenizer_name_or_path" if a.tokenizer_name_or_path else "--model_name_or_path"
        tokenizer = apply_chat_template_arg(load_tokenizer_from(tok_name, tok_flag, a.trust_remote_code, need_eos=True),
                                            a.chat_template)
        if a.hh_format:
            prompt = hh_prompt(a.prompt)
        else:
            prompt = a.prompt if a.raw_prompt else prompt_text(a.prompt, tokenizer)
        model = load_eval_model(a.model_name_or_path, "--model_name_or_path", device=device, trust_remote_code=a.trust_remote_code)
        check_tokenizer_fits(tokenizer, model, "--model_name_or_path", a.model_name_or_path)
        (seqs,) = generate_responses(
            model, tokenizer, [prompt], max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
            greedy=a.greedy, seed=a.seed, num_return_sequences=a.num_return_sequences,
        )
    except ArgumentError as e:
        print(f"dpo_dist.generate: error: {e}", file=sys.stderr)
        return 2
    except UserError as e:
        print(f"dpo_dist.generate: error: {e}", file=sys.stderr)
        return 1
    print(f"prompt: {prompt!r}")
    for i, s in enumerate(seqs):
        end = "EOS" if s["ended_with_eos"] else "max_new_tokens"
        print(f"--- sequence {i + 1}/{len(seqs)} ({s['num_tokens']} new tokens, stopped at {end}) ---")
        print(s["response"])
    empty = sum(1 for s in seqs if s["num_tokens"] == 0)
    if empty == len(seqs):
        print(f"dpo_dist.generate: error: the model produced no new tokens in any of the {len(seqs)} sequence(s) "
              "(EOS at once); the generation test failed.", file=sys.stderr)
        return 1
    if empty:
        print(f"warning: {empty} of {len(seqs)} sequences are empty (EOS at once).", file=sys.stderr)
    print(f"generation test passed: {len(seqs) - empty}/{len(seqs)} sequence(s) with new tokens.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
