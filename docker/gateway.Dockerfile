# syntax=docker/dockerfile:1
# Gateway image: python -m services.gateway (gRPC :50051, Prometheus metrics :9464).
# Build from the repository root, after `make proto` (the generated stubs are part of the
# build context):
#   docker build -f docker/gateway.Dockerfile -t recsys/gateway:0.1.0 .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: a self-contained virtualenv with the locked dependencies and the package ----
FROM ${PYTHON_IMAGE} AS build
# torch wheel flavour from download.pytorch.org: cpu (the gateway never needs CUDA).
ARG TORCH_VARIANT=cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY requirements.lock ./
# torch comes from the PyTorch index in the chosen flavour, at the version the lock pins;
# everything else exactly as locked, without resolving again.
RUN TORCH_VERSION="$(sed -nE 's/^torch==([0-9][^+ ;]*).*/\1/p' requirements.lock)" \
 && test -n "${TORCH_VERSION}" \
 && pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
 && grep -vE '^torch==' requirements.lock > /tmp/requirements.txt \
 && pip install --no-deps -r /tmp/requirements.txt
COPY pyproject.toml README.md ./
COPY proto/ proto/
COPY services/ services/
COPY training/ training/
RUN test -d services/api/recsys || { echo "services/api/recsys missing: run 'make proto' before docker build" >&2; exit 1; } \
 && pip install --no-deps . \
 && python -m compileall -q /app/services /app/training

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
