"""`python -m dpo_dist.compare_base_vs_dpo`: compare the base and the DPO model. The code lives in `dpo_dist.post.compare`."""

from dpo_dist.post.compare import main

if __name__ == "__main__":
    raise SystemExit(main())
