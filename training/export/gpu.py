"""GPU artefacts: fp16 ONNX variants and TensorRT engines with dynamic-shape profiles.

``python -m training.export.gpu --repository model_repository`` converts the newest release's
ONNX graphs to fp16 (``model_fp16.onnx`` beside ``model.onnx``) and, where TensorRT and a GPU
are present, builds an fp16 engine per model (``model.plan``) with one optimisation profile
covering batch 1..64 and sequence 16..128 (``python -m bench.gpu`` times the ranker's engine
against ONNX Runtime on the CPU). The stock
Triton GPU configs (``configs/gpu.pbtxt``) can serve ``model.onnx`` through ONNX Runtime's
TensorRT accelerator (with an engine cache) without this script; the engines are for
``tensorrt_plan`` deployments and for measuring.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.export.repository import latest_release

log = logging.getLogger(__name__)
MODELS = ("item_encoder", "user_encoder", "ranker")
FP16_TOLERANCE = 2e-2  # fp16 keeps ~3 decimal digits; a broken graph is off by far more


@dataclass(frozen=True)
class Profile:
    """Shapes TensorRT optimises for: (min, opt, max) of batch and sequence length."""

    batch: tuple[int, int, int] = (1, 16, 64)
    sequence: tuple[int, int, int] = (16, 64, 128)


def to_fp16(onnx_path: Path, out_path: Path) -> Path:
    """An fp16 copy of a graph with fp32 inputs/outputs kept, for GPU serving."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(onnx_path))
    converted = convert_float_to_float16(model, keep_io_types=True)
    onnx.save(converted, str(out_path))
    return out_path


def _feeds(input_names: list[str], batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for name in input_names:
        if name == "input_ids":
            ids = rng.integers(1000, 20000, size=(batch, seq), dtype=np.int64)
            ids[:, 0] = 101  # [CLS]
            feeds[name] = ids
        elif name == "attention_mask":
            feeds[name] = np.ones((batch, seq), dtype=np.int64)
        else:
            feeds[name] = np.zeros((batch, seq), dtype=np.int64)
    return feeds


def fp16_parity(fp32_path: Path, fp16_path: Path, providers: list[str]) -> float:
    """Largest absolute output difference of the fp16 graph against fp32 on random tokens."""
    import onnxruntime as ort

    a = ort.InferenceSession(str(fp32_path), providers=providers)
    b = ort.InferenceSession(str(fp16_path), providers=providers)
    feeds = _feeds([i.name for i in a.get_inputs()], 4, 32)
    return max(
        float(np.abs(x - y).max())
        for x, y in zip(a.run(None, feeds), b.run(None, feeds), strict=True)
    )


def build_engine(onnx_path: Path, engine_path: Path, profile: Profile, fp16: bool = True) -> Path:
    """Build a serialized TensorRT engine (TensorRT 10 Python API) for a dynamic-shape graph."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 4 << 30)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    opt = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        shapes = [(b, s) for b, s in zip(profile.batch, profile.sequence, strict=True)]
        opt.set_shape(name, *shapes)
    config.add_optimization_profile(opt)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine for {onnx_path}")
    engine_path.write_bytes(bytes(serialized))
    return engine_path


def trt_runner(engine_path: Path) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
    """A callable running a serialized engine on numpy feeds (copies in and out included, as a
    server pays them); outputs in the engine's output order, as fp32 numpy arrays."""
    import tensorrt as trt
    import torch

    dtypes = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.int32: torch.int32,
        trt.int64: torch.int64,
    }
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise RuntimeError(f"TensorRT could not load {engine_path}")
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if n not in inputs]

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        stream = torch.cuda.current_stream()  # copies and the engine ordered on one stream
        buffers = {}
        for name in inputs:
            tensor = torch.from_numpy(feeds[name]).to("cuda", dtypes[engine.get_tensor_dtype(name)])
            context.set_input_shape(name, tuple(tensor.shape))
            buffers[name] = tensor
        for name in outputs:
            shape = tuple(context.get_tensor_shape(name))
            dtype = dtypes[engine.get_tensor_dtype(name)]
            buffers[name] = torch.empty(shape, dtype=dtype, device="cuda")
        for name, tensor in buffers.items():
            context.set_tensor_address(name, tensor.data_ptr())
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        return [buffers[name].float().cpu().numpy() for name in outputs]

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.export.gpu", description=__doc__)
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--engines", action="store_true", help="also build TensorRT engines")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    version = latest_release(args.repository)
    report: dict[str, object] = {"version": version}
    for model in args.models:
        folder = args.repository / model / str(version)
        if not (folder / "model.onnx").is_file():
            continue
        fp16 = to_fp16(folder / "model.onnx", folder / "model_fp16.onnx")
        diff = fp16_parity(folder / "model.onnx", fp16, ["CPUExecutionProvider"])
        if diff > FP16_TOLERANCE:
            print(f"{model}: fp16 differs by {diff:.3g} > {FP16_TOLERANCE}", file=sys.stderr)
            return 1
        entry: dict[str, object] = {"fp16_max_abs_diff": diff}
        if args.engines:
            build_engine(folder / "model.onnx", folder / "model.plan", Profile())
            entry["engine"] = str(folder / "model.plan")
        report[model] = entry
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
