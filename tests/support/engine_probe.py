"""One batch through the engine, as the CPU path runs it or as the HPU path does: log-probs, loss, gradients.

    python tests/support/engine_probe.py --path hpu --model DIR --data DIR --out probe.json   (in the Gaudi twin)
    probe(path="cpu", ...)                                                                    (in the main venv)

The HPU path is optimum-habana's: ``adapt_transformers_to_gaudi()`` before the model loads (Gaudi model classes,
FusedSDPA through ``use_flash_attention``), static shapes, packed rows through a block-diagonal mask. The CPU path
is trl 0.22's side: plain transformers models, per-row (varlen) packing, dynamic shapes. Both tokenise and collate
the same rows with the engine. Each variant (rows padded to the longest, rows padded to buckets, packed) gives the
chosen/rejected log-probs, the DPO loss against fixed reference log-probs, and the gradient of that loss per
parameter; tests/e2e/twin/test_engine_equality.py compares them across paths and variants.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dpo_dist.train.losses import LOSS_TYPES  # noqa: E402

VARIANTS = ("rows", "buckets", "packed", "shared")  # shared: packed with shared prompts
MAX_LENGTH, MAX_PROMPT = 96, 48


def _rows(data_dir: Path, tokenizer, n: int) -> list[dict]:
    from dpo_dist.data.preference import split_hh_transcript

    out = []
    for i, line in enumerate(open(data_dir / "train.jsonl")):
        if i >= n:
            break
        r = json.loads(line)
        p, c, rj = split_hh_transcript(r["chosen"], r["rejected"], i)
        out.append({"prompt": tokenizer.bos_token + p, "chosen": c, "rejected": rj})
    return out


def _with_sliding_window(model_dir: str, window: int) -> str:
    """A copy of the model folder whose sliding-window layers see only ``window`` tokens (shorter than the rows,
    so the packed mask's band matters)."""
    import shutil
    import tempfile

    dst = Path(tempfile.mkdtemp(prefix="probe-sliding-")) / "model"
    shutil.copytree(model_dir, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["sliding_window"] = window
    (dst / "config.json").write_text(json.dumps(cfg))
    return str(dst)


def probe(path: str, model_dir: str, data_dir: str, pairs: int = 6, loss_type: str = "sigmoid",
          sliding_window: int | None = None) -> dict:
    import torch
    from transformers import AutoTokenizer

    from dpo_dist.backend import BACKENDS, TWIN
    from dpo_dist.data.bucketing import choose_buckets, packed_pair_length, pair_row_lengths
    from dpo_dist.model.loader import load_model
    from dpo_dist.train.engine import EngineCollator, EngineConfig, forward_logps, loss_and_metrics, tokenize_pair

    backend = TWIN if path == "hpu" else BACKENDS["cpu"]
    if sliding_window:
        model_dir = _with_sliding_window(model_dir, sliding_window)
    fused_calls = [0]
    if path == "hpu":
        from habana_frameworks.torch.hpex.kernels import FusedSDPA
        from optimum.habana.transformers.modeling_utils import adapt_transformers_to_gaudi

        adapt_transformers_to_gaudi()
        real_apply = FusedSDPA.apply

        def counted(*args, **kwargs):  # how often Gaudi attention takes the fused kernel
            fused_calls[0] += 1
            return real_apply(*args, **kwargs)

        FusedSDPA.apply = staticmethod(counted)
    tok = AutoTokenizer.from_pretrained(model_dir)
    examples = [tokenize_pair(r, tok, MAX_PROMPT, MAX_LENGTH - MAX_PROMPT) for r in _rows(Path(data_dir), tok, pairs)]
    columns = {k: [e[k] for e in examples] for k in examples[0]}
    chosen, rejected = pair_row_lengths(columns, MAX_LENGTH)
    args = type("A", (), {"model_name_or_path": model_dir, "attn_implementation": None, "trust_remote_code": False})
    out = {"path": path, "model_class": None, "variants": {}, "losses": {}}
    for variant in VARIANTS:
        packing = variant in ("packed", "shared")
        torch.manual_seed(0)
        model, _ = load_model(args, device="cpu", bf16=False, packing=packing and backend.packing_attention == "varlen")
        model.train()  # dropout is 0 in the tiny configs; train mode is what a step runs in
        out["model_class"] = type(model).__name__
        cfg = EngineConfig(max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT, max_completion_length=MAX_LENGTH - MAX_PROMPT,
                           pad_token_id=tok.pad_token_id, loss_type=loss_type, beta=0.1, packing=packing,
                           packing_attention=backend.packing_attention, static_shapes=backend.static_shapes,
                           forward_kwargs=dict(backend.forward_kwargs), chunked=True, share_prompt=variant == "shared")
        if variant == "rows":
            buckets = None
        elif packing:  # one bucket total past the batch's: a padded tail
            buckets = [sum(packed_pair_length(len(p), len(c), len(r), MAX_LENGTH, cfg.share_prompt) for p, c, r in zip(
                columns["prompt_input_ids"], columns["chosen_input_ids"], columns["rejected_input_ids"])) + 13]
        else:
            buckets = choose_buckets(chosen + rejected, 3)
        batch = EngineCollator(cfg, buckets)(examples)
        policy = forward_logps(model, batch, cfg)
        ref_c = policy["chosen_logps"].detach() - 0.5 - 0.1 * torch.arange(pairs)
        ref_r = policy["rejected_logps"].detach() + 0.25
        loss, metrics = loss_and_metrics(policy, ref_c, ref_r, cfg, gather=lambda t: t)
        if variant == "rows":  # every loss type from the same log-probs (the engine computes them on every backend)
            out["losses"] = {lt: _loss_of(lt, cfg, model, batch, ref_c, ref_r) for lt in LOSS_TYPES}
        loss.backward()
        grads = {n: p.grad.double().pow(2).sum().sqrt().item() for n, p in model.named_parameters() if p.grad is not None}
        out["variants"][variant] = {
            "chosen_logps": policy["chosen_logps"].tolist(), "rejected_logps": policy["rejected_logps"].tolist(),
            "loss": loss.item(), "accuracy": float(metrics["rewards/accuracies"]), "grad_norms": grads,
            "shape": [int(x) for x in (batch["packed_input_ids"].shape if packing else batch["chosen_input_ids"].shape)],
        }
    out["fused_sdpa_calls"] = fused_calls[0]
    return out


class RunningMean:
    """bco_pair's running reward mean, for one process (trl's RunningMoments needs an accelerator)."""

    def __init__(self):
        self.mean, self.n = 0.0, 0

    def update(self, x):
        self.n += 1
        self.mean += (float(x) - self.mean) / self.n


def _loss_of(loss_type: str, cfg, model, batch, ref_c, ref_r) -> float:
    import dataclasses

    import torch

    from dpo_dist.train.engine import forward_logps, loss_and_metrics

    lcfg = dataclasses.replace(cfg, loss_type=loss_type, label_smoothing=0.1 if loss_type in ("sigmoid", "robust") else 0)
    with torch.no_grad():
        policy = forward_logps(model, batch, lcfg)
        return loss_and_metrics(policy, ref_c, ref_r, lcfg, gather=lambda t: t, running=RunningMean())[0].item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--path", choices=("cpu", "hpu"), required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--loss_type", default="sigmoid")
    p.add_argument("--sliding_window", type=int, default=None)
    a = p.parse_args(argv)
    Path(a.out).write_text(json.dumps(probe(a.path, a.model, a.data, loss_type=a.loss_type,
                                            sliding_window=a.sliding_window)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
