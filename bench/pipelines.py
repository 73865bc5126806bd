"""``Recommend`` side by side: the default pipeline against the cross-encoder pipeline it
replaced, on one stack, the same users, in one run.

- **feature ranker** (the default): a hundred candidates, the DCN-v2 feature ranker on Triton
  (one batched request), the BERT cross-encoder off;
- **cross-encoder** (before): thirty candidates, each scored by the BERT cross-encoder on
  Triton (a BERT pass per candidate), no feature ranker.

The gateway process is restarted with each configuration and driven closed-loop at
concurrency 1 (latency) and 16 (throughput); the order alternates per round so drift on a
shared machine hits both. Only answers that were ranked and not degraded count.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import gateway
from ops.stack import LocalStack

PIPELINES: dict[str, dict[str, object]] = {
    "feature ranker": {"rank_candidates": 100, "cross_encoder_top": 0},
    "cross-encoder": {
        "rank_candidates": 30,
        "cross_encoder_top": 30,
        "triton_feature_ranker_model": "no_feature_ranker",  # never ready: not deployed
    },
}
BASELINE = "cross-encoder"


def compare(
    stack: LocalStack,
    users: Sequence[str],
    levels: Sequence[tuple[int, int, float]],
    rounds: int,
    deadline_s: float,
) -> dict[str, Any]:
    """Per pipeline and concurrency: the summaries of every round; then the ratios of the
    medians (ours over the baseline) for QPS, p50 and p99."""
    defaults = {key: getattr(stack.settings, key) for p in PIPELINES.values() for key in p}
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {
        name: {c: [] for c, _, _ in levels} for name in PIPELINES
    }
    try:
        for r in range(rounds):
            names = list(PIPELINES) if r % 2 == 0 else list(reversed(PIPELINES))
            for name in names:
                stack.restart_gateway(**PIPELINES[name])
                gateway.run_load(stack, users, 1, 3, 30.0, deadline_s)  # warm-up
                for concurrency, max_requests, max_seconds in levels:
                    result = gateway.run_load(
                        stack, users, concurrency, max_requests, max_seconds, deadline_s
                    )
                    s = result.summary()
                    runs[name][concurrency].append(s)
                    lat = s["latency_ms"]
                    print(
                        f"  {name:>15} c={concurrency:<3} {s['qps_ranked']:7.1f} ranked/s "
                        f"p50 {lat['p50']:7.1f} ms p99 {lat['p99']:7.1f} ms "
                        f"codes {s['codes']} degraded {s['degraded']}",
                        flush=True,
                    )
    finally:
        stack.restart_gateway(**defaults)
    return {"pipelines": PIPELINES, "runs": runs, "table": table(runs)}


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else float("nan")


def table(runs: dict[str, dict[int, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """One row per (pipeline, concurrency): medians over rounds, and ours / baseline."""
    rows = []
    for name, levels in runs.items():
        for concurrency, summaries in levels.items():
            rows.append(
                {
                    "pipeline": name,
                    "concurrency": concurrency,
                    "requests": sum(s["requests"] for s in summaries),
                    "ranked": sum(s["ranked"] for s in summaries),
                    "qps": _median([s["qps_ranked"] for s in summaries]),
                    "p50_ms": _median([s["latency_ms"]["p50"] for s in summaries]),
                    "p99_ms": _median([s["latency_ms"]["p99"] for s in summaries]),
                }
            )
    base = {r["concurrency"]: r for r in rows if r["pipeline"] == BASELINE}
    for row in rows:
        b = base.get(row["concurrency"])
        row["qps_ratio"] = row["qps"] / b["qps"] if b and b["qps"] else float("nan")
        row["p50_ratio"] = row["p50_ms"] / b["p50_ms"] if b and b["p50_ms"] else float("nan")
    return rows


def render(section: dict[str, Any]) -> str:
    """The Markdown table of :func:`table`'s rows."""
    lines = [
        "| pipeline | concurrency | ranked / requests | QPS | p50 ms | p99 ms | QPS vs "
        f"{BASELINE} | p50 vs {BASELINE} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in section["table"]:
        lines.append(
            f"| {r['pipeline']} | {r['concurrency']} | {r['ranked']} / {r['requests']} | "
            f"{r['qps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
            f"{r['qps_ratio']:.2f}x | {r['p50_ratio']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.pipelines``: this section alone, on its own stack (as ``make bench``
    builds it: the release of ``--checkpoint``, a MovieLens slice indexed through Triton)."""
    import argparse
    import json
    import os

    from bench import stack as bench_stack
    from core.config import REPO_ROOT, Settings

    parser = argparse.ArgumentParser(prog="python -m bench.pipelines", description=__doc__)
    parser.add_argument("--checkpoint", type=Path, default=REPO_ROOT / "runs" / "local" / "final")
    parser.add_argument("--cache-dir", type=Path, default=REPO_ROOT / "var" / "bench")
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--milvus",
        choices=("lite", "engine"),
        default=Settings().milvus_server,
        help="the Milvus Lite server, or the real engine (make milvus-engine); "
        "default RECSYS_MILVUS_SERVER, else lite",
    )
    parser.add_argument(
        "--json",
        type=Path,
        help="default reports/bench_pipelines.json, or bench_pipelines_engine.json on the engine",
    )
    args = parser.parse_args(argv)
    suffix = "_engine" if args.milvus == "engine" else ""
    args.json = args.json or REPO_ROOT / "reports" / f"bench_pipelines{suffix}.json"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    models = bench_stack.resolve_models(args.checkpoint, args.cache_dir)
    repository, _ = bench_stack.exported_repository(models, args.cache_dir)
    data_dir = bench_stack.dataset_slice(args.items, 0, args.cache_dir)
    state = args.cache_dir / f"pipelines-{os.getpid()}"
    with bench_stack.running_stack(repository, data_dir, state, milvus=args.milvus) as running:
        users = gateway.known_users(running.settings, 200)
        section = compare(running, users, ((1, 200, 30.0), (16, 1000, 30.0)), args.rounds, 180.0)
    section["models"] = models.source
    section["milvus"] = args.milvus
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(section, indent=2, default=str) + "\n")
    print(render(section))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
