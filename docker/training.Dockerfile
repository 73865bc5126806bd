# syntax=docker/dockerfile:1
# Training / export image, run by KubeRay as Ray head and workers:
#   python -m training.train --config training/configs/<file>.yaml
#   python -m training.export --checkpoint <dir> --repository <model repository>
# and the offline jobs of ops/ (indexing into Milvus, segments, evaluation). It installs the
# whole requirements.lock (serving, training and dev stacks); the gateway image does not.
# The gRPC stubs are generated in the build (requirements-build.lock's protoc). Build from the
# repository root (`make images` does, with this machine's build arguments):
#   CPU (dev):  docker build -f docker/training.Dockerfile -t recsys/training:0.1.0 .
#   GPU (prod): docker build -f docker/training.Dockerfile --build-arg TORCH_VARIANT=cu128 \
#                 -t recsys/training:0.1.0-cu128 .
# TORCH_VARIANT picks the wheel flavour on download.pytorch.org (cpu, cu126, cu128, ...);
# the torch version itself is always the one requirements.lock pins. The CUDA wheel brings
# its CUDA runtime (nvidia-* wheels); the node only needs the NVIDIA driver. TORCH_FIND_LINKS,
# when set, is a folder URL that holds that torch wheel (a machine that cannot reach
# download.pytorch.org: `make images` serves its local wheel on loopback); the wheel is then
# installed from there alone. PYTHON_IMAGE, PIP_INDEX_URL and PIP_CERT as in gateway.Dockerfile.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:2e32f7d302adc1c37428355c1e646897c0c53f4fd60b6a551245fb90ee129f91

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VARIANT=cpu
ARG TORCH_FIND_LINKS=
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG PIP_CERT=/etc/ssl/certs/ca-certificates.crt
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY requirements.lock requirements-build.lock ./
RUN TORCH_VERSION="$(sed -nE 's/^torch==([0-9][^+ ;]*).*/\1/p' requirements.lock)" \
 && test -n "${TORCH_VERSION}" \
 && if [ -n "${TORCH_FIND_LINKS}" ]; then \
      pip install --no-deps --no-index --find-links "${TORCH_FIND_LINKS}" "torch==${TORCH_VERSION}+${TORCH_VARIANT}"; \
    else \
      pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}"; \
    fi \
 && grep -vE '^torch==' requirements.lock > /tmp/requirements.txt \
 && pip install --no-deps -r /tmp/requirements.txt \
 && pip install --require-hashes --no-deps --target /opt/build-tools -r requirements-build.lock
COPY pyproject.toml README.md ./
COPY proto/ proto/
COPY core/ core/
# services/: the ops/ jobs (indexing, segments, served evaluation) use its vector store,
# Triton client and gRPC client.
COPY services/ services/
COPY training/ training/
COPY ops/ ops/
# Tracked model configs only (.dockerignore drops weights): the job copies them into the
# model repository next to the version it exports.
COPY model_repository/ model_repository/
# Demo dataset (RECSYS_DATA_DIR); real deployments point it at mounted or fetched data.
COPY third_party/movielens/ third_party/movielens/
RUN PYTHONPATH=/opt/build-tools python -m grpc_tools.protoc -Iproto --python_out=services/api \
      --grpc_python_out=services/api proto/recsys/v1/recommender.proto \
 && pip install --no-deps . \
 && rm -rf build *.egg-info \
 && python -m compileall -q /app/core /app/services /app/training /app/ops

FROM ${PYTHON_IMAGE}
# KubeRay's default Ray health probes call wget.
RUN apt-get update \
 && apt-get install -y --no-install-recommends wget \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 recsys \
 && useradd --system --uid 10001 --gid recsys --home-dir /tmp --no-create-home --shell /bin/bash recsys
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    RECSYS_VAR_DIR=/tmp/recsys \
    RECSYS_DATA_DIR=/app/third_party/movielens/ml-latest-small
WORKDIR /app
USER 10001:10001
CMD ["python", "-m", "training.train", "--help"]
