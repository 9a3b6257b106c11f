"""`python -m dpo_dist.generate`: sample responses from a model. The code lives in `dpo_dist.post.generate`."""

from dpo_dist.post.generate import main

if __name__ == "__main__":
    raise SystemExit(main())
