"""Encoder and ranker throughput: PyTorch, ONNX Runtime (three graphs), OpenVINO in bf16 and
Triton.

Inputs are real texts: item texts of the catalogue for the item tower, (user behaviour text,
item text) pairs for the ranker, tokenized with the release's tokenizer exactly as Triton's
``tokenizer`` model does (truncation at 128 tokens, padding to a multiple of 16).

ONNX Runtime graphs: ``plain`` is the exported ``model.onnx`` (what Triton serves; ORT's own
graph optimisations at ORT_ENABLE_ALL apply as in ``model.py``); ``optimized`` is
``onnxruntime.transformers.optimizer.optimize_model(model_type="bert")`` (fused attention,
SkipLayerNorm, BiasGelu); ``int8`` is ``quantize_dynamic`` of the optimized graph (int8
weights, dynamically quantized uint8 activations: u8s8 VNNI kernels on this CPU).
``openvino-bf16`` is the plain graph as the served runner's ``openvino-bf16`` engine compiles
it (bf16 products, fp32 accumulation), where the CPU has bf16 instructions. Their quality
cost is measured against fp32 PyTorch on the same real texts.

FLOPs: a BERT layer over a padded sequence of ``L`` tokens costs per token ``2 x W`` for its
weight matrices (``W`` = entries of the Q, K, V, output, FFN-in and FFN-out weights) plus
``4 x L x d`` for attention (``QK^T`` and ``softmax(.)V``); embeddings, LayerNorm, GELU, softmax
and the pooler are left out. So ``FLOPs/token = 2 x W_total + 4 x layers x L x d``, counted over
padded tokens (what the hardware computes); the share of real tokens is reported beside it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.machine import _ort_matmul, quick_fp32_peak, torch_bf16
from bench.tokens import TokenizerSpec, encode
from bench.util import Bounded, load_average, precision
from bench.variants import openvino_bf16, served_runner

log = logging.getLogger(__name__)
Feeds = dict[str, np.ndarray]


# --- model arithmetic --------------------------------------------------------------------
@dataclass(frozen=True)
class Arch:
    layers: int
    hidden: int
    weight_entries: int  # entries of every encoder-layer weight matrix (+ the ranker head)

    def flops(self, feeds: Feeds) -> float:
        """FLOPs of one forward over a padded batch (see the module docstring)."""
        batch, length = feeds["input_ids"].shape
        per_token = 2 * self.weight_entries + 4 * self.layers * length * self.hidden
        return float(per_token * batch * length)


def bert_of(module: Any) -> Any:
    """The BertModel inside a served module (tower or cross-encoder)."""
    for m in module.modules():
        if hasattr(m, "encoder") and hasattr(m, "config"):
            return m
    raise TypeError(f"no BertModel inside {type(module).__name__}")


def arch_of(module: Any) -> Arch:
    """Layers, width and weight entries: encoder-layer matrices plus any head outside BERT
    (the unused BERT pooler is left out)."""
    import torch

    bert = bert_of(module)
    cfg = bert.config
    inside = {id(m) for m in bert.modules()}
    linear = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
    weights = sum(m.weight.numel() for m in bert.encoder.modules() if m in linear)
    weights += sum(m.weight.numel() for m in linear if id(m) not in inside)
    return Arch(int(cfg.num_hidden_layers), int(cfg.hidden_size), int(weights))


# --- runners -----------------------------------------------------------------------------
def torch_runner(module: Any, threads: int) -> Callable[[Feeds], list[np.ndarray]]:
    import torch

    torch.set_num_threads(threads)

    def run(feeds: Feeds) -> list[np.ndarray]:
        with torch.inference_mode():
            out = module(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        outs = out if isinstance(out, tuple) else (out,)
        return [o.numpy() for o in outs]

    return run


def ort_runner(
    path: Path, threads: int, spinning: bool = True
) -> Callable[[Feeds], list[np.ndarray]]:
    """An ONNX Runtime session as ``model.py`` configures it (spinning: ORT's default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}

    def run(feeds: Feeds) -> list[np.ndarray]:
        return list(session.run(None, {k: v for k, v in feeds.items() if k in names}))

    return run


def openvino_runner(path: Path, threads: int) -> Callable[[Feeds], list[np.ndarray]]:
    """``path`` compiled by the served runner's own ``openvino-bf16`` session."""
    session = served_runner().OpenVinoSession(path, threads)
    names = {i.get_any_name() for i in session.compiled.inputs}

    def run(feeds: Feeds) -> list[np.ndarray]:
        return list(session.run(None, {k: v for k, v in feeds.items() if k in names}))

    return run


def ort_variants(onnx_path: Path, out_dir: Path, hidden: int, heads: int) -> dict[str, Any]:
    """Write the optimized and int8 graphs of ``onnx_path``; returns paths and fusion counts."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    out_dir.mkdir(parents=True, exist_ok=True)
    optimized, int8 = out_dir / "model.opt.onnx", out_dir / "model.opt.int8-per-channel.onnx"
    fused_file = out_dir / "fused_ops.json"
    if not optimized.is_file() or not fused_file.is_file():
        model = optimize_model(
            str(onnx_path), model_type="bert", num_heads=heads, hidden_size=hidden
        )
        stats = model.get_fused_operator_statistics()
        fused_file.write_text(json.dumps({k: v for k, v in stats.items() if v}))
        model.save_model_to_file(str(optimized))
    fused = json.loads(fused_file.read_text())
    if not int8.is_file():
        quantize_dynamic(
            optimized,
            int8,
            weight_type=QuantType.QInt8,
            per_channel=True,  # per-tensor scales cost 4x more cosine (0.976 vs 0.996)
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    return {
        "plain": onnx_path,
        "optimized": optimized,
        "int8": int8,
        "fused_ops": fused,
        "sizes_mb": {
            k: round(p.stat().st_size / 2**20, 1)
            for k, p in (("plain", onnx_path), ("optimized", optimized), ("int8", int8))
        },
    }


# --- measurements ------------------------------------------------------------------------
def make_batch(
    b: int, size: int, texts: Sequence[str], documents: Sequence[str] | None
) -> tuple[list[str], list[str] | None]:
    """Batch ``b``: ``size`` item texts, or one user text with ``size`` candidate item texts
    (the gateway's shape: one user, many candidates)."""
    if documents is None:
        return [texts[(b * size + i) % len(texts)] for i in range(size)], None
    docs = [documents[(b * size + i) % len(documents)] for i in range(size)]
    return [texts[b % len(texts)]] * size, docs


def batches(
    tokenizer: Any, texts: Sequence[str], documents: Sequence[str] | None, size: int, count: int
) -> list[Feeds]:
    """``count`` consecutive batches of ``size``, tokenized as Triton does."""
    return [encode(tokenizer, *make_batch(b, size, texts, documents)) for b in range(count)]


def throughput(
    run: Callable[[Feeds], Any],
    feeds: Sequence[Feeds],
    arch: Arch,
    max_seconds: float,
    max_iters: int,
    warmup: int,
) -> dict[str, float]:
    """Items/s, achieved FLOP/s and ms per batch, cycling through ``feeds``."""
    position = [0]

    def step() -> None:
        run(feeds[position[0] % len(feeds)])
        position[0] += 1

    for _ in range(warmup):
        step()
    timer = Bounded(max_iters, max_seconds, warmup=0)
    position[0] = 0
    timer.run(step)
    done = [feeds[j % len(feeds)] for j in range(len(timer.times))]
    items = sum(f["input_ids"].shape[0] for f in done)
    flops = sum(arch.flops(f) for f in done)
    tokens = sum(f["input_ids"].size for f in done)
    real = sum(int(f["attention_mask"].sum()) for f in done)
    total = timer.total
    return {
        "batches": len(timer.times),
        "items_per_s": items / total,
        "flops_per_s": flops / total,
        "ms_per_batch": 1000 * total / len(timer.times),
        "padded_len": tokens / max(items, 1),
        "real_token_share": real / max(tokens, 1),
    }


def quality(reference: list[np.ndarray], got: list[np.ndarray], kind: str) -> dict[str, float]:
    """Encoder: cosine and max |diff| of vectors; ranker: max |diff| of probabilities and
    the rank agreement of the candidate lists (Spearman per query, top-10 overlap)."""
    if kind == "encoder":
        a, b = np.concatenate(reference), np.concatenate(got)
        cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        return {
            "min_cosine": float(cos.min()),
            "mean_cosine": float(cos.mean()),
            "max_abs_diff": float(np.abs(a - b).max()),
        }
    spearman, overlap, diffs = [], [], []
    for ref, out in zip(reference, got, strict=True):
        r, o = ref.reshape(-1), out.reshape(-1)
        diffs.append(float(np.abs(r - o).max()))
        rr, ro = np.argsort(np.argsort(-r)), np.argsort(np.argsort(-o))
        spearman.append(float(np.corrcoef(rr, ro)[0, 1]))
        overlap.append(len(set(np.argsort(-r)[:10]) & set(np.argsort(-o)[:10])) / 10)
    return {
        "max_abs_diff_prob": max(diffs),
        "mean_spearman": float(np.mean(spearman)),
        "mean_top10_overlap": float(np.mean(overlap)),
    }


def section_peaks(threads: int, seconds: float) -> dict[str, float]:
    """fp32, int8 and bf16 GEMM rates measured right now (the denominators of this section)."""
    return {
        "fp32": quick_fp32_peak(seconds, threads),
        "int8": _ort_matmul(2048, seconds, threads, integer=True),
        "bf16": torch_bf16(2048, seconds, threads),
        "load_average": load_average(),  # type: ignore[dict-item]
    }


def bench_model(
    kind: str,
    module: Any,
    onnx_path: Path,
    spec: TokenizerSpec,
    texts: Sequence[str],
    pairs: Sequence[str] | None,
    variants_dir: Path,
    batch_sizes: Sequence[int],
    max_seconds: float,
    quality_batches: list[tuple[list[str], list[str] | None]],
    threads: int = 2,
    extra_lengths: Sequence[int] = (),
) -> dict[str, Any]:
    """One model through PyTorch, the three ONNX Runtime graphs and OpenVINO in bf16."""
    cfg = bert_of(module).config
    arch = arch_of(module)
    variants = ort_variants(
        onnx_path, variants_dir, int(cfg.hidden_size), int(cfg.num_attention_heads)
    )
    tokenizer = spec.tokenizer(pairs=pairs is not None)
    runners: dict[str, Callable[[Feeds], list[np.ndarray]]] = {
        "pytorch": torch_runner(module, threads)
    }
    for name in ("plain", "optimized", "int8"):
        runners[f"ort-{name}"] = ort_runner(variants[name], threads)
    # thread setting: the served graph with ORT's worker threads blocking instead of spinning
    runners["ort-plain-nospin"] = ort_runner(variants["plain"], threads, spinning=False)
    if openvino_bf16():
        runners["openvino-bf16"] = openvino_runner(variants["plain"], threads)

    # quality against fp32 PyTorch on real inputs
    q_feeds = [encode(tokenizer, t, p) for t, p in quality_batches]
    out_index = 0 if kind == "encoder" else 1  # ranker: (logit, probability)
    reference = [runners["pytorch"](f)[out_index] for f in q_feeds]
    qual = {
        name: quality(reference, [run(f)[out_index] for f in q_feeds], kind)
        for name, run in runners.items()
        if name not in ("pytorch", "ort-plain-nospin")
    }

    peaks = section_peaks(threads, 1.0 if max_seconds < 5 else 2.0)
    rows = []
    for size in batch_sizes:
        sized = spec.tokenizer(pairs=pairs is not None, batch=size)  # as Triton pads `size`
        feeds = batches(sized, texts, pairs, size, count=max(1, min(8, 256 // size)))
        for name, run in runners.items():
            r = throughput(run, feeds, arch, max_seconds, 10_000, warmup=1 if size <= 16 else 0)
            peak = peaks[precision(name)]
            rows.append(
                {"backend": name, "batch": size, **r, "share_of_peak": r["flops_per_s"] / peak}
            )
    for length in extra_lengths:  # sequence-length what-if (e.g. the ranker's training length)
        size = max(batch_sizes)
        short = spec.tokenizer(pairs=pairs is not None, max_length=length, batch=size)
        feeds = batches(short, texts, pairs, size, count=max(1, min(8, 256 // size)))
        for name in ("pytorch", "ort-optimized", "ort-int8"):
            r = throughput(runners[name], feeds, arch, max_seconds, 10_000, warmup=0)
            peak = peaks[precision(name)]
            rows.append(
                {
                    "backend": f"{name} max_len={length}",
                    "batch": size,
                    **r,
                    "share_of_peak": r["flops_per_s"] / peak,
                }
            )
    return {
        "arch": arch.__dict__,
        "pytorch_attention": str(getattr(cfg, "_attn_implementation", "?")),
        "flops_per_token_formula": "2*W + 4*layers*L*d",
        "variants": {k: str(v) if isinstance(v, Path) else v for k, v in variants.items()},
        "quality_vs_pytorch_fp32": qual,
        "peaks": peaks,
        "rows": rows,
        "load_average_end": load_average(),
    }


# --- Triton ------------------------------------------------------------------------------
def bench_triton(
    settings: Any,
    triton_metrics_port: int,
    kind: str,
    texts: Sequence[str],
    pairs: Sequence[str] | None,
    arch: Arch,
    spec: TokenizerSpec,
    configs: Sequence[tuple[int, int]],
    max_seconds: float,
    fp32_peak: float,
) -> list[dict[str, Any]]:
    """Concurrent requests of ``batch`` texts to the ensemble so dynamic batching engages.

    FLOPs are counted on each request's own padded length (the tokenizer pads a small request
    to a multiple of 16); the backend pads merged requests to the longest, so this is a lower
    bound.
    """
    from bench import metrics

    rows = []
    for batch, concurrency in configs:
        tokenizer = spec.tokenizer(pairs=pairs is not None, batch=batch)
        before = metrics.scrape(triton_metrics_port)
        start = time.perf_counter()
        done, errors = _triton_load(settings, texts, pairs, batch, concurrency, max_seconds)
        wall = time.perf_counter() - start
        stats = metrics.triton_model_stats(
            metrics.delta(before, metrics.scrape(triton_metrics_port))
        )
        model = "item_encoder" if kind == "encoder" else "ranker"
        flops = sum(
            arch.flops(encode(tokenizer, *make_batch(i, batch, texts, pairs))) for i in done
        )
        rows.append(
            {
                "backend": "triton",
                "batch": batch,
                "concurrency": concurrency,
                "requests": len(done),
                "errors": len(errors),
                "first_error": errors[0] if errors else "",
                "items_per_s": len(done) * batch / wall,
                "flops_per_s": flops / wall,
                "share_of_peak": flops / wall / fp32_peak,
                "executed_mean_batch": stats.get(model, {}).get("mean_batch", float("nan")),
                "model_stats": stats,
                "load_average": load_average(),
            }
        )
    return rows


def _triton_load(
    settings: Any,
    texts: Sequence[str],
    documents: Sequence[str] | None,
    batch: int,
    concurrency: int,
    max_seconds: float,
) -> tuple[list[int], list[str]]:
    """``concurrency`` threads sending batches until ``max_seconds``; answered batch indices."""
    from services.inference.triton_client import TritonClient

    lock = threading.Lock()
    done: list[int] = []
    errors: list[str] = []
    stop_at = time.monotonic() + max_seconds

    def worker(offset: int) -> None:
        client = TritonClient(settings)
        try:
            i = offset
            while time.monotonic() < stop_at:
                chunk, docs = make_batch(i, batch, texts, documents)
                try:
                    if docs is None:
                        client.embed_items(chunk, 60.0)
                    else:
                        client.score(chunk[0], docs, 60.0)
                except Exception as exc:  # counted, not fatal: the table says so
                    with lock:
                        errors.append(str(exc)[:200])
                else:
                    with lock:
                        done.append(i)
                i += concurrency
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max_seconds + 120)
    return done, errors
