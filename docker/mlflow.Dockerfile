# syntax=docker/dockerfile:1
# MLflow tracking server image (k8s/base/mlflow/): `mlflow server` with its UI. The training
# image has only the client (mlflow-skinny, requirements.lock); the server is the full
# `mlflow` at the same version, with every package pinned by requirements-mlflow.lock (kept
# apart because mlflow pins pyarrow<26, which the training stack does not).
# Build from the repository root:
#   docker build -f docker/mlflow.Dockerfile -t recsys/mlflow:3.17.2 .
# The tag is the mlflow version (tests/k8s/test_k8s_images.py keeps the three in step).
# PYTHON_IMAGE, PIP_INDEX_URL and PIP_CERT as in gateway.Dockerfile (`make images` sets them).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:2e32f7d302adc1c37428355c1e646897c0c53f4fd60b6a551245fb90ee129f91

FROM ${PYTHON_IMAGE} AS build
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG PIP_CERT=/etc/ssl/certs/ca-certificates.crt
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /build
COPY requirements-mlflow.lock ./
# Exactly the locked versions, without resolving again; pip check proves the lock complete.
RUN pip install --no-deps -r requirements-mlflow.lock \
 && pip check

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 recsys \
 && useradd --system --uid 10001 --gid recsys --home-dir /tmp --no-create-home --shell /usr/sbin/nologin recsys \
 && mkdir -p /mlflow \
 && chown 10001:10001 /mlflow
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    MLFLOW_DISABLE_TELEMETRY=true
WORKDIR /mlflow
USER 10001:10001
EXPOSE 5000
# k8s/base/mlflow/deployment.yaml passes the same arguments (plus the allowed Host headers).
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000", "--backend-store-uri", "sqlite:////mlflow/mlflow.db", "--serve-artifacts", "--artifacts-destination", "/mlflow/artifacts"]
