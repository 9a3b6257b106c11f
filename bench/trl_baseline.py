"""(A) A plain TRL DPOTrainer script, as a user would write it: defaults everywhere (A-tuned: --options).

The reference is a second model (TRL wraps it for ZeRO-3), every batch is padded to its
longest row, DPOConfig defaults (per_device_train_batch_size 8, max_length 1024,
max_prompt_length 512). The only additions are measurements, identical to dpo-dist's: train-loop
time, real and fed (padded) tokens, peak RSS per rank and RSS before the models load.

    deepspeed --num_accelerators 2 --module bench.trl_baseline --model M --data D --pairs 96 \
        --deepspeed ds_configs/zero3.json --out result.json
"""

from __future__ import annotations

import argparse
import json
import resource
import time

from dpo_dist.data.bucketing import fed_tokens, unpadded_tokens
from dpo_dist.data.preference import split_hh_transcript
from dpo_dist.train.recorder import current_rss_bytes
from dpo_dist.train.trl_trainer import count_real_tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="folder with train.jsonl (hh-rlhf transcripts)")
    ap.add_argument("--pairs", type=int, default=96)
    ap.add_argument("--deepspeed", default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--output_dir", default="/tmp/bench-trl-baseline")
    ap.add_argument("--local_rank", type=int, default=-1)
    ap.add_argument("--max_length", type=int, default=None, help="default: DPOConfig's")
    ap.add_argument("--max_prompt_length", type=int, default=None, help="default: DPOConfig's")
    ap.add_argument("--options", default="{}",
                    help="JSON object of DPOConfig fields over the defaults (A-tuned: TRL's own tuning options)")
    a = ap.parse_args()

    import torch
    import torch.distributed as dist
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    kw = {k: v for k, v in (("max_length", a.max_length), ("max_prompt_length", a.max_prompt_length)) if v}
    # bf16=False unless --options asks: DPOConfig defaults to bf16, which TRL refuses on a CPU without bf16 support.
    kw = {"bf16": False, **kw, **json.loads(a.options)}
    args = DPOConfig(output_dir=a.output_dir, deepspeed=a.deepspeed, report_to="none", save_strategy="no",
                     num_train_epochs=1, logging_steps=1, **kw)
    tok = AutoTokenizer.from_pretrained(a.model)
    ds = load_dataset("json", data_files=f"{a.data}/train.jsonl")["train"].select(range(a.pairs))

    def split(row, i):
        p, c, r = split_hh_transcript(row["chosen"], row["rejected"], i)
        return {"prompt": tok.bos_token + p, "chosen": c, "rejected": r}

    ds = ds.map(split, with_indices=True)
    rss0 = current_rss_bytes()
    model = AutoModelForCausalLM.from_pretrained(a.model)
    ref = AutoModelForCausalLM.from_pretrained(a.model)

    class Measured(DPOTrainer):  # counting only
        real = fed = unpadded = pairs = 0

        def compute_loss(self, model, inputs, *args, **kwargs):
            if model.training:
                self.real += count_real_tokens(inputs)
                self.unpadded += unpadded_tokens(inputs, self.max_length)
                # padding_free: the rows run as one flat row, no padding (each row cut at max_length)
                self.fed += unpadded_tokens(inputs, self.max_length) if self.padding_free else fed_tokens(
                    inputs, self.max_length)
                self.pairs += int(inputs["prompt_input_ids"].shape[0])
            return super().compute_loss(model, inputs, *args, **kwargs)

    times = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a_, **k):
            times["t0"] = time.perf_counter()

        def on_train_end(self, *a_, **k):
            times["train"] = time.perf_counter() - times["t0"]

    trainer = Measured(model=model, ref_model=ref, args=args, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
    trainer.train()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    vals = torch.tensor([trainer.real, trainer.fed, trainer.pairs, trainer.unpadded, 0], dtype=torch.float64)
    mx = torch.tensor([peak, rss0, times["train"]], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(vals)
        dist.all_reduce(mx, op=dist.ReduceOp.MAX)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if trainer.is_world_process_zero():
        out = {
            "side": "A", "pairs": a.pairs, "pairs_trained": int(vals[2]), "real_tokens": int(vals[0]),
            "fed_tokens": int(vals[1]), "unpadded_tokens": int(vals[3]), "train_seconds": float(mx[2]), "peak_rss_gib_per_rank_max": float(mx[0]) / 2**30,
            "rss_before_model_gib_max": float(mx[1]) / 2**30, "world_size": args.world_size,
            "per_device_train_batch_size": args.per_device_train_batch_size, "max_length": args.max_length,
            "max_prompt_length": args.max_prompt_length, "first_train_loss": losses[0] if losses else None,
            "reference": "sharded" if a.deepspeed else "replicated", "options": json.loads(a.options),
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "train_losses": losses,
        }
        with open(a.out, "w") as fh:
            json.dump(out, fh, indent=2)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
