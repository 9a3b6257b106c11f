"""Real: the lazy-mode graph controls."""


def mark_step(device_str="", sync=False):
    """Real: cuts the accumulated lazy-mode graph and runs it on the HPU. Stand-in: CPU runs eagerly; nothing to do."""
