# syntax=docker/dockerfile:1
# Triton image: the stock NVIDIA image (pinned tag: Triton 2.51, the version of the local
# tritonserver) plus the packages the python-backend models import (tokenizer, CPU configs).
#   docker build -f docker/triton.Dockerfile -t recsys/triton:24.10-py3 .
# Pins follow requirements-triton.lock, except that the stock image's python backend runs
# Python 3.10: onnxruntime 1.23.2 is the newest release with cp310 wheels.
# numpy<2: the python backend returns empty tensors with numpy 2.
# openvino: the item tower's bf16 engine in the CPU configs (engine auto in its config.pbtxt;
# without it, or on a CPU without bf16 instructions, ONNX Runtime serves it in fp32).
FROM nvcr.io/nvidia/tritonserver:24.10-py3
RUN pip install --no-cache-dir "numpy==1.26.4" "onnxruntime==1.23.2" "tokenizers==0.23.3" \
    "openvino==2026.4.1"
# Any non-root UID works (Kubernetes runs it as 10001); the image's own user is triton-server.
USER triton-server
EXPOSE 8000 8001 8002
# The stock entrypoint (nvidia_entrypoint.sh) runs the command; Kubernetes sets the full
# command (k8s/base/triton/load-release.sh: explicit model control, the models of the release
# pointer). Standalone, this image loads no model until asked to (explicit, no poll).
CMD ["tritonserver", "--model-repository=/models", "--model-control-mode=explicit"]
