"""Triton python-backend runner for an exported ONNX graph on the CPU.

The bundled CPU tritonserver has only the python backend, so the CPU configuration runs the
same ``model.onnx`` that the GPU configuration (``configs/gpu.pbtxt``: the onnxruntime
backend with the TensorRT accelerator) serves in a stock Triton container. The dynamic
batcher hands over several requests at once: they are padded to one sequence length, run as
one call, and split back. Inputs and outputs are taken from the model config, so the towers
and the ranker share this file.

``engine`` (a config parameter) picks what runs the graph:

- ``onnxruntime`` (the default): ONNX Runtime in fp32;
- ``openvino-bf16``: OpenVINO with bf16 matrix products (fp32 accumulation), for the BERT
  towers on CPUs with bf16 instructions (AVX-512 BF16 or AMX): 1.7x ONNX Runtime's items/s
  through Triton and the Milvus engine, at a cosine of 0.99997 or more to it on the
  MovieLens catalogue; a vector moves with its batch only within bf16's rounding (README,
  "Triton model repository"). Refused where the CPU lacks them;
- ``auto``: ``openvino-bf16`` where it can run, else ``onnxruntime``.

Before serving in bf16 the runner checks it against ONNX Runtime in fp32 on probe texts
(token ids) and keeps ONNX Runtime if a row's cosine is below ``MIN_BF16_COSINE``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside Triton (the benchmarks): only its engines are used
    pb_utils = None

ENGINES = ("onnxruntime", "openvino-bf16", "auto")
TOWER_INPUTS = ["input_ids", "attention_mask"]
MIN_BF16_COSINE = 0.999  # measured 0.99997 at worst on MovieLens' 4,096 first item texts


class Session(Protocol):
    def run(self, outputs: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """ONNX Runtime's call: the named outputs (all when None) for ``feeds``."""


def bf16_unavailable() -> str | None:
    """Why OpenVINO cannot run bf16 products here, or None when it can."""
    try:
        import openvino as ov
    except ImportError:
        return "openvino is not installed"
    capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return None if "BF16" in capabilities else "this CPU has no bf16 instructions"


class OpenVinoSession:
    """A graph compiled by OpenVINO for the CPU, called like an ONNX Runtime session."""

    def __init__(self, graph: Path, threads: int, precision: str = "bf16") -> None:
        import openvino as ov

        core = ov.Core()
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision}
        config["PERFORMANCE_HINT"] = "LATENCY"  # one stream: Triton calls one batch at a time
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(core.read_model(str(graph)), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.outputs = [o.get_any_name() for o in self.compiled.outputs]

    def run(self, outputs: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = self.request.infer(feeds)
        # copies: the request's output tensors are overwritten by its next call
        return [np.array(result[self.compiled.output(n)]) for n in outputs or self.outputs]


def probe_feeds(rows: int = 8, width: int = 40) -> dict[str, np.ndarray]:
    """Token ids every BERT vocabulary has (1000-2999), rows of different real lengths."""
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 3000, size=(rows, width), dtype=np.int64)
    mask = (np.arange(width)[None, :] < np.linspace(4, width, rows)[:, None]).astype(np.int64)
    return {"input_ids": ids * mask, "attention_mask": mask}


def min_row_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The smallest cosine between the rows of ``a`` and ``b`` (flattened after axis 0)."""
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return float(cos.min())


def open_session(
    engine: str, graph: Path, threads: int, input_names: list[str]
) -> tuple[Session, str]:
    """The session ``engine`` asks for, and a line saying what serves ``graph`` and why."""
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r}: expected one of {', '.join(ENGINES)}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    fp32 = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    if engine == "onnxruntime":
        return fp32, f"{graph}: ONNX Runtime, fp32"
    why_not = bf16_unavailable()
    if why_not is None and sorted(input_names) != sorted(TOWER_INPUTS):
        why_not = f"inputs {input_names}: bf16 serves the BERT towers ({TOWER_INPUTS})"
    if why_not is None:
        try:
            bf16 = OpenVinoSession(graph, threads)
            probe = probe_feeds()
            cosine = min(
                min_row_cosine(x, y)
                for x, y in zip(bf16.run(None, probe), fp32.run(None, probe), strict=True)
            )
        except Exception as exc:  # e.g. an operator OpenVINO does not support
            why_not = f"OpenVINO failed: {exc}"
        else:
            if cosine >= MIN_BF16_COSINE:
                return bf16, f"{graph}: OpenVINO, bf16 (min cosine to fp32 {cosine:.5f})"
            why_not = f"min cosine to fp32 {cosine:.5f} < {MIN_BF16_COSINE}"
    if engine == "openvino-bf16":
        raise RuntimeError(f"{graph}: engine openvino-bf16 cannot serve it: {why_not}")
    return fp32, f"{graph}: ONNX Runtime, fp32 (engine auto: {why_not})"


class TritonPythonModel:
    """Runs ``<version>/model.onnx`` (or the named graph) over dynamically batched requests."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        graph = version_dir / params.get("onnx_file", "model.onnx")
        if not graph.is_file() and (version_dir / "model.onnx").is_file():
            # a version exported before its config named this graph (e.g. the item tower's
            # model.int8.onnx): it keeps serving what it was indexed with
            pb_utils.Logger.log_warn(f"{graph} missing: serving {version_dir}/model.onnx")
            graph = version_dir / "model.onnx"
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        threads = int(params.get("intra_op_threads", "0"))
        engine = params.get("engine", "onnxruntime")
        self.session, served = open_session(engine, graph, threads, self.inputs)
        pb_utils.Logger.log_info(served)

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
            error = pb_utils.TritonError(f"{type(self.session).__name__}: {exc}")
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
