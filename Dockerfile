# zseg: Cellpose segmentation of microscopy volumes of any size (the image the Nextflow
# processes run in).
#
#   docker build -t zseg:0.1.0 .
#   podman build -t zseg:0.1.0 .
#
# BASE_IMAGE: any Debian bookworm image. The default (the official Python image) has Python
# already; a bare bookworm (e.g. one made with debootstrap, where no registry is reachable: see
# scripts/container/build.sh) gets Debian's python3, which is also 3.11. zseg and its
# dependencies go into the venv /opt/venv, first on PATH.
#
# GPU-capable: the PyPI torch wheel bundles the CUDA user-space libraries; the host's driver
# comes in with `docker run --gpus all` or `singularity/apptainer --nv` (-profile gpu). The same
# image runs on the CPU. Cellpose weights are not in the image (1.2 GB each, and a missing model
# must never fall back to another one): mount a folder holding them at /models (or anywhere, and
# point CELLPOSE_LOCAL_MODELS_PATH at it); the pipeline mounts the folder of --models_dir.
ARG BASE_IMAGE=python:3.11.11-slim-bookworm
FROM ${BASE_IMAGE}

# procps: `ps`, which Nextflow uses to measure a task's CPU and memory. python3-venv only where
# the base has no Python of its own.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN apt-get update \
    && apt-get install -y --no-install-recommends procps=2:4.0.2-3 \
    && if ! command -v python3 >/dev/null; then \
           apt-get install -y --no-install-recommends python3=3.11.2-1+b1 python3-venv=3.11.2-1+b1; \
       fi \
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
    CELLPOSE_LOCAL_MODELS_PATH=/models \
    PATH=/opt/venv/bin:$PATH

WORKDIR /opt/zseg

# torch/torchvision pinned to the CUDA build that cellpose 4.2.1.1 resolves to on PyPI; the
# rest are pyproject.toml's dependencies (a test keeps these pins and environment.yml in
# agreement), installed before zseg's sources arrive so that a code change rebuilds one small
# layer. PIP_CERT: a CA bundle for pip where the registries sit behind a TLS proxy (mounted into
# the build, e.g. podman build -v /etc/ssl/certs/ca-certificates.crt:/host-ca.crt:ro).
ARG PIP_CERT=
COPY pyproject.toml README.md ./
RUN python3 -m venv /opt/venv \
    && python3 -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
        > /tmp/requirements.txt \
    && pip install ${PIP_CERT:+--cert "$PIP_CERT"} --no-cache-dir torch==2.15.0 torchvision==0.29.2 -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt \
    && mkdir -p /models

COPY python ./python
RUN pip install ${PIP_CERT:+--cert "$PIP_CERT"} --no-cache-dir --no-deps . \
    && zseg --version

RUN useradd --create-home --uid 1000 --shell /bin/bash zseg
USER 1000:1000
WORKDIR /tmp

CMD ["zseg", "--help"]
