"""The ranker on a GPU (TensorRT fp16, PyTorch CUDA) against ONNX Runtime on the CPU.

One prepared script for a lent GPU machine, which starts bare and takes at most 64 MiB of
working tree, so the run is split in three:

* ``python -m bench.gpu pack`` (here): the release's trained ranker with its weights stored
  as fp16 (45 MB instead of 90), the tokenizer settings of the release and real (user text,
  item text) pairs of the catalogue, into ``var/gpu-bundle``.
* ``python -m bench.gpu run --bundle var/gpu-bundle --out DIR`` (there): restores the fp32
  ranker, exports it to ONNX with the parity check, and times every backend the machine has
  on the same batches in one process: ONNX Runtime CPU (the served graph, the
  fused graph and int8), PyTorch CUDA fp32 and fp16, fp16 replayed as CUDA graphs, TensorRT
  fp16 (when ``tensorrt`` is importable), ONNX Runtime's CUDA / TensorRT providers (when
  present). Output quality of each
  backend is measured against ONNX Runtime CPU fp32 on real pairs; FLOP/s against GEMM peaks
  measured in the same run for the precision used. A backend that cannot run is recorded as
  an error, not silently dropped.
* ``python -m bench.gpu report DIR/bench_gpu.json`` (here): keeps the JSON in
  ``reports/bench_gpu.json`` and re-renders ``BENCHMARKS.md`` with a GPU section.

Throughput includes the host-to-device copies of the token ids and the copy of the scores
back, as a server pays them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench import models
from bench.gpu_report import QUALITY_ITEMS, QUALITY_USERS, REFERENCE, render
from bench.tokens import TokenizerSpec, encode
from bench.util import FP16_WEIGHTS, copy_weights, cpu_model
from core.paths import REPO_ROOT

Runner = Callable[[models.Feeds], list[np.ndarray]]
BATCH_SIZES = (1, 16, 64, 256, 1024)
RANKER_FILES = ("config.json", "head.pt", "ranker_config.json", "tokenizer.json")
RANKER_COPIED = (*RANKER_FILES, "tokenizer_config.json")


# --- pack (on the development machine) ---------------------------------------------------
def pack(repository: Path, data_dir: Path, out: Path, users: int = 64, items: int = 2048) -> Path:
    """Write the bundle the GPU machine needs for the newest release (module docstring)."""
    from bench.tokens import real_texts
    from training.export.repository import latest_release

    version = latest_release(repository)
    release = json.loads((repository / "ranker" / str(version) / "release.json").read_text())
    texts = real_texts(data_dir)
    return pack_ranker(
        Path(release["ranker"]),
        TokenizerSpec.of_release(repository),
        {"users": texts["users"][:users], "items": texts["items"][:items]},
        out,
        release=version,
    )


def pack_ranker(
    source: Path,
    spec: TokenizerSpec,
    texts: dict[str, list[str]],
    out: Path,
    release: int | None = None,
) -> Path:
    """A ranker directory (fp16 weights), its tokenizer settings and the texts, into ``out``."""
    if out.exists():
        shutil.rmtree(out)
    copy_weights(source, "model.safetensors", out / "ranker", FP16_WEIGHTS, True, RANKER_COPIED)
    settings = {
        "max_length": spec.max_length,
        "pair_max_length": spec.pair_max_length,
        "multiple": spec.multiple,
        "release": release,
        "ranker": str(source),
    }
    (out / "spec.json").write_text(json.dumps(settings))
    (out / "texts.json").write_text(json.dumps(texts))
    return out


def restore_ranker(bundle: Path, work: Path) -> Path:
    """An fp32 ranker directory from the bundle (fp16-rounded weights, widened back)."""
    target = work / "ranker"
    copy_weights(bundle / "ranker", FP16_WEIGHTS, target, "model.safetensors", False, RANKER_COPIED)
    return target


# --- the machine ---------------------------------------------------------------------------
def environment() -> dict[str, Any]:
    """GPU, driver, libraries and which GPU backends exist here."""
    import onnxruntime as ort
    import torch

    env: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "host_cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "onnxruntime": ort.__version__,
        "ort_providers": ort.get_available_providers(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    try:
        import tensorrt

        env["tensorrt"] = tensorrt.__version__
    except ImportError as exc:
        env["tensorrt"] = None
        env["tensorrt_missing"] = str(exc)
    env["trtexec"] = shutil.which("trtexec")
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        env["nvidia_smi"] = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.strip()
    return env


def gpu_peaks(n: int = 8192, reps: int = 10) -> dict[str, float]:
    """Dense matrix-multiply rates (FLOP/s) on the GPU: fp32 (no TF32) and fp16."""
    import torch

    peaks = {}
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        a = torch.randn(n, n, device="cuda", dtype=dtype)
        b = torch.randn(n, n, device="cuda", dtype=dtype)
        for _ in range(3):
            a @ b
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            a @ b
        end.record()
        torch.cuda.synchronize()
        peaks[name] = 2.0 * n**3 * reps / (start.elapsed_time(end) / 1000)
        del a, b
    torch.cuda.empty_cache()
    return peaks


# --- backends ------------------------------------------------------------------------------
def _on_gpu(module: Any, half: bool) -> Any:
    """A copy of ``module`` on the GPU in fp16 or fp32, in eval mode."""
    import copy

    model = copy.deepcopy(module).to("cuda")
    return (model.half() if half else model.float()).eval()


def torch_cuda_runner(module: Any, half: bool) -> Runner:
    """The PyTorch module on the GPU, fp32 (TF32 off) or fp16 weights and activations."""
    import torch

    model = _on_gpu(module, half)

    def run(feeds: models.Feeds) -> list[np.ndarray]:
        with torch.inference_mode():
            out = model(**{k: torch.from_numpy(v).to("cuda") for k, v in feeds.items()})
        return [o.float().cpu().numpy() for o in out]

    return run


def cuda_graph_runner(module: Any, half: bool) -> Runner:
    """The PyTorch module replayed as one CUDA graph per input shape: the per-kernel launch
    cost of eager PyTorch (which dominates small batches) is paid once, at capture; the
    nearest thing to a compiled engine this machine has without TensorRT."""
    import torch

    model = _on_gpu(module, half)
    graphs: dict[tuple[Any, ...], tuple[Any, dict[str, Any], Any]] = {}

    def capture(feeds: models.Feeds) -> tuple[Any, dict[str, Any], Any]:
        static = {k: torch.from_numpy(v).to("cuda") for k, v in feeds.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(3):  # warm-up outside the graph (allocator, cuBLAS handles)
                model(**static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph):
            outputs = model(**static)
        return graph, static, outputs

    def run(feeds: models.Feeds) -> list[np.ndarray]:
        key = tuple(sorted((k, v.shape) for k, v in feeds.items()))
        if key not in graphs:
            graphs[key] = capture(feeds)
        graph, static, outputs = graphs[key]
        for k, v in feeds.items():
            static[k].copy_(torch.from_numpy(v))
        graph.replay()
        return [o.float().cpu().numpy() for o in outputs]

    return run


def ort_gpu_runner(path: Path, provider: str, work: Path) -> Runner:
    """ONNX Runtime with its CUDA or TensorRT provider (fp16 for TensorRT, engine cached)."""
    import onnxruntime as ort

    options: dict[str, Any] = {}
    if provider == "TensorrtExecutionProvider":
        options = {
            "trt_fp16_enable": True,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(work / "ort-trt-cache"),
        }
    session = ort.InferenceSession(
        str(path), providers=[(provider, options), "CPUExecutionProvider"]
    )

    def run(feeds: models.Feeds) -> list[np.ndarray]:
        return list(session.run(None, feeds))

    return run


@contextlib.contextmanager
def _step(results: dict[str, Any], name: str) -> Iterator[None]:
    """Run one step; a failure is recorded with its traceback and the run goes on."""
    start = time.perf_counter()
    try:
        yield
    except Exception:
        results["errors"][name] = traceback.format_exc()[-3000:]
        print(f"[{name}] FAILED\n{results['errors'][name]}", flush=True)
    finally:
        results["step_seconds"][name] = round(time.perf_counter() - start, 1)


def run(
    bundle: Path,
    out: Path,
    *,
    seconds: float = 2.0,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    work: Path | None = None,
    peak_seconds: float = 2.0,
) -> dict[str, Any]:
    """Every backend on the same batches; writes ``bench_gpu.json`` and ``bench_gpu.md``."""
    import torch

    from training.export.onnx_export import export_ranker
    from training.models.ranker import load_scorer

    out.mkdir(parents=True, exist_ok=True)
    work = work or Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 rows are fp32, not TF32
    torch.backends.cudnn.allow_tf32 = False
    results: dict[str, Any] = {"environment": environment(), "errors": {}, "step_seconds": {}}
    results["command"] = " ".join(["python -m bench.gpu", *sys.argv[1:]])
    print(json.dumps(results["environment"], indent=1), flush=True)
    spec_d = json.loads((bundle / "spec.json").read_text())
    texts = json.loads((bundle / "texts.json").read_text())
    results["bundle"] = spec_d
    cuda = torch.cuda.is_available()
    threads = os.cpu_count() or 1

    ranker_dir = restore_ranker(bundle, work)
    spec = TokenizerSpec(
        ranker_dir / "tokenizer.json",
        spec_d["max_length"],
        spec_d["pair_max_length"],
        spec_d["multiple"],
    )
    onnx_path = work / "ranker.onnx"
    export = export_ranker(str(ranker_dir), onnx_path)  # parity vs PyTorch fp32, or raises
    results["export"] = export.as_dict()
    module = load_scorer(str(ranker_dir))
    cfg = models.bert_of(module).config
    arch = models.arch_of(module)
    results["arch"] = arch.__dict__
    results["pytorch_attention"] = str(getattr(cfg, "_attn_implementation", "?"))

    runners: dict[str, Runner] = {}
    precision: dict[str, tuple[str, str]] = {}  # name -> (device, precision) for the peak
    with _step(results, "ort-cpu"):
        variants = models.ort_variants(
            onnx_path, work / "variants", int(cfg.hidden_size), int(cfg.num_attention_heads)
        )
        results["fused_ops"] = variants["fused_ops"]
        for name, graph, prec in (
            (REFERENCE, "plain", "fp32"),
            ("ort-cpu fp32 fused", "optimized", "fp32"),
            ("ort-cpu int8", "int8", "int8"),
        ):
            runners[name] = models.ort_runner(variants[graph], threads)
            precision[name] = ("cpu", prec)
    if cuda:
        for name, half in (("pytorch-cuda fp32", False), ("pytorch-cuda fp16", True)):
            with _step(results, name):
                runners[name] = torch_cuda_runner(module, half)
                precision[name] = ("gpu", "fp16" if half else "fp32")
        with _step(results, "pytorch-cuda fp16 graphs"):
            graphs = cuda_graph_runner(module, half=True)
            probe = encode(spec.tokenizer(pairs=True), texts["users"][:2], texts["items"][:2])
            graphs(probe)  # a shape that cannot be captured fails here, not in every row
            runners["pytorch-cuda fp16 graphs"] = graphs
            precision["pytorch-cuda fp16 graphs"] = ("gpu", "fp16")
        if results["environment"]["tensorrt"]:
            with _step(results, "tensorrt fp16"):
                from training.export.gpu import Profile, build_engine, trt_runner

                start = time.perf_counter()
                engine = build_engine(
                    onnx_path,
                    work / "ranker.plan",
                    Profile(batch=(1, 64, max(batch_sizes)), sequence=(16, 64, 128)),
                )
                results["tensorrt_build_seconds"] = round(time.perf_counter() - start, 1)
                runners["tensorrt fp16"] = trt_runner(engine)
                precision["tensorrt fp16"] = ("gpu", "fp16")
        providers = results["environment"]["ort_providers"]
        for provider, name, prec in (
            ("CUDAExecutionProvider", "ort-cuda fp32", "fp32"),
            ("TensorrtExecutionProvider", "ort-tensorrt fp16", "fp16"),
        ):
            if provider in providers:
                with _step(results, name):
                    runners[name] = ort_gpu_runner(onnx_path, provider, work)
                    precision[name] = ("gpu", prec)

    with _step(results, "quality"):
        results["quality_vs_ort_cpu_fp32"] = _quality(runners, spec, texts)
    with _step(results, "peaks"):
        peaks = {f"cpu_{k}": v for k, v in models.section_peaks(threads, peak_seconds).items()}
        if cuda:
            peaks.update({f"gpu_{k}": v for k, v in gpu_peaks().items()})
        results["peaks"] = peaks
    rows = []
    tokenizer = spec.tokenizer(pairs=True)
    for size in batch_sizes:
        feeds = models.batches(
            tokenizer, texts["users"], texts["items"], size, count=max(1, min(8, 2048 // size))
        )
        for name, runner in runners.items():
            with _step(results, f"{name} b{size}"):
                device, prec = precision[name]
                warmup = len(feeds) if device == "gpu" else 1  # every shape once (autotuning)
                r = models.throughput(runner, feeds, arch, seconds, 10_000, warmup=warmup)
                peak = results.get("peaks", {}).get(f"{device}_{prec}")
                share = r["flops_per_s"] / peak if peak else float("nan")
                rows.append(
                    {
                        "backend": name,
                        "device": device,
                        "precision": prec,
                        "batch": size,
                        **r,
                        "share_of_peak": share,
                    }
                )
                print(f"{name:22s} b{size:<5d} {r['items_per_s']:10.1f} pairs/s", flush=True)
    results["rows"] = rows
    (out / "bench_gpu.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "bench_gpu.md").write_text(render(results))
    return results


def _quality(runners: dict[str, Runner], spec: TokenizerSpec, texts: dict[str, list[str]]) -> Any:
    """Probabilities of each backend against ONNX Runtime CPU fp32 on real pairs."""
    tokenizer = spec.tokenizer(pairs=True)
    feeds = [
        encode(tokenizer, *models.make_batch(u, QUALITY_ITEMS, texts["users"], texts["items"]))
        for u in range(min(QUALITY_USERS, len(texts["users"])))
    ]
    reference = [runners[REFERENCE](f)[1] for f in feeds]  # (logit, probability)
    return {
        name: models.quality(reference, [run(f)[1] for f in feeds], "ranker")
        for name, run in runners.items()
        if name != REFERENCE
    }


def report(gpu_json: Path, bench_json: Path, benchmarks_md: Path) -> Path:
    """Keep the GPU JSON beside the CPU one (``bench_gpu.json``) and re-render the
    generated part of ``BENCHMARKS.md`` with both; returns the file written
    (:func:`bench.report.write_benchmarks`)."""
    from bench.report import write_benchmarks

    keep = bench_json.with_name("bench_gpu.json")
    if gpu_json.resolve() != keep.resolve():
        shutil.copyfile(gpu_json, keep)
    return write_benchmarks(json.loads(bench_json.read_text()), bench_json, benchmarks_md)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="prepare the bundle here")
    p.add_argument("--repository", type=Path, default=REPO_ROOT / "model_repository")
    p.add_argument("--data", type=Path, default=REPO_ROOT / "third_party/movielens/ml-latest-small")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "var" / "gpu-bundle")
    r = sub.add_parser("run", help="time the backends (on the GPU machine)")
    r.add_argument("--bundle", type=Path, default=REPO_ROOT / "var" / "gpu-bundle")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--seconds", type=float, default=2.0)
    r.add_argument("--batch-sizes", type=int, nargs="+", default=list(BATCH_SIZES))
    g = sub.add_parser("report", help="keep the JSON and re-render BENCHMARKS.md")
    g.add_argument("json", type=Path)
    args = parser.parse_args(argv)
    if args.command == "pack":
        print(pack(args.repository, args.data, args.out))
    elif args.command == "run":
        results = run(args.bundle, args.out, seconds=args.seconds, batch_sizes=args.batch_sizes)
        print(render(results))
    else:
        out = REPO_ROOT / "BENCHMARKS.md"
        return 0 if report(args.json, REPO_ROOT / "reports" / "bench.json", out) == out else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
