"""What machine the numbers come from, and its measured matrix-multiply peaks.

The peak is measured, not taken from a data sheet: square GEMMs for a few seconds in each
library the models run on (PyTorch/MKL, NumPy, ONNX Runtime/MLAS), fp32 and int8, with the
same thread count the benchmarks use. On a shared machine the rate depends on what else runs,
so each model section measures a short fp32 GEMM right before it as its own denominator.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.util import load_average


def lscpu() -> dict[str, str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    fields = {}
    for line in out.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def machine_info(command: str) -> dict[str, Any]:
    """Model name, cores, SIMD flags, memory, versions, date, command and load average."""
    cpu = lscpu()
    flags = cpu.get("Flags", "").split()
    simd = sorted(f for f in flags if re.match(r"(avx512|avx2|amx|fma|avx_vnni)", f))
    try:
        meminfo = Path("/proc/meminfo").read_text()
        mem_kb = int(re.findall(r"MemTotal:\s+(\d+)", meminfo)[0])
    except (OSError, IndexError):
        mem_kb = 0
    import onnxruntime
    import torch

    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": command,
        "cpu_model": cpu.get("Model name", platform.processor()),
        "cpus": os.cpu_count(),
        "threads_per_core": cpu.get("Thread(s) per core", "?"),
        "simd_flags": simd,
        "avx512": any(f.startswith("avx512") for f in flags),
        "vnni": any("vnni" in f for f in flags),
        "memory_gib": round(mem_kb / 2**20, 1),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "load_average": load_average(),
    }


def _rate(fn: Callable[[], object], flops: float, seconds: float) -> float:
    fn()
    start = time.perf_counter()
    n = 0
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds or n >= 10_000:
            return flops * n / elapsed


def _torch_gemm(n: int, seconds: float, threads: int, dtype: str) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = (torch.randn(n, n, dtype=getattr(torch, dtype)) for _ in range(2))
    with torch.inference_mode():
        return _rate(lambda: torch.mm(a, b), 2.0 * n**3, seconds)


def torch_fp32(n: int, seconds: float, threads: int) -> float:
    return _torch_gemm(n, seconds, threads, "float32")


def torch_bf16(n: int, seconds: float, threads: int) -> float:
    """bf16 inputs, fp32 accumulation (oneDNN): the arithmetic of the towers' bf16 engine and
    of training's bf16 encoding; fast only on CPUs with bf16 instructions (AVX-512 BF16, AMX)."""
    return _torch_gemm(n, seconds, threads, "bfloat16")


# Below this rate torch's int8 GEMM is a fallback loop, not a kernel: 1.5 GOP/s here, 11 s
# per 2048 GEMM, so timing it at full size cost a bench 23 s for a rate the probe gives.
SLOW_INT8_OPS = 10e9


def torch_int8(n: int, seconds: float, threads: int, probe_n: int = 256) -> tuple[float, int]:
    """Rate and the size it was measured at: ``probe_n`` when the probe is slow, else ``n``."""
    import torch

    torch.set_num_threads(threads)

    def rate(size: int, secs: float) -> float:
        a = torch.randint(-128, 127, (size, size), dtype=torch.int8)
        b = torch.randint(-128, 127, (size, size), dtype=torch.int8)
        with torch.inference_mode():
            return _rate(lambda: torch._int_mm(a, b), 2.0 * size**3, secs)

    probe = rate(probe_n, min(seconds, 0.3))
    if probe < SLOW_INT8_OPS:
        return probe, probe_n
    return rate(n, seconds), n


def numpy_fp32(n: int, seconds: float) -> float:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    return _rate(lambda: a @ b, 2.0 * n**3, seconds)


def _ort_matmul(n: int, seconds: float, threads: int, integer: bool) -> float:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    if integer:
        a_t, b_t, out_t, op = (
            TensorProto.UINT8,
            TensorProto.INT8,
            TensorProto.INT32,
            "MatMulInteger",
        )
    else:
        a_t, b_t, out_t, op = TensorProto.FLOAT, TensorProto.FLOAT, TensorProto.FLOAT, "MatMul"
    graph = helper.make_graph(
        [helper.make_node(op, ["A", "B"], ["C"])],
        "gemm",
        [
            helper.make_tensor_value_info("A", a_t, [n, n]),
            helper.make_tensor_value_info("B", b_t, [n, n]),
        ],
        [helper.make_tensor_value_info("C", out_t, [n, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(
        model.SerializeToString(),
        options,
        providers=["CPUExecutionProvider"],
    )
    rng = np.random.default_rng(0)
    feeds: dict[str, np.ndarray] = (
        {
            "A": rng.integers(0, 255, (n, n), dtype=np.uint8),
            "B": rng.integers(-128, 127, (n, n), dtype=np.int8),
        }
        if integer
        else {
            "A": rng.standard_normal((n, n), dtype=np.float32),
            "B": rng.standard_normal((n, n), dtype=np.float32),
        }
    )
    return _rate(lambda: session.run(None, feeds), 2.0 * n**3, seconds)


def gemm_peaks(n: int = 2048, seconds: float = 3.0, threads: int = 2) -> dict[str, Any]:
    """Measured GEMM rates (FLOP/s or int OP/s) per library; ``fp32``/``int8``/``bf16`` = the
    best."""
    rates: dict[str, float | None] = {}
    load_before = load_average()
    rates["torch_fp32"] = torch_fp32(n, seconds, threads)
    rates["numpy_fp32"] = numpy_fp32(n, seconds)
    rates["ort_fp32"] = _ort_matmul(n, seconds, threads, integer=False)
    sizes: dict[str, int] = {}
    try:
        rates["torch_int8"], sizes["torch_int8"] = torch_int8(n, seconds, threads)
    except RuntimeError:  # no int8 GEMM kernel for this CPU/build
        rates["torch_int8"] = None
    rates["ort_int8"] = _ort_matmul(n, seconds, threads, integer=True)
    rates["torch_bf16"] = torch_bf16(n, seconds, threads)
    fp32 = max(v for k, v in rates.items() if k.endswith("fp32") and v)
    int8 = max((v for k, v in rates.items() if k.endswith("int8") and v), default=None)
    return {
        "n": n,
        "seconds_each": seconds,
        "threads": threads,
        "rates": rates,
        "sizes": {k: sizes.get(k, n) for k in rates},  # a slow kernel is timed smaller
        "fp32": fp32,
        "int8": int8,
        "bf16": rates["torch_bf16"],
        "load_average": [load_before, load_average()],
    }


def quick_fp32_peak(seconds: float = 1.5, threads: int = 2, n: int = 2048) -> float:
    """A short fp32 GEMM (best of PyTorch and ONNX Runtime) right before a model section."""
    return max(torch_fp32(n, seconds, threads), _ort_matmul(n, seconds, threads, integer=False))
