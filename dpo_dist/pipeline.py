"""`python -m dpo_dist.pipeline`: SFT, DPO, merge, compare and a generation test, in one command. The code lives in `launch.pipeline`."""

from launch.pipeline import main

if __name__ == "__main__":
    raise SystemExit(main())
