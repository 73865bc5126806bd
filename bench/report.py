"""``BENCHMARKS.md`` from the results of one run, and the speed targets of the issue."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from bench.gpu_report import render as render_gpu
from bench.util import fmt, precision, table

log = logging.getLogger(__name__)

THROUGHPUT_RATIO = 3.0
TAIL_RATIO = 2.5
PEAK_SHARE = 0.6
#: issue #15's serving targets, the default pipeline (feature ranker, cross-encoder off):
#: p50 and p99 at concurrency 1, QPS at 16 (the section's medians over its rounds)
SERVED_PIPELINE = "feature ranker"
SERVING_P50_MS, SERVING_P99_MS, SERVING_QPS = 20.0, 50.0, 100.0


def _best(rows: list[dict[str, Any]], pred: Any) -> dict[str, Any] | None:
    chosen = [r for r in rows if pred(r)]
    return max(chosen, key=lambda r: r["share_of_peak"]) if chosen else None


def targets(results: dict[str, Any]) -> dict[str, Any]:
    """Each target of the issue with the measured value and whether it was met."""
    out: dict[str, Any] = {}
    levels = results.get("gateway", {}).get("levels", [])
    baseline = results.get("baseline", {})
    if levels and baseline.get("qps"):
        top = max(levels, key=lambda lv: lv["concurrency"])
        ratio = top["qps_ranked"] / baseline["qps"]
        out["gateway_vs_pytorch"] = {
            "target": f">= {THROUGHPUT_RATIO}x at concurrency {top['concurrency']}",
            "measured": ratio,
            "met": ratio >= THROUGHPUT_RATIO,
        }
    for run in results.get("variants", {}).get("runs", []):
        if run.get("baseline_qps"):
            ratio = run["qps_ranked"] / run["baseline_qps"]
            out[f"gateway_vs_pytorch [{run['variant']}]"] = {
                "target": f">= {THROUGHPUT_RATIO}x at concurrency {run['concurrency']}",
                "measured": ratio,
                "met": ratio >= THROUGHPUT_RATIO,
            }
    for lv in levels:
        ratio = lv["p99_over_p50"]
        out[f"tail_c{lv['concurrency']}"] = {
            "target": f"p99 <= {TAIL_RATIO} x p50 at concurrency {lv['concurrency']}",
            "measured": ratio,
            "met": bool(ratio <= TAIL_RATIO),
        }
    from bench.pipelines import PROCESSES_PIPELINE

    for row in results.get("pipelines", {}).get("table", []):
        c = row["concurrency"]
        if row["pipeline"] == PROCESSES_PIPELINE and c >= 16:
            out[f"recommend_qps_c{c} [{PROCESSES_PIPELINE}]"] = {
                "target": f">= {SERVING_QPS:.0f} QPS at concurrency {c} ({PROCESSES_PIPELINE})",
                "measured": row["qps"],
                "met": row["qps"] >= SERVING_QPS,
            }
        if row["pipeline"] != SERVED_PIPELINE:
            continue
        if c == 1:
            for name, limit in (("p50", SERVING_P50_MS), ("p99", SERVING_P99_MS)):
                out[f"recommend_{name}_c1"] = {
                    "target": f"{name} <= {limit:.0f} ms at concurrency 1 ({SERVED_PIPELINE})",
                    "measured": row[f"{name}_ms"],
                    "met": row[f"{name}_ms"] <= limit,
                }
        elif c >= 16:
            out[f"recommend_qps_c{c}"] = {
                "target": f">= {SERVING_QPS:.0f} QPS at concurrency {c} ({SERVED_PIPELINE})",
                "measured": row["qps"],
                "met": row["qps"] >= SERVING_QPS,
            }
    from bench import indexing

    reported = indexing.target_variant(results.get("indexing", {}))
    if reported is not None:
        name, v = reported
        graphs = results["indexing"].get("item_graphs", {})
        twin = results["indexing"]["variants"].get(indexing.TWIN_JOB)
        at = name + (f", {graphs[name]}" if name in graphs else "")
        if twin is not None and indexing.TWIN_JOB in graphs:
            at += f"; {graphs[indexing.TWIN_JOB]} {fmt(twin['items_per_s'], 1)}"
        out["item_indexing"] = {
            "target": f">= {indexing.TARGET_ITEMS_PER_S:.0f} items/s (Triton + Milvus upsert)",
            "measured": v["items_per_s"],
            "at": f"{at}; file order {fmt(indexing.baseline_items_per_s(results), 1)}",
            "met": v["items_per_s"] >= indexing.TARGET_ITEMS_PER_S,
        }
    for model in ("encoder", "ranker"):
        rows = results.get(model, {}).get("rows", [])
        if not rows:
            continue
        largest = max(r["batch"] for r in rows)
        served = _best(rows, lambda r, b=largest: r["backend"] == "ort-plain" and r["batch"] == b)
        by_precision = {
            p: _best(rows, lambda r, p=p: precision(r["backend"]) == p)
            for p in ("fp32", "int8", "bf16")
        }
        best = {"best_fp32": by_precision["fp32"], **{p: by_precision[p] for p in ("int8", "bf16")}}
        for name, row in (("served_graph", served), *best.items()):
            if row is None:
                continue
            out[f"{model}_{name}"] = {
                "target": f">= {PEAK_SHARE:.0%} of the measured "
                f"{precision(row['backend'])} GEMM rate",
                "measured": row["share_of_peak"],
                "at": f"{row['backend']} batch {row['batch']}",
                "met": row["share_of_peak"] >= PEAK_SHARE,
            }
    return out


def _gflops(x: float) -> str:
    return fmt(x / 1e9, 1)


#: where a run's report goes in ``BENCHMARKS.md``: between these lines; the sections written
#: below them (single measurements with their conditions) are kept by every run
GENERATED_BEGIN = "<!-- generated by `make bench` (python -m bench): each run replaces it -->"
GENERATED_END = "<!-- end of the generated part: what follows is kept by every run -->"


def splice(existing: str | None, generated: str) -> str:
    """The report file with ``generated`` in place of its generated part (between
    :data:`GENERATED_BEGIN` and :data:`GENERATED_END`), everything else as it was; the
    whole file when there is none yet. A file without the two lines raises ValueError:
    overwriting it would lose what was written there."""
    block = f"{GENERATED_BEGIN}\n{generated.rstrip()}\n{GENERATED_END}\n"
    if existing is None:
        return block
    head, begin, rest = existing.partition(GENERATED_BEGIN)
    _, end, tail = rest.partition(GENERATED_END)
    if not begin or not end:
        raise ValueError(
            f"the file has no generated part (the lines {GENERATED_BEGIN!r} and "
            f"{GENERATED_END!r}); not overwritten"
        )
    return head + block + tail.removeprefix("\n")


def write_benchmarks(results: dict[str, Any], json_path: Path, out: Path) -> Path:
    """Render ``results`` (raw numbers in ``json_path``; the GPU section from the
    ``bench_gpu.json`` beside it when a lent GPU left one) into ``out``'s generated part
    (:func:`splice`). Returns the file written: ``out``, or where ``out`` has no generated
    part to replace, ``<out>.generated.md`` beside it (``out`` is left as it is)."""
    gpu_json = json_path.with_name("bench_gpu.json")
    gpu = render_gpu(json.loads(gpu_json.read_text())) if gpu_json.is_file() else None
    generated = render(results, json_path, gpu_section=gpu)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        out.write_text(splice(out.read_text() if out.is_file() else None, generated))
    except ValueError as exc:
        kept = out.with_suffix(".generated.md")
        kept.write_text(generated)
        log.error("%s: %s; this run's report is in %s", out, exc, kept)
        return kept
    return out


def render(results: dict[str, Any], json_path: Path, gpu_section: str | None = None) -> str:
    """``BENCHMARKS.md``: this machine's sections, then the GPU section (already rendered by
    :func:`bench.gpu_report.render`) when one was run."""
    m = results.get("machine", {})
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `{m.get('command', 'python -m bench')}` on {m.get('date', '?')}; "
        f"raw numbers in `{json_path.name}`.",
        "",
        table(
            ["machine", ""],
            [
                ["CPU", m.get("cpu_model", "?")],
                [
                    "cores (threads used)",
                    f"{m.get('cpus')} ({results.get('gemm_peak', {}).get('threads', '?')})",
                ],
                ["AVX-512 / VNNI", f"{m.get('avx512')} / {m.get('vnni')}"],
                ["SIMD flags", " ".join(m.get("simd_flags", []))],
                ["memory", f"{m.get('memory_gib')} GiB"],
                [
                    "software",
                    f"Python {m.get('python')}, torch {m.get('torch')}, "
                    f"onnxruntime {m.get('onnxruntime')}, numpy {m.get('numpy')}",
                ],
                ["load average at start (1/5/15 min)", m.get("load_average")],
                ["models", results.get("setup", {}).get("models", {}).get("source", "?")],
                ["Milvus", _MILVUS_SERVERS.get(results.get("setup", {}).get("milvus", "lite"))],
            ],
        ),
        "",
        "The machine is shared: every section records the load average around it, and each "
        "model section measures its own GEMM peak right before it.",
    ]
    lines += _targets(results) + _gemm(results) + _pipelines(results) + _gateway(results)
    lines += _models(results)
    lines += _variants(results) + _triton(results) + _perf(results) + _milvus(results)
    lines += _indexing(results)
    lines += _errors(results)
    if gpu_section is not None:
        lines += ["", gpu_section]
    return "\n".join(lines) + "\n"


def _pipelines(results: dict[str, Any]) -> list[str]:
    from bench import pipelines

    section = results.get("pipelines", {})
    out = ["", "## `Recommend`: feature ranker against the cross-encoder pipeline", ""]
    if "table" not in section:
        return [*out, f"not measured: {section.get('error', 'section missing')}"]
    first = pipelines.__doc__ or ""
    return [*out, first.split("\n\n")[1].strip(), "", pipelines.render(section)]


def _targets(results: dict[str, Any]) -> list[str]:
    t = results.get("targets", {})
    rows = [
        [
            name,
            v["target"],
            fmt(v["measured"], 2) + (f" ({v['at']})" if "at" in v else ""),
            "met" if v["met"] else "**missed**",
        ]
        for name, v in t.items()
        if isinstance(v, dict) and "target" in v
    ]
    return ["", "## Targets", "", table(["target", "wanted", "measured", ""], rows)]


def _gemm(results: dict[str, Any]) -> list[str]:
    g = results.get("gemm_peak", {})
    if "rates" not in g:
        return []
    sizes = g.get("sizes", {})
    rows = [
        [
            k if sizes.get(k, g["n"]) == g["n"] else f"{k} (at {sizes[k]}: a fallback loop)",
            _gflops(v) if v else "not available",
        ]
        for k, v in g["rates"].items()
    ]
    return [
        "",
        f"## Matrix-multiply peak ({g['n']}x{g['n']}, {g['threads']} threads, "
        f"{g['seconds_each']} s each)",
        "",
        table(["GEMM", "GFLOP/s (int8: GOP/s)"], rows),
        "",
        f"fp32 peak used: {_gflops(g['fp32'])} GFLOP/s; int8 peak: "
        f"{_gflops(g['int8']) if g.get('int8') else 'not measured'} GOP/s. "
        f"Load average before/after: {g['load_average']}.",
    ]


def _q(d: dict[str, float], digits: int = 0) -> str:
    """p50/p95/p99; a histogram quantile past the last bucket bound shows as ``>bound``."""
    out = []
    for k in ("p50", "p95", "p99"):
        v = d.get(k, float("nan"))
        out.append(
            f">{fmt(d.get('last_bound', float('nan')), 0)}" if v == float("inf") else fmt(v, digits)
        )
    return "/".join(out)


def _gateway(results: dict[str, Any]) -> list[str]:
    gw, base = results.get("gateway", {}), results.get("baseline", {})
    out = ["", "## Gateway `Recommend` on loopback", ""]
    if "levels" not in gw:
        return [*out, f"not measured: {gw.get('error', '?')}"]
    out += [
        f"Closed loop, each client thread its own channel, deadline {gw['deadline_s']:.0f} s, "
        "k=10, known users round robin. Latency quantiles are of ranked (not degraded) "
        "answers, client side; stage quantiles come from the gateway's "
        "`recsys_stage_seconds` histogram (interpolated within its buckets, so coarse); "
        "Triton columns are per-request means from Triton's own counters. Calls the gateway "
        "sheds at once (more than `RECSYS_MAX_IN_FLIGHT` in flight) show as "
        "RESOURCE_EXHAUSTED and do not count as requests; client threads back off 50 ms.",
        "",
    ]
    rows = []
    for lv in gw["levels"]:
        tr = lv["triton"].get("ranker", {})
        rows.append(
            [
                lv["concurrency"],
                f"{lv['ranked']}/{lv['requests']}",
                ", ".join(f"{k} {v}" for k, v in lv["codes"].items() if k != "OK") or "-",
                fmt(lv["qps_ranked"], 2),
                _q(lv["latency_ms"]),
                fmt(lv["p99_over_p50"], 2),
                _q(lv["stages_ms"].get("profile", {})),
                _q(lv["stages_ms"].get("retrieval", {})),
                _q(lv["stages_ms"].get("ranking", {})),
                f"{fmt(tr.get('mean_queue_ms', float('nan')), 0)} / "
                f"{fmt(tr.get('mean_compute_ms', float('nan')), 0)} / "
                f"{fmt(tr.get('mean_batch', float('nan')), 0)}",
                lv["load_average"][0][0],
            ]
        )
    out.append(
        table(
            [
                "conc.",
                "ranked/sent",
                "other codes",
                "QPS",
                "p50/p95/p99 ms",
                "p99/p50",
                "profile ms",
                "retrieval ms",
                "ranking ms",
                "Triton ranker queue/compute ms, batch",
                "load",
            ],
            rows,
        )
    )
    if "qps" in base:
        attention = results.get("ranker", {}).get("pytorch_attention", "?")
        omp = results.get("setup", {}).get("omp_wait_policy", "?")
        out += [
            "",
            "### The same pipeline in-process on PyTorch",
            "",
            "The gateway's `Pipeline` in the benchmark process (same Milvus, retrieval, "
            "candidates and MMR), its CTR scorer replaced by the ranker in PyTorch "
            f"(fp32, loaded as the export loads it, {attention} attention, 2 threads, "
            f"OMP_WAIT_POLICY {omp}), one request at a time, no "
            "batching across requests, no Triton; tokenized like Triton's tokenizer. "
            f"Same top-10 as the gateway for {base['same_top_k_as_gateway']} users checked.",
            "",
            table(
                [
                    "requests",
                    "QPS",
                    "p50/p95/p99 ms",
                    "profile ms",
                    "retrieval ms",
                    "ranking ms",
                    "load",
                ],
                [
                    [
                        base["requests"],
                        fmt(base["qps"], 2),
                        _q(base["latency_ms"]),
                        _q(base["stages_ms"]["profile"]),
                        _q(base["stages_ms"]["retrieval"]),
                        _q(base["stages_ms"]["ranking"]),
                        base["load_average"][0][0],
                    ]
                ],
            ),
        ]
        t = results.get("targets", {}).get("gateway_vs_pytorch")
        if t:
            rounds = ", ".join(
                f"{x['gateway_qps']:.2f}/{x['baseline_qps']:.2f} = {x['ratio']:.2f}x"
                for x in base.get("rounds", [])
            )
            out += [
                "",
                f"Gateway at the highest concurrency / in-process PyTorch: "
                f"**{t['measured']:.2f}x**, from alternating windows of the two "
                f"(gateway/PyTorch QPS per round: {rounds}).",
            ]
    return out


def _variants(results: dict[str, Any]) -> list[str]:
    v = results.get("variants", {})
    out = ["", "## Serving experiments (gateway, highest concurrency, changed release copy)", ""]
    if "runs" not in v:
        return [*out, f"not run: {v.get('skipped', v.get('error', '?'))}"]
    rows = []
    for run in v["runs"]:
        base = run.get("baseline_qps") or float("nan")
        tr = run["triton"].get("ranker", {})
        rows.append(
            [
                run["variant"],
                run["concurrency"],
                f"{run['ranked']}/{run['requests']}",
                fmt(run["qps_ranked"], 2),
                fmt(run["qps_ranked"] / base, 2),
                _q(run["latency_ms"]),
                fmt(run["p99_over_p50"], 2),
                f"{fmt(tr.get('mean_queue_ms', float('nan')), 0)} / "
                f"{fmt(tr.get('mean_compute_ms', float('nan')), 0)} / "
                f"{fmt(tr.get('mean_batch', float('nan')), 0)}",
                run["load_average"][0][0],
            ]
        )
    return [
        *out,
        "Triton restarted on a hard-linked copy of the release with the ranker's `onnx_file` "
        "pointed at the int8 graph (`quantize_dynamic` of the optimized graph, per-channel "
        "weight scales; quality cost in the ranker section). Gateway windows alternate with "
        "windows of the unchanged in-process fp32 PyTorch baseline; `x PyTorch` is against "
        "those windows.",
        "",
        table(
            [
                "variant",
                "conc.",
                "ranked/sent",
                "QPS",
                "x PyTorch",
                "p50/p95/p99 ms",
                "p99/p50",
                "Triton ranker queue/compute ms, batch",
                "load",
            ],
            rows,
        ),
    ]


def _model_rows(rows: list[dict[str, Any]]) -> list[list[Any]]:
    return [
        [
            r["backend"],
            r["batch"],
            fmt(r["items_per_s"], 1),
            fmt(r["ms_per_batch"], 0),
            fmt(r["padded_len"], 0),
            f"{r['real_token_share']:.0%}",
            _gflops(r["flops_per_s"]),
            f"{r['share_of_peak']:.0%}",
        ]
        for r in rows
    ]


def _models(results: dict[str, Any]) -> list[str]:
    out = []
    for model, unit in (("encoder", "items/s"), ("ranker", "pairs/s")):
        res = results.get(model, {})
        out += ["", f"## {'Item encoder' if model == 'encoder' else 'CTR ranker'} throughput", ""]
        if "rows" not in res:
            out.append(f"not measured: {res.get('error', '?')}")
            continue
        a, p = res["arch"], res["peaks"]
        out += [
            f"FLOPs/token = 2 x W + 4 x layers x L x d with W = {a['weight_entries']:,} weight "
            f"entries, {a['layers']} layers, d = {a['hidden']}, L = padded length. Peaks "
            f"measured right before: fp32 {_gflops(p['fp32'])} GFLOP/s, int8 "
            f"{_gflops(p['int8'])} GOP/s, bf16 {_gflops(p['bf16']) if 'bf16' in p else '?'} "
            f"GFLOP/s (load {p['load_average'][0]}); int8 and bf16 rows are "
            "compared with their own peak. `-nospin`: ORT worker threads block instead of "
            "spinning (`session.intra_op.allow_spinning=0`). On this shared machine a share "
            "above 100 % means the load dropped between the peak and the row.",
            "",
            table(
                [
                    "backend",
                    "batch",
                    unit,
                    "ms/batch",
                    "padded len",
                    "real tokens",
                    "GFLOP/s",
                    "of peak",
                ],
                _model_rows(res["rows"]),
            ),
            "",
            "Quality against fp32 PyTorch on real texts:",
            "",
        ]
        q = res["quality_vs_pytorch_fp32"]
        if model == "encoder":
            out.append(
                table(
                    ["graph", "min cosine", "mean cosine", "max abs diff"],
                    [
                        [
                            k,
                            f"{v['min_cosine']:.6f}",
                            f"{v['mean_cosine']:.6f}",
                            f"{v['max_abs_diff']:.2e}",
                        ]
                        for k, v in q.items()
                    ],
                )
            )
        else:
            out.append(
                table(
                    ["graph", "max abs diff (prob.)", "mean Spearman", "top-10 overlap"],
                    [
                        [
                            k,
                            f"{v['max_abs_diff_prob']:.2e}",
                            f"{v['mean_spearman']:.4f}",
                            f"{v['mean_top10_overlap']:.2f}",
                        ]
                        for k, v in q.items()
                    ],
                )
            )
        v = res["variants"]
        out += [
            "",
            f"Graphs: fused by the transformer optimizer: {v.get('fused_ops') or 'cached'}; "
            f"sizes MB {v['sizes_mb']}.",
        ]
    return out


def _triton(results: dict[str, Any]) -> list[str]:
    t = results.get("triton_models", {})
    out = ["", "## Triton (ensembles: tokenizer + ONNX Runtime in the python backend)", ""]
    if "encoder" not in t:
        return [*out, f"not measured: {t.get('error', '?')}"]
    out += [
        "Concurrent clients each sending `batch` texts (ranker: one user text with `batch` "
        "candidates); the dynamic batcher merges requests (`executed batch` = Triton's mean). "
        f"fp32 peak measured right before: {_gflops(t['fp32_peak'])} GFLOP/s. FLOPs are "
        "counted on each request's own padded length (a lower bound).",
        "",
    ]
    rows = [
        [
            model,
            r["batch"],
            r["concurrency"],
            r["requests"],
            r["errors"],
            fmt(r["items_per_s"], 1),
            fmt(r["executed_mean_batch"], 1),
            _gflops(r["flops_per_s"]),
            f"{r['share_of_peak']:.0%}",
            r["load_average"][0],
        ]
        for model in ("encoder", "ranker")
        for r in t[model]
    ]
    out.append(
        table(
            [
                "model",
                "batch",
                "conc.",
                "requests",
                "errors",
                "items/s",
                "executed batch",
                "GFLOP/s",
                "of fp32 peak",
                "load",
            ],
            rows,
        )
    )
    return out


def _perf(results: dict[str, Any]) -> list[str]:
    p = results.get("perf_analyzer", {})
    out = ["", "## perf_analyzer", ""]
    if not p.get("obtainable"):
        return [*out, f"Not obtainable: {p.get('why', p.get('error', '?'))}. {p.get('how', '')}"]
    rows = [
        [
            r["model"],
            r["concurrency"],
            fmt(r.get("infer_per_s", float("nan")), 1),
            "/".join(fmt(r.get(k, float("nan")), 0) for k in ("p50_ms", "p95_ms", "p99_ms")),
            fmt(r.get("server_queue_ms", float("nan")), 0),
            fmt(r.get("server_compute_ms", float("nan")), 0),
            r.get("error", "")[:80],
        ]
        for r in p["results"]
    ]
    return [
        *out,
        f"`{p['binary']}`, batch size 1, measurement interval {p['measurement_interval_ms']} ms, "
        "real item texts / (user, item) pairs as input data.",
        "",
        table(
            [
                "model",
                "conc.",
                "infer/s",
                "p50/p95/p99 ms",
                "server queue ms",
                "server compute ms",
                "error",
            ],
            rows,
        ),
    ]


#: the stack's Milvus by ``setup.milvus`` (runs before 2026-12-05 record none: Lite)
_MILVUS_SERVERS = {"engine": "the Milvus engine 2.3.5 standalone", "lite": "Milvus Lite server"}


def _milvus(results: dict[str, Any]) -> list[str]:
    mv = results.get("milvus", {})
    server = _MILVUS_SERVERS.get(results.get("setup", {}).get("milvus", "lite"), "?")
    out = ["", f"## Milvus ({server}, HNSW)", ""]
    if "runs" not in mv:
        return [*out, f"not measured: {mv.get('error', '?')}"]
    rows = [
        [
            r["ef"],
            f"{r['mode']} ({r['queries']})",
            f"{r['recall_at_k']:.3f}",
            f"{r['min_recall']:.1f}",
            _q(r["latency_ms"], 1),
        ]
        for r in mv["runs"]
    ]
    return [
        *out,
        f"Up to {mv['queries']} user vectors against {mv['items']} items, index {mv['index']}, "
        f"served ef = {mv['default_ef']}, one query per call, every configuration per user in "
        "turn (3 warm-up users not timed). Exact = NumPy inner product over every item vector; "
        "`gateway` excludes the user's history with the gateway's filter; `bounded` is the "
        "plain search at Bounded instead of Strong consistency. "
        f"Load average before/after: {mv['load_average']}.",
        "",
        table(["ef", "mode (queries)", "recall@10", "min recall", "latency p50/p95/p99 ms"], rows),
    ]


def _indexing(results: dict[str, Any]) -> list[str]:
    from bench import indexing

    section = results.get("indexing", {})
    out = ["", "## Item indexing: length-bucketed against file-order batches", ""]
    if "rounds" not in section or indexing.target_variant(section) is None:
        return [*out, f"not measured: {section.get('error', 'section missing')}"]
    return [
        *out,
        indexing.describe(),
        "",
        f"{section['items']} items, batches of {section['batch']}, "
        f"rows built in {section.get('row_build_seconds', '?')} s (not counted). "
        + indexing.ceiling(section),
        "",
        indexing.render(section),
    ]


def _errors(results: dict[str, Any]) -> list[str]:
    failed = {k: v["error"] for k, v in results.items() if isinstance(v, dict) and "error" in v}
    if not failed:
        return []
    return ["", "## Sections that failed", ""] + [f"- {k}: `{v[:300]}`" for k, v in failed.items()]
