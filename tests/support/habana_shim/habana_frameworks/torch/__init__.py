"""Real: loads the HPU bridge and registers the `hpu` device with PyTorch. Stand-in: registers nothing (the twin
runs on CPU); exposes `core` and `hpu` as attributes, as optimum-habana reads `habana_frameworks.torch.hpu`."""

from . import core, hpu  # noqa: F401
