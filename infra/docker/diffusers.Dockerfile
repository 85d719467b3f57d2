# syntax=docker/dockerfile:1.7
# The diffusers sdworker image: the core and the diffusers backend with a CUDA build of torch,
# on NVIDIA's CUDA runtime base. sdworker holds the GPU itself. Build from the repository root:
#
#   docker build -f infra/docker/diffusers.Dockerfile -t sdworker-diffusers:0.1.0 .
#
# TORCH names the torch wheel: PyPI's Linux x86_64 wheels are CUDA builds. To match another
# CUDA version, pass e.g. --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128.
# checkov:skip=CKV_DOCKER_2: Kubernetes ignores HEALTHCHECK; the pod's probes check sdworker

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS build
ARG TORCH=torch==2.13.0
ARG TORCH_INDEX=https://pypi.org/simple
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3.12 -m venv /opt/sdworker \
    && /opt/sdworker/bin/pip install --index-url "$TORCH_INDEX" "$TORCH"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sdworker ./sdworker
COPY plugins ./plugins
RUN /opt/sdworker/bin/pip install '.[diffusers]'

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 sdworker \
    && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin sdworker
COPY --from=build /opt/sdworker /opt/sdworker
ENV PATH=/opt/sdworker/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/tmp/huggingface
USER 10001:10001
ENTRYPOINT ["sdworker"]
CMD ["run"]
