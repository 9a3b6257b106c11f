"""Side-by-side benchmark: plain TRL DPOTrainer (A) vs dpo-dist (B). `make bench` / `python -m bench.run`."""
