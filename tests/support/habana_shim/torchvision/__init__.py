"""Test stand-in (see ../README.md): optimum-habana's model registry imports torchvision.transforms for GLM-4V's
tokenizer, which the twin never uses."""
