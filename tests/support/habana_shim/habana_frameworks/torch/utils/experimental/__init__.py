"""Real: device queries. optimum-habana reads the device type at import time (its FP8 quantizer)."""


class synDeviceType:
    """Real: SynapseAI's device type enum."""

    synDeviceGaudi = 1
    synDeviceGaudi2 = 2
    synDeviceGaudi3 = 3


def _get_device_type():
    """Real: the type of the visible card. Stand-in: Gaudi2, the card the twin's plans are made for."""
    return synDeviceType.synDeviceGaudi2
