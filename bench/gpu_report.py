"""The GPU section of ``BENCHMARKS.md``, rendered from what ``python -m bench.gpu run`` left on
a lent machine; read by the run itself and by :mod:`bench.report`."""

from __future__ import annotations

from typing import Any

import numpy as np

from bench.util import fmt, table

#: the backend every other one is compared with
REFERENCE = "ort-cpu fp32"
QUALITY_USERS, QUALITY_ITEMS = 8, 30  # the output check: the gateway's shape, 30 candidates


def render(results: dict[str, Any]) -> str:
    """The GPU section of ``BENCHMARKS.md``."""
    env = results.get("environment", {})
    peaks = results.get("peaks", {})
    lines = [
        f"## GPU: the ranker on {env.get('gpu') or 'no GPU'} against ONNX Runtime on the CPU",
        "",
        f"Run by `{results.get('command', 'python -m bench.gpu run')}` on {env.get('date')} on "
        f"a lent machine: {env.get('gpu')} ({env.get('nvidia_smi', '')}), host CPU "
        f"{env.get('host_cpu')} with {env.get('cpus')} cores (all used by ONNX Runtime). "
        f"torch {env.get('torch')} (CUDA {env.get('cuda')}), onnxruntime "
        f"{env.get('onnxruntime')} (providers: {', '.join(env.get('ort_providers', []))}), "
        f"TensorRT: {env.get('tensorrt') or 'not installed on that machine'}. Same trained "
        "ranker as above (weights carried as fp16 and widened back to fp32, re-exported "
        "there; the export's parity check passed at "
        f"{results.get('export', {}).get('max_abs_diff', float('nan')):.1e}), same tokenizer "
        "settings, real (user, item) pairs; pairs/s include copies to and from the GPU.",
        "",
        "Measured peaks: "
        + ", ".join(f"{k} {v / 1e12:.2f} TFLOP/s" for k, v in peaks.items() if isinstance(v, float))
        + ".",
        "",
    ]
    rows = results.get("rows", [])
    base = {r["batch"]: r["items_per_s"] for r in rows if r["backend"] == REFERENCE}
    lines.append(
        table(
            ["backend", "batch", "pairs/s", "ms/batch", f"x {REFERENCE}", "TFLOP/s", "of peak"],
            [
                [
                    r["backend"],
                    r["batch"],
                    fmt(r["items_per_s"]),
                    fmt(r["ms_per_batch"], 2),
                    fmt(r["items_per_s"] / base[r["batch"]], 2) if r["batch"] in base else "-",
                    fmt(r["flops_per_s"] / 1e12, 2),
                    f"{100 * r['share_of_peak']:.0f}%" if np.isfinite(r["share_of_peak"]) else "-",
                ]
                for r in rows
            ],
        )
    )
    best = _best_per_device(rows)
    if best:
        lines += ["", "Best GPU backend against the best CPU backend at each batch size: "]
        lines[-1] += (
            "; ".join(
                f"{b}: {g['items_per_s'] / c['items_per_s']:.0f}x "
                f"({g['backend']} vs {c['backend']})"
                for b, (c, g) in best.items()
            )
            + "."
        )
    if not env.get("tensorrt"):
        lines += [
            "",
            "TensorRT was not importable there, so no TensorRT row exists: its Python wheels "
            "are fetched from NVIDIA's own index at install time and ONNX Runtime's GPU build "
            "is 243 MB, neither of which a lent machine (no network, 64 MiB carried) can take. "
            "The CUDA-graph rows remove what a compiled engine removes first (per-kernel "
            "launch cost); an engine would also fuse kernels, which graphs do not.",
        ]
    quality = results.get("quality_vs_ort_cpu_fp32", {})
    if quality:
        lines += [
            "",
            f"Output against {REFERENCE} on {QUALITY_USERS} users x {QUALITY_ITEMS} candidates:",
            "",
            table(
                ["backend", "max abs diff of probability", "mean Spearman", "top-10 overlap"],
                [
                    [
                        name,
                        f"{q['max_abs_diff_prob']:.1e}",
                        f"{q['mean_spearman']:.4f}",
                        f"{q['mean_top10_overlap']:.3f}",
                    ]
                    for name, q in quality.items()
                ],
            ),
        ]
    if results.get("errors"):
        lines += ["", "Steps that failed there (tracebacks in the JSON):", ""]
        lines += [
            f"- `{name}`: {text.strip().splitlines()[-1][:300]}"
            for name, text in results["errors"].items()
        ]
    return "\n".join(lines) + "\n"


def _best_per_device(rows: list[dict[str, Any]]) -> dict[int, tuple[dict, dict]]:
    """batch -> (fastest CPU row, fastest GPU row), for batches that have both."""
    best: dict[int, dict[str, dict[str, Any]]] = {}
    for r in rows:
        slot = best.setdefault(r["batch"], {})
        if r["device"] not in slot or r["items_per_s"] > slot[r["device"]]["items_per_s"]:
            slot[r["device"]] = r
    return {b: (d["cpu"], d["gpu"]) for b, d in sorted(best.items()) if {"cpu", "gpu"} <= set(d)}
