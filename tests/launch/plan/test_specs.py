"""Model specs: exact parameter counts, name resolution, config.json parsing, hub fallback."""

import json
import sys
import types

import pytest

from launch.plan.specs import BUILTIN, GEMMA3_SIZES, ModelSpec, SpecError, load_spec, spec_from_config


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# Published parameter counts (safetensors totals on the model cards).
PUBLISHED = {
    "meta-llama/Llama-2-7b-hf": 6_738_415_616,
    "meta-llama/Llama-2-13b-hf": 13_015_864_320,
    "meta-llama/Llama-2-70b-hf": 68_976_648_192,
    "meta-llama/Meta-Llama-3-8B": 8_030_261_248,
    "meta-llama/Meta-Llama-3-70B": 70_553_706_496,
    "google/gemma-3-270m": 268_098_176,
    "google/gemma-3-1b-it": 999_885_952,
    "google/gemma-3-4b-it": 4_300_079_472,
    "google/gemma-3-12b-it": 12_187_325_040,
    "google/gemma-3-27b-it": 27_432_406_640,
    "mistralai/Mistral-7B-v0.1": 7_241_732_096,
    "mistralai/Mistral-7B-Instruct-v0.2": 7_241_732_096,
    "mistralai/Mistral-7B-v0.3": 7_248_023_552,
    "mistralai/Mixtral-8x7B-v0.1": 46_702_792_704,
    "Qwen/Qwen2.5-0.5B": 494_032_768,
    "Qwen/Qwen2.5-1.5B": 1_543_714_304,
    "Qwen/Qwen2.5-3B": 3_085_938_688,
    "Qwen/Qwen2.5-7B": 7_615_616_512,
    "Qwen/Qwen2.5-14B": 14_770_033_664,
    "Qwen/Qwen2.5-32B": 32_763_876_352,
    "Qwen/Qwen2.5-72B": 72_706_203_648,
    "Qwen/Qwen3-8B": 8_190_735_360,
    "Qwen/Qwen3-32B": 32_762_123_264,
    "Qwen/Qwen3-30B-A3B": 30_532_122_624,
    "microsoft/Phi-3-mini-4k-instruct": 3_821_079_552,
    "microsoft/Phi-3-mini-128k-instruct": 3_821_079_552,
}
# Parameters a token goes through (the published "active" figures): 12.9B of Mixtral-8x7B, 3.3B of Qwen3-30B-A3B.
PUBLISHED_ACTIVE = {"mistralai/Mixtral-8x7B-v0.1": 12.9e9, "Qwen/Qwen3-30B-A3B": 3.3e9}


@pytest.mark.parametrize("model,count", PUBLISHED.items())
def test_builtin_param_counts_match_published(model, count):
    assert load_spec(model).num_params == count


@pytest.mark.parametrize("model,active", PUBLISHED_ACTIVE.items())
def test_moe_active_params_match_published(model, active):
    s = load_spec(model)
    assert s.is_moe and s.active_text_params == pytest.approx(active, rel=0.02)
    assert s.num_params > 3 * s.active_text_params  # memory holds every expert


def test_sanity_figures_from_the_brief():
    assert load_spec("meta-llama/Llama-3-8B").num_params == pytest.approx(8.03e9, rel=0.002)
    assert load_spec("meta-llama/Llama-3-70B").num_params == pytest.approx(70.6e9, rel=0.002)
    assert load_spec("google/gemma-3-270m").text_params == pytest.approx(268e6, rel=0.002)
    g27 = load_spec("google/gemma-3-27b-it")
    assert g27.text_params == pytest.approx(27.0e9, rel=0.002)
    assert g27.extra_params == pytest.approx(0.42e9, rel=0.02)  # SigLIP tower + projector


def test_published_architecture_numbers():
    l70 = load_spec("meta-llama/Llama-3-70B")
    assert (l70.hidden_size, l70.num_hidden_layers, l70.num_attention_heads, l70.num_key_value_heads,
            l70.intermediate_size, l70.vocab_size) == (8192, 80, 64, 8, 28672, 128256)
    assert load_spec("meta-llama/Llama-2-7b-hf").vocab_size == 32000
    assert load_spec("google/gemma-3-1b-it").vocab_size == 262144  # text-only checkpoints
    assert load_spec("google/gemma-3-12b-it").vocab_size == 262208  # multimodal text_config
    assert load_spec("google/gemma-3-27b-it").head_dim == 128
    assert all(BUILTIN[f"gemma3-{s}"].tie_word_embeddings for s in GEMMA3_SIZES)
    assert load_spec("meta-llama/Llama-3.1-8B").max_position_embeddings == 131072


