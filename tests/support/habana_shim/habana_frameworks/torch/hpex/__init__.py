"""Real: Habana's fused kernels, optimizers and normalisations."""
