"""`python -m dpo_dist.merge`: gather ZeRO shards, merge LoRA, write a verified Hugging Face folder. The code lives in `dpo_dist.post.merge`."""

from dpo_dist.post.merge import main

if __name__ == "__main__":
    raise SystemExit(main())
