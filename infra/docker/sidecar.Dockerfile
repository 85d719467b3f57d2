# syntax=docker/dockerfile:1.7
# The slim sdworker image: the core and the HTTP backends (a1111, comfyui), no torch. It runs as
# the main container next to a Web UI or ComfyUI sidecar. Build from the repository root:
#
#   docker build -f infra/docker/sidecar.Dockerfile -t sdworker:0.1.0 .
#
# Both stages use the same pinned base, so the virtual environment's interpreter path holds.
# checkov:skip=CKV_DOCKER_2: Kubernetes ignores HEALTHCHECK; the pod's probes check sdworker

FROM python:3.12.8-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/sdworker
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sdworker ./sdworker
COPY plugins ./plugins
RUN /opt/sdworker/bin/pip install .

FROM python:3.12.8-slim-bookworm
RUN groupadd --gid 10001 sdworker \
    && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin sdworker
COPY --from=build /opt/sdworker /opt/sdworker
ENV PATH=/opt/sdworker/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
ENTRYPOINT ["sdworker"]
CMD ["run"]
