# syntax=docker/dockerfile:1
# Gateway image: python -m services.gateway (gRPC :50051, Prometheus metrics :9464); the
# profile worker (python -m services.profile_worker) runs from it too.
# Only what core/ and services/ need at run time (requirements-gateway.lock: exact pins with
# hashes, no torch, Ray, transformers, scipy, pyarrow, Milvus Lite or dev tools); the
# training/ and ops/ code is not in it. Milvus is a server (RECSYS_MILVUS_URI, set by the
# manifests): without Milvus Lite the default local-file URI only reports the store down.
# The gRPC stubs are generated here from proto/ (requirements-build.lock's protoc, kept out of
# the image). Build from the repository root (`make images` does, with the build arguments of
# a machine without a container registry):
#   docker build -f docker/gateway.Dockerfile -t recsys/gateway:0.1.0 .
# PYTHON_IMAGE: python:3.11-slim-bookworm pinned by digest; here docker/base.sh's Debian
# bookworm import. PIP_INDEX_URL / PIP_CERT: the package index and the CA bundle to trust.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:2e32f7d302adc1c37428355c1e646897c0c53f4fd60b6a551245fb90ee129f91

# ---- build: a self-contained virtualenv with the locked dependencies and the package ----
FROM ${PYTHON_IMAGE} AS build
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG PIP_CERT=/etc/ssl/certs/ca-certificates.crt
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY requirements-gateway.lock requirements-build.lock ./
# Exactly the locked wheels, each checked against its hash, without resolving again.
RUN pip install --require-hashes --no-deps -r requirements-gateway.lock \
 && pip install --require-hashes --no-deps --target /opt/build-tools -r requirements-build.lock
COPY pyproject.toml README.md ./
COPY proto/ proto/
COPY core/ core/
COPY services/ services/
# Stubs from proto/ (the context never carries generated ones: .dockerignore); the lock must
# be complete (pip check) and the entry points must import from it alone.
RUN PYTHONPATH=/opt/build-tools python -m grpc_tools.protoc -Iproto --python_out=services/api \
      --grpc_python_out=services/api proto/recsys/v1/recommender.proto \
 && pip install --no-deps . \
 && rm -rf build *.egg-info \
 && pip check \
 && python -c "import services.gateway.__main__, services.gateway.server, services.profile_worker.__main__" \
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
