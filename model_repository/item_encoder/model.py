"""Triton python-backend runner for an exported ONNX graph on the CPU (ONNX Runtime).

The bundled CPU tritonserver has only the python backend, so the CPU configuration runs the
same ``model.onnx`` that the GPU configuration (``configs/gpu.pbtxt``: the onnxruntime
backend with the TensorRT accelerator) serves in a stock Triton container. The dynamic
batcher hands over several requests at once: they are padded to one sequence length, run as
one ONNX Runtime call, and split back. Inputs and outputs are taken from the model config, so
the towers and the ranker share this file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Runs ``<version>/model.onnx`` with ONNX Runtime over dynamically batched requests."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_threads", "0"))
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        graph = version_dir / params.get("onnx_file", "model.onnx")
        if not graph.is_file() and (version_dir / "model.onnx").is_file():
            # a version exported before its config named this graph (e.g. the item tower's
            # model.int8.onnx): it keeps serving what it was indexed with
            pb_utils.Logger.log_warn(f"{graph} missing: serving {version_dir}/model.onnx")
            graph = version_dir / "model.onnx"
        self.session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]

    @staticmethod
    def _pad(arrays: list[np.ndarray]) -> np.ndarray:
        """Right-pad with zeros (the [PAD] id, a masked position) to the longest request."""
        width = max(a.shape[1] for a in arrays)
        return np.concatenate([np.pad(a, ((0, 0), (0, width - a.shape[1]))) for a in arrays])

    def execute(self, requests: list) -> list:
        per_input: dict[str, list[np.ndarray]] = {n: [] for n in self.inputs}
        sizes = []
        for request in requests:
            for name in self.inputs:
                per_input[name].append(pb_utils.get_input_tensor_by_name(request, name).as_numpy())
            sizes.append(per_input[self.inputs[0]][-1].shape[0])
        feeds = {name: self._pad(arrays) for name, arrays in per_input.items()}
        try:
            results = self.session.run(self.outputs, feeds)
        except Exception as exc:
            error = pb_utils.TritonError(f"onnxruntime: {exc}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        responses = []
        start = 0
        for size in sizes:
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(result[start : start + size]))
                for name, result in zip(self.outputs, results, strict=True)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses
