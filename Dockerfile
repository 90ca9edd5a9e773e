# zseg: Cellpose segmentation of microscopy volumes of any size (the image the Nextflow
# processes run in).
#
#   docker build -t zseg:0.1.0 .
#
# GPU-capable: the PyPI torch wheel bundles the CUDA user-space libraries; the host's driver
# comes in with `docker run --gpus all` or `singularity/apptainer --nv` (-profile gpu). The same
# image runs on the CPU. Cellpose weights are not in the image (1.2 GB each, and a missing model
# must never fall back to another one): mount a folder holding them and point
# CELLPOSE_LOCAL_MODELS_PATH at it (default /opt/cellpose/models).
FROM python:3.11.11-slim-bookworm

# procps: `ps`, which Nextflow uses to measure a task's CPU and memory.
RUN apt-get update \
    && apt-get install -y --no-install-recommends procps=2:4.0.2-3 \
    && rm -rf /var/lib/apt/lists/*

# Every cache under /tmp: Singularity/Apptainer run the image read-only, and Nextflow runs the
# container as the calling user (-u), whose home may not exist in the image.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/cache \
    NUMBA_CACHE_DIR=/tmp/numba_cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    TORCH_HOME=/tmp/torch \
    CELLPOSE_LOCAL_MODELS_PATH=/opt/cellpose/models

WORKDIR /opt/zseg
COPY pyproject.toml README.md ./
COPY python ./python

# torch/torchvision pinned to the CUDA build that cellpose 4.2.1.1 resolves to on PyPI; the
# rest comes from pyproject.toml (a test keeps these pins and environment.yml in agreement).
RUN pip install --no-cache-dir torch==2.15.0 torchvision==0.29.2 . \
    && mkdir -p /opt/cellpose/models \
    && zseg --version

RUN useradd --create-home --uid 1000 --shell /bin/bash zseg
USER 1000:1000
WORKDIR /tmp

CMD ["zseg", "--help"]
