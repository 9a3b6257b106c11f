"""`python -m dpo_dist.sft`: the SFT rank entry point (one process per card). The code lives in `dpo_dist.train.sft`."""

from dpo_dist.train.runtime import exit_now
from dpo_dist.train.sft import main

if __name__ == "__main__":
    exit_now(main())