@pytest.mark.parametrize("name,key", [
    ("google/gemma-3-27b-it", "gemma3-27b"), ("google/gemma-3-27b-pt", "gemma3-27b"), ("GEMMA-3-27B", "gemma3-27b"),
    ("gemma3-270m", "gemma3-270m"), ("unsloth/gemma-3-1b-it", "gemma3-1b"),
    ("meta-llama/Llama-2-7b-chat-hf", "llama2-7b"), ("llama2_13b", "llama2-13b"), ("Llama-2-70b", "llama2-70b"),
    ("meta-llama/Meta-Llama-3-8B-Instruct", "llama3-8b"), ("meta-llama/Llama-3-70B", "llama3-70b"),
    ("meta-llama/Llama-3.1-8B-Instruct", "llama3.1-8b"), ("Meta-Llama-3.1-70B", "llama3.1-70b"),
    ("mistralai/Mistral-7B-Instruct-v0.3", "mistral-7b-v0.3"), ("Mistral-7B-v0.1", "mistral-7b-v0.1"),
    ("mistralai/Mixtral-8x7B-Instruct-v0.1", "mixtral-8x7b"), ("mixtral-8x7b", "mixtral-8x7b"),
    ("Qwen/Qwen2.5-72B-Instruct", "qwen2.5-72b"), ("Qwen/Qwen2.5-0.5B-Instruct", "qwen2.5-0.5b"),
    ("qwen2.5_7b", "qwen2.5-7b"), ("Qwen/Qwen3-8B-Base", "qwen3-8b"), ("Qwen/Qwen3-32B", "qwen3-32b"),
    ("Qwen/Qwen3-30B-A3B-Instruct-2507", "qwen3-30b-a3b"), ("microsoft/Phi-3-mini-4k-instruct", "phi3-mini-4k"),
    ("Phi-3-mini-128k-instruct", "phi3-mini-128k"),
])
def test_name_variants_resolve(name, key):
    spec = load_spec(name)
    assert spec.num_params == BUILTIN[key].num_params
    assert spec.name == name and spec.source == "builtin"


@pytest.mark.parametrize("name", ["google/gemma-3-2b", "google/gemma-3-9b-it", "gemma-3-7b"])
def test_nonexistent_gemma_sizes_name_the_real_ones(name):
    with pytest.raises(SpecError) as e:
        load_spec(name)
    msg = str(e.value)
    assert "does not exist" in msg and name.split("/")[-1].split("-")[2] in msg
    for size in GEMMA3_SIZES:
        assert size in msg


@pytest.mark.parametrize("name,sizes", [("Qwen/Qwen2.5-9B-Instruct", "0.5b, 1.5b, 3b, 7b, 14b, 32b, 72b"),
                                        ("Qwen/Qwen3-7B", "0.6b, 1.7b, 4b, 8b, 14b, 32b, 30b-a3b, 235b-a22b")])
def test_nonexistent_qwen_sizes_name_the_real_ones(name, sizes):
    with pytest.raises(SpecError, match=f"the real sizes are {sizes}"):
        load_spec(name)


@pytest.mark.parametrize("name", ["Qwen/Qwen3-14B", "meta-llama/Llama-3.2-3B", "mistralai/Mistral-7B-Instruct"])
def test_real_models_not_built_in_ask_for_their_folder(name):
    with pytest.raises(SpecError, match="unknown model .* local folder that holds the model's config.json"):
        load_spec(name)


def test_unknown_model_says_how_to_fix():
    with pytest.raises(SpecError, match="config.json") as e:
        load_spec("acme/unknown-model-7b")
    assert isinstance(e.value, ValueError)
    with pytest.raises(SpecError, match="sizes are 7b, 13b, 70b"):
        load_spec("meta-llama/Llama-2-34b")
    with pytest.raises(SpecError):
        load_spec("")


