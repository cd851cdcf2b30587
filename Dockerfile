# syntax=docker/dockerfile:1
# The one mmalign image: `mmalign operator` (the Helm chart's Deployment) and `mmalign launch` / `train`
# (every trainer pod) run from it. No machine of this project runs a Docker engine, so it is not built
# by the tests: tests/unit/test_chart_image.py lints it with hadolint and checks the rules below.
#
#   docker build -t ghcr.io/mmalign/mmalign:0.1.0 .
#   docker build --target operator -t ghcr.io/mmalign/mmalign-operator:0.1.0 .
#
# Two stages: `build` makes a virtual environment with the pinned stack (pyproject.toml is the one
# place the pins live; the ARGs below must match it, a test checks), `runtime` copies only that
# environment onto the same CUDA runtime base. Same base in both, so the venv's interpreter path holds.
# `operator` (with `operator-build`) is the slim image of the chart's Deployment: kopf, kubernetes,
# pydantic, no torch, no CUDA.
#
# The bases are build arguments: the CUDA runtime in production; the dev cluster's real node builds on a
# local Debian + python3 base made with mmdebstrap (devcluster/images.py, docs/devcluster.md), passing
# BASE_IMAGE, OPERATOR_BASE_IMAGE and PIP_CERT (pip's CA bundle where egress re-signs TLS).

ARG BASE_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04
ARG OPERATOR_BASE_IMAGE=python:3.11.14-slim-bookworm

# ---------------------------------------------------------------- operator (slim)
FROM ${OPERATOR_BASE_IMAGE} AS operator-build

ARG PIP_CERT
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first, from pyproject.toml alone: a source change rebuilds only the layers below.
COPY pyproject.toml README.md ./
# hadolint ignore=DL3013
RUN python3 -c 'import sys, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print("\n".join(p["dependencies"] + [r for extra in sys.argv[1:] for r in p["optional-dependencies"][extra]]))' operator > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt
COPY mmalign/ mmalign/
COPY operator/ operator/
COPY trainer/ trainer/
COPY devcluster/ devcluster/
# hadolint ignore=DL3013
RUN pip install --no-deps ".[operator]" \
    && mmalign --version

FROM ${OPERATOR_BASE_IMAGE} AS operator

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="mmalign-operator" \
      org.opencontainers.image.description="The mmalign operator (no trainer stack)" \
      org.opencontainers.image.source="https://github.com/mmalign/mmalign" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN groupadd --gid 1000 mmalign \
    && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin mmalign
COPY --from=operator-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 1000:1000
WORKDIR /tmp
ENTRYPOINT ["mmalign"]
CMD ["operator"]

# ---------------------------------------------------------------- build
FROM ${BASE_IMAGE} AS build

ARG PIP_CERT
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.2
ARG DEEPSPEED_VERSION=0.19.8
ARG SETUPTOOLS_VERSION=84.2.1
ARG WHEEL_VERSION=0.48.0

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

# Ubuntu's archive replaces patch releases, so apt packages are not pinned (hadolint DL3008);
# the Python stack, which decides behaviour, is.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first; deepspeed is an sdist that must build against THAT torch: no build isolation, and no
# ops compiled (DS_BUILD_OPS=0). The runtime stage has no compiler either, so no op can JIT-compile:
# the trainer's engine uses torch.optim.AdamW (no FusedAdam / DeepSpeedCPUAdam), which needs none.
RUN pip install "setuptools==${SETUPTOOLS_VERSION}" "wheel==${WHEEL_VERSION}" \
    && pip install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
    && DS_BUILD_OPS=0 pip install --no-build-isolation "deepspeed==${DEEPSPEED_VERSION}"

# The package itself, without the dev extra (no pytest, dev-cluster tools or linters in the image).
# Its dependencies are pinned in pyproject.toml; hadolint cannot see that through ".[...]".
WORKDIR /src
# The rest of the pinned dependencies from pyproject.toml alone, then the source (seconds to rebuild).
COPY pyproject.toml README.md ./
# hadolint ignore=DL3013
RUN python3 -c 'import sys, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print("\n".join(p["dependencies"] + [r for extra in sys.argv[1:] for r in p["optional-dependencies"][extra]]))' operator trainer > /tmp/requirements.txt \
    && DS_BUILD_OPS=0 pip install --no-build-isolation -r /tmp/requirements.txt
COPY mmalign/ mmalign/
COPY operator/ operator/
COPY trainer/ trainer/
COPY devcluster/ devcluster/
# hadolint ignore=DL3013
RUN DS_BUILD_OPS=0 pip install --no-build-isolation --no-deps ".[operator,trainer]" \
    && mmalign --version

# ---------------------------------------------------------------- runtime
FROM ${BASE_IMAGE} AS runtime

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="mmalign" \
      org.opencontainers.image.description="MM-RLHF alignment on Kubernetes: the operator and the trainer" \
      org.opencontainers.image.source="https://github.com/mmalign/mmalign" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV DEBIAN_FRONTEND=noninteractive
# python3 for the venv's interpreter; ca-certificates for S3 over TLS.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# UID/GID 1000, the numbers the chart's securityContext runs as (runAsNonRoot needs a numeric USER);
# Ubuntu 24.04 images ship a user `ubuntu` with that UID, which goes first.
RUN (userdel --remove ubuntu 2>/dev/null || true) \
    && (groupdel ubuntu 2>/dev/null || true) \
    && groupadd --gid 1000 mmalign \
    && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin mmalign

COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

USER 1000:1000
WORKDIR /tmp
ENTRYPOINT ["mmalign"]
CMD ["--help"]
