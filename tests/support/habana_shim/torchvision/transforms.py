"""Test stand-in: imported, never used (GLM-4V's image transforms)."""