def test_lora_params():
    s = load_spec("meta-llama/Llama-2-7b-hf")
    # q_proj and v_proj, r=8: 32 layers x 2 x 8 x (4096 + 4096), PEFT's default for Llama
    assert s.lora_params(8, ["q_proj", "v_proj"]) == 32 * 2 * 8 * 8192
    l3 = load_spec("meta-llama/Meta-Llama-3-8B")  # GQA: k/v project to 8 x 128
    assert l3.lora_params(16, ["k_proj"]) == 32 * 16 * (4096 + 1024)
    with pytest.raises(SpecError, match="unknown LoRA target"):
        s.lora_params(8, ["qkv"])


def test_largest_layer_is_the_embedding_for_these_models():
    s = load_spec("meta-llama/Meta-Llama-3-70B")
    assert s.largest_layer_params == 128256 * 8192
    assert ModelSpec("t", "llama", 8, 1000, 1, 1, 1, 8, 10, False, 16).largest_layer_params == 8 * 1000


# --- config.json parsing ---------------------------------------------------------------

GEMMA3_4B_CONFIG = {  # published google/gemma-3-4b-it config.json (abridged to what matters)
    "architectures": ["Gemma3ForConditionalGeneration"],
    "model_type": "gemma3",
    "text_config": {
        "head_dim": 256, "hidden_size": 2560, "intermediate_size": 10240, "max_position_embeddings": 131072,
        "model_type": "gemma3_text", "num_attention_heads": 8, "num_hidden_layers": 34,
        "num_key_value_heads": 4, "vocab_size": 262208,
    },
    "vision_config": {
        "hidden_size": 1152, "image_size": 896, "intermediate_size": 4304, "model_type": "siglip_vision_model",
        "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False,
    },
}


def _folder(tmp_path, config):
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


def test_local_multimodal_gemma3_folder(tmp_path):
    spec = load_spec(_folder(tmp_path, GEMMA3_4B_CONFIG))
    assert spec.source == "local" and spec.family == "gemma3"
    assert spec.num_params == PUBLISHED["google/gemma-3-4b-it"]


def test_local_llama_and_gemma3_text_folders(tmp_path):
    llama = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
             "max_position_embeddings": 8192, "tie_word_embeddings": False}
    assert load_spec(_folder(tmp_path, llama)).num_params == PUBLISHED["meta-llama/Meta-Llama-3-8B"]
    gemma = {"model_type": "gemma3_text", "hidden_size": 1152, "intermediate_size": 6912, "num_hidden_layers": 26,
             "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 262144,
             "max_position_embeddings": 32768}
    (tmp_path / "config.json").write_text(json.dumps(gemma))
    assert load_spec(str(tmp_path)).num_params == PUBLISHED["google/gemma-3-1b-it"]


def test_local_folder_errors(tmp_path):
    """Each error says what is wrong with the folder, and none asks for a config.json the folder already has."""
    with pytest.raises(SpecError, match="--model .*: the folder has no config.json"):
        load_spec(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(SpecError, match="config.json is not valid JSON") as e:
        load_spec(str(tmp_path))
    assert "holds the model's config.json" not in str(e.value)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(SpecError, match="holds a JSON list, not a config object"):
        load_spec(str(tmp_path))
    (tmp_path / "config.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(str(tmp_path))
    with pytest.raises(SpecError, match="has no model_type") as e:
        load_spec(_folder(tmp_path, {"hidden_size": 8}))
    assert "holds the model's config.json" not in str(e.value)


@pytest.mark.parametrize("model_type,why", [
    ("deepseek_v3", "multi-head latent attention"), ("gpt_oss", "fused 3-D parameters"), ("mamba", "state-space"),
    ("t5", "encoder-decoder"), ("qwen2_vl", "vision tower"),
])
def test_families_the_planner_cannot_size_are_refused_by_name(tmp_path, model_type, why):
    with pytest.raises(SpecError, match=f"model_type '{model_type}' cannot be planned: .*{why}") as e:
        load_spec(_folder(tmp_path, {"model_type": model_type, "text_config": {"model_type": "qwen2"}}
                          if model_type == "qwen2_vl" else {"model_type": model_type}))
    assert "holds the model's config.json" not in str(e.value) and "mistral, qwen2" in str(e.value)


def test_unknown_family_names_the_ones_it_sizes(tmp_path):
    with pytest.raises(SpecError, match="model_type 'acme' is not a family the planner sizes .*mixtral, qwen2_moe"):
        load_spec(_folder(tmp_path, {"model_type": "acme"}))


@pytest.mark.parametrize("config,window", [
    ({"model_type": "mistral"}, 4096), ({"model_type": "mistral", "sliding_window": None}, None),
    ({"model_type": "qwen2", "sliding_window": 4096}, None),  # use_sliding_window is off
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 4096}, 4096),
    ({"model_type": "llama", "sliding_window": 4096}, None),  # Llama has no sliding window
])
def test_sliding_windows_are_read_as_each_family_declares_them(config, window):
    assert spec_from_config(config, "m").sliding_window == window


