# dpo-dist on Intel Gaudi (Gaudi2 / Gaudi3).
# Base: Habana's PyTorch image of Intel Gaudi software 1.24, the release optimum-habana 1.21.2 is validated with
# (its CURRENTLY_VALIDATED_SYNAPSE_VERSION; `launch doctor` checks the bridge's version). It ships torch 2.10 and the
# SynapseAI stack; nothing below may replace them.
ARG SYNAPSE_VERSION=1.24.0
ARG BASE_IMAGE=vault.habana.ai/gaudi-docker/1.24.0/ubuntu22.04/habanalabs/pytorch-installer-2.10.0:latest
FROM ${BASE_IMAGE}
ARG SYNAPSE_VERSION
# HabanaAI/DeepSpeed keeps one branch per SynapseAI release (1.21.0, 1.22.0, ...): the image's release by default.
# optimum-habana 1.21.2's own README names the 1.23.0 branch; pass --build-arg DEEPSPEED_REF=1.23.0 to use that one.
ARG DEEPSPEED_REF=${SYNAPSE_VERSION}

ENV PT_HPU_LAZY_MODE=1 \
    PT_ENABLE_INT64_SUPPORT=1 \
    TOKENIZERS_PARALLELISM=false \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OMPI_MCA_btl_vader_single_copy_mechanism=none

WORKDIR /workspace/dpo-dist

# Freeze whatever torch* and habana* the image ships, so that no requirement can swap it for a PyPI build.
RUN python -m pip freeze | grep -iE '^(torch|torchvision|torchaudio|habana)' > /tmp/image-constraints.txt || true

# DeepSpeed: Habana's fork at the SynapseAI release, never PyPI's.
RUN python -m pip install -c /tmp/image-constraints.txt \
        "git+https://github.com/HabanaAI/DeepSpeed.git@${DEEPSPEED_REF}"

# The Gaudi pins: optimum-habana 1.21.2 with the trl/peft of its own DPO example (numpy < 2 for trl 0.9.6).
COPY requirements-gaudi.txt ./
RUN python -m pip install -c /tmp/image-constraints.txt -r requirements-gaudi.txt

# optimum-habana's launcher script is not in the wheel: fetch gaudi_spawn.py at the same tag.
ADD https://raw.githubusercontent.com/huggingface/optimum-habana/v1.21.2/examples/gaudi_spawn.py /opt/optimum-habana/gaudi_spawn.py
ENV GAUDI_SPAWN=/opt/optimum-habana/gaudi_spawn.py

# .dockerignore keeps the host's .venv, caches, runs and the tests' habana_frameworks stand-in out of the image.
COPY . .
RUN python -m pip install --no-deps -e .

# No token is baked in: `make run HF_TOKEN=...` passes it at run time (docker run -e HF_TOKEN),
# or mount ~/.cache/huggingface. Multi-node: Habana containers run sshd on port 3022.
# Inside the image `make` uses this python (it finds habana_frameworks) and installs nothing.
CMD ["python", "-m", "launch", "doctor"]
