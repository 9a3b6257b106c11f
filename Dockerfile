# dpo-dist on Intel Gaudi (Gaudi2 / Gaudi3).
# Base: Habana's PyTorch image. It ships torch and the SynapseAI stack; nothing below may replace them.
ARG SYNAPSE_VERSION=1.22.0
ARG BASE_IMAGE=vault.habana.ai/gaudi-docker/1.22.0/ubuntu22.04/habanalabs/pytorch-installer-2.7.1:latest
FROM ${BASE_IMAGE}
ARG SYNAPSE_VERSION

ENV PT_HPU_LAZY_MODE=1 \
    PT_ENABLE_INT64_SUPPORT=1 \
    TOKENIZERS_PARALLELISM=false \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /workspace/dpo-dist

# Freeze whatever torch* the image ships, so that no requirement can swap it for a PyPI build.
RUN python -m pip freeze | grep -iE '^(torch|torchvision|torchaudio|habana)' > /tmp/image-constraints.txt || true

# DeepSpeed: Habana's fork at the SynapseAI version (DESIGN.md §3), never PyPI's.
RUN python -m pip install -c /tmp/image-constraints.txt \
        "git+https://github.com/HabanaAI/DeepSpeed.git@${SYNAPSE_VERSION}"

# The Gaudi pins: optimum-habana 1.21.2 with the trl/peft of its own DPO example.
COPY requirements-gaudi.txt ./
RUN python -m pip install -c /tmp/image-constraints.txt -r requirements-gaudi.txt

# optimum-habana's launcher script is not in the wheel: fetch gaudi_spawn.py at the same tag.
ADD https://raw.githubusercontent.com/huggingface/optimum-habana/v1.21.2/examples/gaudi_spawn.py /opt/optimum-habana/gaudi_spawn.py
ENV GAUDI_SPAWN=/opt/optimum-habana/gaudi_spawn.py

COPY . .
RUN python -m pip install --no-deps -e .

# No token is baked in: `make run HF_TOKEN=...` passes it at run time (docker run -e HF_TOKEN),
# or mount ~/.cache/huggingface. Multi-node: Habana containers run sshd on port 3022.
CMD ["python", "-m", "launch", "doctor"]