def test_counts_match_transformers_models_on_meta_device():
    """The hand-written counts equal what transformers instantiates (2-layer shapes of the
    real models; counts are linear in layers), including a SigLIP tower with its head."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfgs = [
        transformers.LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=2,
                                 num_attention_heads=64, num_key_value_heads=8, vocab_size=128256),
        transformers.Gemma3TextConfig(hidden_size=640, intermediate_size=2048, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=1, vocab_size=262144),
        transformers.Gemma3Config(
            text_config=dict(hidden_size=5376, intermediate_size=21504, num_hidden_layers=2, num_attention_heads=32,
                             num_key_value_heads=16, head_dim=128, vocab_size=262208),
            vision_config=dict(num_hidden_layers=1)),  # SigLIP defaults, with the pooling head
    ]
    classes = [transformers.LlamaForCausalLM, transformers.Gemma3ForCausalLM,
               transformers.Gemma3ForConditionalGeneration]
    for cfg, cls in zip(cfgs, classes):
        with torch.device("meta"):
            model = cls(cfg)
        spec = spec_from_config(json.loads(cfg.to_json_string()), name="m")  # diff-only json, as saved
        assert spec.num_params == sum(p.numel() for p in model.parameters()), cls.__name__
        largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
        assert spec.largest_layer_params == largest, cls.__name__


def test_lora_count_matches_peft():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=2, vocab_size=1000)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    with torch.device("meta"):
        model = peft.get_peft_model(transformers.LlamaForCausalLM(cfg), peft.LoraConfig(r=4, target_modules=targets))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert spec_from_config(json.loads(cfg.to_json_string()), "m").lora_params(4, targets) == trainable


# --- hub fallback ----------------------------------------------------------------------

def _fake_hub(monkeypatch, download):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=download))


def test_hub_config_used_when_reachable(monkeypatch, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(GEMMA3_4B_CONFIG))
    calls = []

    def download(repo_id, filename, **kw):
        calls.append((repo_id, filename, kw))
        return str(path)

    _fake_hub(monkeypatch, download)
    spec = load_spec("someone/gemma-3-4b-finetune")
    assert spec.source == "hub" and spec.num_params == PUBLISHED["google/gemma-3-4b-it"]
    assert calls and calls[0][:2] == ("someone/gemma-3-4b-finetune", "config.json")
    assert calls[0][2].get("etag_timeout", 99) <= 10  # short timeout


def test_hub_errors_fall_back_to_builtin(monkeypatch):
    def download(*a, **kw):
        raise OSError("gated repo / no network")

    _fake_hub(monkeypatch, download)
    spec = load_spec("meta-llama/Meta-Llama-3-70B")
    assert spec.source == "builtin" and spec.num_params == PUBLISHED["meta-llama/Meta-Llama-3-70B"]
    with pytest.raises(SpecError, match="unknown model"):
        load_spec("acme/not-a-model")


def test_offline_never_touches_the_hub(monkeypatch):
    def download(*a, **kw):
        raise AssertionError("hub contacted while HF_HUB_OFFLINE=1")

    _fake_hub(monkeypatch, download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert load_spec("google/gemma-3-1b-it").source == "builtin"
    with pytest.raises(SpecError, match="270m"):  # impossible sizes are refused before any lookup
        load_spec("google/gemma-3-2b")
