"""dpo-dist launcher: plan a run (pure), write its DeepSpeed config and command, start it.

Nothing in this package imports torch, deepspeed or transformers at module level, so
``python -m launch plan`` works on a laptop without an accelerator stack.
"""
