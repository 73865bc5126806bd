# syntax=docker/dockerfile:1
# Gateway image: python -m services.gateway (gRPC :50051, Prometheus metrics :9464).
# Only what core/ and services/ need at run time (requirements-gateway.lock: exact pins with
# hashes, no torch, Ray, transformers, scipy, pyarrow, Milvus Lite or dev tools); the
# training/ and ops/ code is not in it. Milvus is a server (RECSYS_MILVUS_URI, set by the
# manifests): without Milvus Lite the default local-file URI only reports the store down.
# Build from the repository root, after `make proto` (the generated stubs are part of the
# build context):
#   docker build -f docker/gateway.Dockerfile -t recsys/gateway:0.1.0 .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: a self-contained virtualenv with the locked dependencies and the package ----
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY requirements-gateway.lock ./
# Exactly the locked wheels, each checked against its hash, without resolving again.
RUN pip install --require-hashes --no-deps -r requirements-gateway.lock
COPY pyproject.toml README.md ./
COPY proto/ proto/
COPY core/ core/
COPY services/ services/
# The lock must be complete (pip check) and the entry points must import from it alone.
RUN test -d services/api/recsys || { echo "services/api/recsys missing: run 'make proto' before docker build" >&2; exit 1; } \
 && pip install --no-deps . \
 && pip check \
 && python -c "import services.gateway.__main__, services.gateway.server, services.cli, services.client" \
 && python -m compileall -q /app/core /app/services

# ---- runtime: slim base, the virtualenv, the sources; non-root ----
FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 recsys \
 && useradd --system --uid 10001 --gid recsys --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin recsys
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    RECSYS_GRPC_HOST=0.0.0.0 \
    RECSYS_VAR_DIR=/tmp/recsys
WORKDIR /app
USER 10001:10001
EXPOSE 50051 9464
CMD ["python", "-m", "services.gateway"]
