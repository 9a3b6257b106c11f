"""Test stand-in for Intel Gaudi's `habana_frameworks` (see ../README.md). Never shipped."""
