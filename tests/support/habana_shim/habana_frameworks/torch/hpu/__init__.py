"""Real: the `torch.hpu`-like device module. Stand-in: what optimum-habana's import chain and trainer read."""

import contextlib
import resource

from . import random  # noqa: F401  (optimum-habana imports `habana_frameworks.torch.hpu.random`)


def is_available():
    """Real: True when a Gaudi card is visible. Stand-in: False (there is none; the twin is asked for explicitly)."""
    return False


def wrap_in_hpu_graph(module, *args, **kwargs):
    """Real: records the module's forward as an HPU graph and replays it. Stand-in: the module unchanged (the
    twin has no graphs; GaudiDPOTrainer wraps a separate reference model with it)."""
    return module


def memory_stats(device=None):
    """Real: the HBM allocator's counters in bytes. Stand-in: the process's peak resident memory for
    InUse/MaxInUse (the keys optimum-habana's get_hpu_memory_stats reads) and no limit (0)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"InUse": peak, "MaxInUse": peak, "Limit": 0}


def get_device_name(device=None):
    """Real: the card's marketing name ("GAUDI2", "GAUDI3"). Stand-in: "GAUDI2", as `utils.experimental` reports;
    imported at load time by optimum-habana's wav2vec2 model."""
    return "GAUDI2"


@contextlib.contextmanager
def sdp_kernel(enable_recompute=False, **kwargs):
    """Real: selects FusedSDPA's recompute mode (memory for speed) for the calls inside it; optimum-habana's Gemma 3
    attention wraps its FusedSDPA calls in it. Stand-in: nothing to select (the stand-in FusedSDPA keeps no state)."""
    yield
