"""`python -m dpo_dist.dpo`: the DPO rank entry point (one process per card). The code lives in `dpo_dist.train.dpo`."""

from dpo_dist.train.dpo import main
from dpo_dist.train.runtime import exit_now

if __name__ == "__main__":
    exit_now(main())
