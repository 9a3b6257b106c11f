"""Model architecture specs for the planner.

Hand-written on purpose: the planner must run without torch/transformers, so it cannot
instantiate a model (``accelerate.init_empty_weights`` would need torch) to count
parameters. The counts below are exact for the two supported decoder families and are
checked against the published parameter counts in tests/launch/plan/test_specs.py.

``load_spec(model)`` resolves, in order:
  1. a local folder with ``config.json`` (LlamaConfig, Gemma3TextConfig, or a multimodal
     Gemma3Config whose decoder sits under ``text_config``);
  2. the Hub's ``config.json`` via ``huggingface_hub`` (skipped when HF_HUB_OFFLINE or
     TRANSFORMERS_OFFLINE is set; every network/auth error falls through);
  3. the built-in table below (the published configs), so planning works offline.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from dpo_dist.model.loader import hub_offline

FAMILIES = ("llama", "gemma3")
GEMMA3_SIZES = ("270m", "1b", "4b", "12b", "27b")
LLAMA_SIZES = {"2": ("7b", "13b", "70b"), "3": ("8b", "70b"), "3.1": ("8b", "70b")}


class SpecError(ValueError):
    """A model name or config the planner cannot size; the message says how to fix it."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # "llama" | "gemma3"
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    # Parameters outside the text decoder that are loaded (and trained in a full
    # fine-tune): Gemma 3 4b/12b/27b load as Gemma3ForConditionalGeneration, with a
    # SigLIP vision tower and a projector. 0 for text-only models.
    extra_params: int = 0
    source: str = "builtin"  # "local" | "hub" | "builtin"

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise SpecError(f"unsupported family {self.family!r}; supported: {', '.join(FAMILIES)}")

    # -- parameter counts (all bias-free, as in the published Llama and Gemma 3 configs) --
    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        """One decoder layer: q/k/v/o, gate/up/down and its norms."""
        h = self.hidden_size
        attn = h * self.q_dim + 2 * h * self.kv_dim + self.q_dim * h
        mlp = 3 * h * self.intermediate_size
        if self.family == "gemma3":  # 4 RMSNorms per layer + q_norm and k_norm over head_dim
            norms = 4 * h + 2 * self.head_dim
        else:  # input_layernorm + post_attention_layernorm
            norms = 2 * h
        return attn + mlp + norms

    @property
    def text_params(self) -> int:
        embed = self.vocab_size * self.hidden_size
        lm_head = 0 if self.tie_word_embeddings else embed
        return embed + lm_head + self.num_hidden_layers * self.layer_params + self.hidden_size

    @property
    def num_params(self) -> int:
        """Every parameter the training process loads (text decoder + ``extra_params``)."""
        return self.text_params + self.extra_params

    @property
    def largest_layer_params(self) -> int:
        """Parameters of the largest single module, as DeepSpeed's ``model_to_params``
        counts them (``m.parameters(recurse=False)``): usually the embedding."""
        h = self.hidden_size
        return max(self.vocab_size * h, h * self.intermediate_size, h * self.q_dim)

    def lora_params(self, r: int, target_modules: Iterable[str]) -> int:
        """LoRA adapter parameters: r * (in + out) per targeted linear, per layer.
        (Targets are matched in the text decoder only; any of its seven projections can be one. What the ranks
        target by default is dpo_dist.model.lora's rule, which PlanOptions.lora_targets applies.)"""
        h, i = self.hidden_size, self.intermediate_size
        shapes = {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }
        total = 0
        for m in target_modules:
            if m not in shapes:
                raise SpecError(f"unknown LoRA target module {m!r}; known: {', '.join(shapes)}")
            fan_in, fan_out = shapes[m]
            total += r * (fan_in + fan_out)
        return total * self.num_hidden_layers


# --------------------------------------------------------------------------- #
# Built-in table: published config.json values.
# --------------------------------------------------------------------------- #

