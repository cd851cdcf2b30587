# syntax=docker/dockerfile:1
# The one mmalign image: `mmalign operator` (the Helm chart's Deployment) and `mmalign launch` / `train`
# (every trainer pod) run from it. No machine of this project runs a Docker engine, so it is not built
# by the tests: tests/unit/test_chart_image.py lints it with hadolint and checks the rules below.
#
#   docker build -t ghcr.io/mmalign/mmalign:0.1.0 .
#   docker build --target operator -t ghcr.io/mmalign/mmalign-operator:0.1.0 .
#
# One stage for the trainer image, `runtime`: the CUDA runtime base, a virtual environment with the
# pinned stack (pyproject.toml is the one place the pins live; the ARGs below must match it, a test
# checks), then the project's source as the last layers, so a source change rebuilds and ships a layer
# of the package's own files, not the GBs of torch below it. No build stage: every dependency is a
# wheel and deepspeed (an sdist) builds no op (DS_BUILD_OPS=0), so no compiler is needed; copying a
# multi-GB venv from a build stage would store it twice (measured: docs/devcluster.md).
# `operator` (with `operator-build`) is the slim image of the chart's Deployment: kopf, kubernetes,
# pydantic, no torch, no CUDA.
#
# The bases are build arguments: the CUDA runtime in production; the dev cluster's real node builds on a
# local Debian + python3 base made with mmdebstrap (devcluster/images.py, docs/devcluster.md), passing
# BASE_IMAGE, OPERATOR_BASE_IMAGE and PIP_CERT (pip's CA bundle where egress re-signs TLS), and WHEELS:
# a folder of the pinned wheels bind-mounted into the build (`buildah bud --volume`), installed with no
# index, so a rebuild never downloads the torch stack again. Unset, pip installs from PyPI.

ARG BASE_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04
ARG OPERATOR_BASE_IMAGE=python:3.11.14-slim-bookworm

# ---------------------------------------------------------------- pins
# Each image's pinned requirements alone, out of pyproject.toml: the stages below copy these files, so
# an edit elsewhere in pyproject.toml (another extra, tool settings) does not rebuild their dependency
# layers (the copy is cached by content). The slim base: it has python3 (the CUDA base has not).
FROM ${OPERATOR_BASE_IMAGE} AS pins
WORKDIR /pins
COPY pyproject.toml ./
RUN python3 -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; x = p["optional-dependencies"]; open("operator.txt", "w").write("\n".join(p["dependencies"] + x["operator"]) + "\n"); open("trainer.txt", "w").write("\n".join(p["dependencies"] + x["operator"] + x["trainer"]) + "\n")'

# ---------------------------------------------------------------- operator (slim)
FROM ${OPERATOR_BASE_IMAGE} AS operator-build

ARG PIP_CERT
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# Dependencies first, from the pins alone: a source change rebuilds only the layers below.
COPY --from=pins /pins/operator.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt
WORKDIR /src
COPY pyproject.toml README.md ./
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

# ---------------------------------------------------------------- runtime (the trainer image)
FROM ${BASE_IMAGE} AS runtime

ARG PIP_CERT
ARG WHEELS
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

# python3 and its venv module for the environment; ca-certificates for S3 over TLS. Ubuntu's archive
# replaces patch releases, so apt packages are not pinned (hadolint DL3008); the Python stack, which
# decides behaviour, is.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# UID/GID 1000, the numbers the chart's securityContext runs as (runAsNonRoot needs a numeric USER);
# Ubuntu 24.04 images ship a user `ubuntu` with that UID, which goes first.
RUN (userdel --remove ubuntu 2>/dev/null || true) \
    && (groupdel ubuntu 2>/dev/null || true) \
    && groupadd --gid 1000 mmalign \
    && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin mmalign

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first; deepspeed is an sdist that must build against THAT torch: no build isolation, and no
# ops compiled (DS_BUILD_OPS=0). There is no compiler in the image, so no op can JIT-compile either:
# the trainer's engine uses torch.optim.AdamW (no FusedAdam / DeepSpeedCPUAdam), which needs none.
# ${WHEELS:+...}: from the mounted wheel folder alone when WHEELS is set, from PyPI otherwise (the
# versions are pinned; hadolint cannot see them behind the expansion).
# hadolint ignore=DL3013
RUN pip install ${WHEELS:+--no-index --find-links "$WHEELS"} "setuptools==${SETUPTOOLS_VERSION}" "wheel==${WHEEL_VERSION}" \
    && pip install ${WHEELS:+--no-index --find-links "$WHEELS"} "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
    && DS_BUILD_OPS=0 pip install ${WHEELS:+--no-index --find-links "$WHEELS"} --no-build-isolation "deepspeed==${DEEPSPEED_VERSION}"

# The rest of the pinned dependencies, from the pins alone (a source change does not touch them).
COPY --from=pins /pins/trainer.txt /tmp/requirements.txt
RUN DS_BUILD_OPS=0 pip install ${WHEELS:+--no-index --find-links "$WHEELS"} --no-build-isolation -r /tmp/requirements.txt

# The package itself, without the dev extra (no pytest, dev-cluster tools or linters in the image), last:
# its dependencies are all in the venv already (--no-deps, no index needed; setuptools builds it).
WORKDIR /src
COPY pyproject.toml README.md ./
COPY mmalign/ mmalign/
COPY operator/ operator/
COPY trainer/ trainer/
COPY devcluster/ devcluster/
# hadolint ignore=DL3013
RUN pip install --no-build-isolation --no-deps ".[operator,trainer]" \
    && mmalign --version \
    && rm -rf /src/build

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="mmalign" \
      org.opencontainers.image.description="MM-RLHF alignment on Kubernetes: the operator and the trainer" \
      org.opencontainers.image.source="https://github.com/mmalign/mmalign" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV HOME=/tmp \
    PYTHONUNBUFFERED=1
USER 1000:1000
WORKDIR /tmp
ENTRYPOINT ["mmalign"]
CMD ["--help"]
