"""Real: the HPU generators' state."""


def manual_seed_all(seed):
    """Real: seeds every HPU generator. Stand-in: no HPU generators exist (torch.manual_seed seeds the CPU's)."""