def _siglip_params(text_hidden: int, hidden: int = 1152, intermediate: int = 4304, layers: int = 27,
                   patch: int = 14, image: int = 896, channels: int = 3, use_head: bool = False) -> int:
    """Gemma 3's SigLIP vision tower (biased linears, LayerNorms) + multimodal projector.
    Defaults: the published Gemma 3 vision_config (which sets vision_use_head false)."""
    mlp = 2 * hidden * intermediate + intermediate + hidden
    patch_embed = channels * patch * patch * hidden + hidden
    pos_embed = (image // patch) ** 2 * hidden
    layer = 4 * (hidden * hidden + hidden) + 2 * 2 * hidden + mlp
    tower = patch_embed + pos_embed + layers * layer + 2 * hidden  # + post_layernorm
    if use_head:  # attention-pooling head: probe, nn.MultiheadAttention, LayerNorm, MLP
        tower += hidden + 4 * (hidden * hidden + hidden) + 2 * hidden + mlp
    projector = hidden * text_hidden + hidden  # mm_input_projection_weight + mm_soft_emb_norm
    return tower + projector


def _gemma3(size: str, h: int, i: int, layers: int, heads: int, kv: int, head_dim: int, vocab: int,
            max_pos: int, multimodal: bool) -> ModelSpec:
    return ModelSpec(
        name=f"google/gemma-3-{size}", family="gemma3", hidden_size=h, intermediate_size=i,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
        vocab_size=vocab, tie_word_embeddings=True, max_position_embeddings=max_pos,
        extra_params=_siglip_params(h) if multimodal else 0,
    )


def _llama(name: str, h: int, i: int, layers: int, heads: int, kv: int, vocab: int, max_pos: int) -> ModelSpec:
    return ModelSpec(
        name=name, family="llama", hidden_size=h, intermediate_size=i, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=h // heads, vocab_size=vocab,
        tie_word_embeddings=False, max_position_embeddings=max_pos,
    )


# google/gemma-3-*: 270m and 1b are text-only (vocab 262144); 4b/12b/27b are multimodal
# (text_config vocab 262208, SigLIP vision tower).
BUILTIN: dict[str, ModelSpec] = {
    "gemma3-270m": _gemma3("270m", 640, 2048, 18, 4, 1, 256, 262144, 32768, False),
    "gemma3-1b": _gemma3("1b", 1152, 6912, 26, 4, 1, 256, 262144, 32768, False),
    "gemma3-4b": _gemma3("4b", 2560, 10240, 34, 8, 4, 256, 262208, 131072, True),
    "gemma3-12b": _gemma3("12b", 3840, 15360, 48, 16, 8, 256, 262208, 131072, True),
    "gemma3-27b": _gemma3("27b", 5376, 21504, 62, 32, 16, 128, 262208, 131072, True),
    "llama2-7b": _llama("meta-llama/Llama-2-7b-hf", 4096, 11008, 32, 32, 32, 32000, 4096),
    "llama2-13b": _llama("meta-llama/Llama-2-13b-hf", 5120, 13824, 40, 40, 40, 32000, 4096),
    "llama2-70b": _llama("meta-llama/Llama-2-70b-hf", 8192, 28672, 80, 64, 8, 32000, 4096),
    "llama3-8b": _llama("meta-llama/Meta-Llama-3-8B", 4096, 14336, 32, 32, 8, 128256, 8192),
    "llama3-70b": _llama("meta-llama/Meta-Llama-3-70B", 8192, 28672, 80, 64, 8, 128256, 8192),
    "llama3.1-8b": _llama("meta-llama/Llama-3.1-8B", 4096, 14336, 32, 32, 8, 128256, 131072),
    "llama3.1-70b": _llama("meta-llama/Llama-3.1-70B", 8192, 28672, 80, 64, 8, 128256, 131072),
}

_HOW_TO_FIX = (
    "Pass a local folder that contains the model's config.json (--model /path/to/model), "
    "or one of the built-in names: google/gemma-3-{270m,1b,4b,12b,27b}[-it|-pt], "
    "meta-llama/Llama-2-{7b,13b,70b}[-hf|-chat-hf], meta-llama/Meta-Llama-3-{8B,70B}[-Instruct], "
    "meta-llama/Llama-3.1-{8B,70B}[-Instruct]."
)

_GEMMA_RE = re.compile(r"^gemma-?3-(\d+(?:\.\d+)?[mb])(?:-.*)?$")
_LLAMA_RE = re.compile(r"^(?:meta-)?llama-?(2|3(?:\.\d+)?)-(\d+(?:\.\d+)?b)(?:-.*)?$")


def _match(model: str) -> str | None:
    """Built-in table key for ``model``, None when it is not a name we know, or SpecError
    when it names a size of a supported family that does not exist (e.g. gemma-3-2b).

    Tolerates owners, case, ``_``/`` `` for ``-`` and suffixes (-it, -pt, -hf, -chat-hf,
    -Instruct, ...): the architecture is fixed by family and size."""
    base = model.strip().rstrip("/").split("/")[-1].lower().replace("_", "-").replace(" ", "-")
    m = _GEMMA_RE.match(base)
    if m:
        size = m.group(1)
        if size not in GEMMA3_SIZES:
            raise SpecError(
                f"{model!r}: a Gemma 3 {size} model does not exist; the real sizes are "
                f"{', '.join(GEMMA3_SIZES)} (e.g. google/gemma-3-1b-it or google/gemma-3-12b-it)."
            )
        return f"gemma3-{size}"
    m = _LLAMA_RE.match(base)
    if m:
        version, size = m.group(1), m.group(2)
        if version not in LLAMA_SIZES:
            return None  # e.g. Llama 3.2: a real model, just not built in
        if size not in LLAMA_SIZES[version]:
            raise SpecError(
                f"{model!r}: a Llama {version} {size} model does not exist; its sizes are "
                f"{', '.join(LLAMA_SIZES[version])}."
            )
        return f"llama{version}-{size}"
    return None


def builtin_key(model: str) -> str:
    """Key of ``model`` in BUILTIN; SpecError (with how to fix it) when there is none."""
    key = _match(model)
    if key is None:
        raise SpecError(f"unknown model {model!r}. {_HOW_TO_FIX}")
    return key


# --------------------------------------------------------------------------- #
# config.json parsing
# --------------------------------------------------------------------------- #

# Class defaults of transformers 4.55's LlamaConfig, Gemma3TextConfig and SiglipVisionConfig:
# save_pretrained writes only the keys that differ from them, so a missing key means these.
_LLAMA_DEFAULTS = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=2048)
_GEMMA3_TEXT_DEFAULTS = dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                             num_key_value_heads=4, head_dim=256, vocab_size=262208, tie_word_embeddings=True,
                             max_position_embeddings=131072)
_SIGLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, image_size=224, patch_size=16,
                        num_channels=3, vision_use_head=True)


def spec_from_config(config: Mapping, name: str, source: str = "local") -> ModelSpec:
    """Build a spec from a parsed config.json (Llama, Gemma3Text or multimodal Gemma3)."""
    model_type = config.get("model_type", "")
    extra = 0
    if model_type == "gemma3" or "text_config" in config:
        text_in = dict(config.get("text_config") or {})
        if model_type not in ("gemma3", "") or text_in.get("model_type", "gemma3_text") != "gemma3_text":
            raise SpecError(f"{name}: unsupported multimodal config (model_type {model_type!r}). {_HOW_TO_FIX}")
        family, text = "gemma3", {**_GEMMA3_TEXT_DEFAULTS, **text_in}
        v = {**_SIGLIP_DEFAULTS, **(config.get("vision_config") or {})}
        extra = _siglip_params(int(text["hidden_size"]), hidden=v["hidden_size"], intermediate=v["intermediate_size"],
                               layers=v["num_hidden_layers"], patch=v["patch_size"], image=v["image_size"],
                               channels=v["num_channels"], use_head=bool(v["vision_use_head"]))
    elif model_type == "gemma3_text":
        family, text = "gemma3", {**_GEMMA3_TEXT_DEFAULTS, **config}
    elif model_type == "llama":
        family, text = "llama", {**_LLAMA_DEFAULTS, **config}
    else:
        raise SpecError(
            f"{name}: model_type {model_type!r} is not supported (llama, gemma3, gemma3_text are). {_HOW_TO_FIX}"
        )
    if text.get("attention_bias") or text.get("mlp_bias"):
        raise SpecError(f"{name}: biased attention/MLP layers are not modelled (the supported models have none)")
    h, heads = int(text["hidden_size"]), int(text["num_attention_heads"])
    return ModelSpec(
        name=name,
        family=family,
        hidden_size=h,
        intermediate_size=int(text["intermediate_size"]),
        num_hidden_layers=int(text["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(text.get("num_key_value_heads") or heads),
        head_dim=int(text.get("head_dim") or h // heads),
        vocab_size=int(text["vocab_size"]),
        tie_word_embeddings=bool(text["tie_word_embeddings"]),
        max_position_embeddings=int(text["max_position_embeddings"]),
        extra_params=extra,
        source=source,
    )


def _hub_config(model: str, timeout_s: float = 5.0) -> dict | None:
    """config.json from the Hub, or None on any failure (offline, gated, 404, no network)."""
    if hub_offline() or "/" not in model:
        return None
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(repo_id=model, filename="config.json", etag_timeout=timeout_s)
        return json.loads(Path(path).read_text())
    except Exception:
        return None


def load_spec(model: str) -> ModelSpec:
    """Resolve ``model`` (local folder, Hub id, or built-in name) to a ModelSpec."""
    if not model or not model.strip():
        raise SpecError(f"no model given. {_HOW_TO_FIX}")
    path = Path(model).expanduser()
    if path.is_dir():
        cfg = path / "config.json"
        if not cfg.is_file():
            raise SpecError(f"{model}: folder has no config.json. {_HOW_TO_FIX}")
        try:
            config = json.loads(cfg.read_text())
        except json.JSONDecodeError as e:
            raise SpecError(f"{cfg}: not valid JSON ({e})") from None
        return spec_from_config(config, name=model, source="local")

    key = _match(model)  # names that cannot exist are refused before any network access
    config = _hub_config(model)
    if config is not None:
        return spec_from_config(config, name=model, source="hub")
    if key is None:
        raise SpecError(f"unknown model {model!r} (not a local folder, not reachable on the Hub). {_HOW_TO_FIX}")
    return replace(BUILTIN[key], name=model, source="builtin")
