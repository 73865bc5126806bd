"""``Recommend`` side by side: the default pipeline against the cross-encoder pipeline it
replaced, on one stack, the same users, in one run.

- **feature ranker** (the default): a hundred candidates, the DCN-v2 feature ranker on Triton
  (one batched request), the BERT cross-encoder off;
- **cross-encoder** (before): thirty candidates, each scored by the BERT cross-encoder on
  Triton (a BERT pass per candidate), no feature ranker;
- **feature ranker, 2 gateway processes**: the default pipeline with
  ``RECSYS_GATEWAY_PROCESSES=2`` (what the Kubernetes deployment runs per pod).

The gateway process is restarted with each configuration and driven closed-loop at
concurrency 1 (latency) and 16 (throughput); the order alternates per round so drift on a
shared machine hits both. Only answers that were ranked and not degraded count.

``--compare milvus``: the Milvus time inside ``Recommend`` (the gateway's
``recsys_milvus_seconds``: the summed wall time of a request's vector-store calls) with the
gateway's item and profile caches (the default: the ANN returns ids, item rows come from the
cache, a profile the event log vouches for too), with the item cache alone, and with neither
(every request reads its profile, item rows and vectors from Milvus), same stack, same
users, at concurrency 1, alternating per round. Each configuration is driven twice over the
same users: their first ``Recommend`` since the gateway started, then their next one (a
returning user with no event in between: the next page, a refresh).

``--compare releases`` (``make bench-releases``): what each release ``make train`` chooses
between costs a ``Recommend`` (:mod:`training.release_choice`): the retrieval order, the
feature ranker, each without and with the sequence model (a Triton request each: the
ranker's batched pass over the candidates; the sequence model's best items and every
candidate's score), on the same stack, the same users, alternating per round.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import gateway, metrics
from bench.util import load_average
from ops.stack import LocalStack
from training.release_choice import RELEASES

FEATURE_RANKER: dict[str, object] = {"rank_candidates": 100, "cross_encoder_top": 0}
# A model name Triton does not have is never ready: the gateway serves as a release without
# that model does (no ranking: the fused retrieval order; no sequence source, its two ranker
# features at their fill).
NO_FEATURE_RANKER: dict[str, object] = {"triton_feature_ranker_model": "no_feature_ranker"}
NO_SEQUENCE_MODEL: dict[str, object] = {"triton_sequence_model": "no_sequence_model"}
#: The default pipeline on two gateway processes sharing the port (``gateway_processes``:
#: one Python process serves about one core; the load's 16 connections spread over both).
PROCESSES_PIPELINE = "feature ranker, 2 gateway processes"
PIPELINES: dict[str, dict[str, object]] = {
    "feature ranker": FEATURE_RANKER,
    PROCESSES_PIPELINE: {**FEATURE_RANKER, "gateway_processes": 2},
    "cross-encoder": {
        "rank_candidates": 30,
        "cross_encoder_top": 30,
        **NO_FEATURE_RANKER,
    },
}
BASELINE = "cross-encoder"

# ``--compare releases``: each release make train chooses between, as the default pipeline
# without the models it leaves out
RELEASE_PIPELINES: dict[str, dict[str, object]] = {
    release.name: {
        **FEATURE_RANKER,
        **({} if release.ranker else NO_FEATURE_RANKER),
        **({} if release.sequence else NO_SEQUENCE_MODEL),
    }
    for release in RELEASES
}
RELEASE_BASELINE = RELEASES[0].name  # the retrieval order: no model beyond the towers
# Triton models whose requests per Recommend each row reports: what shows that a pipeline
# ran as named (the served default names)
CHECKED_MODELS = ("feature_ranker", "sequence_recommender")

# The Milvus-time comparison: settings of the gateway process (RECSYS_* in its environment).
ITEM_CACHE, USER_CACHE = "RECSYS_MILVUS_ITEM_CACHE_SIZE", "RECSYS_MILVUS_USER_CACHE_SIZE"
MILVUS_CONFIGS: dict[str, dict[str, str]] = {
    "item + profile cache": {ITEM_CACHE: "10000", USER_CACHE: "10000"},
    "item cache": {ITEM_CACHE: "10000", USER_CACHE: "0"},
    "no cache": {ITEM_CACHE: "0", USER_CACHE: "0"},
}
MILVUS_BASELINE = "no cache"
# Each user's first Recommend since the gateway started, then their next one.
VISITS = ("first", "again")
# The store methods a Recommend calls (the gateway's recsys_milvus_seconds{call=...}).
MILVUS_CALLS = ("get_user", "get_items", "search_items", "get_segment")


def compare(
    stack: LocalStack,
    users: Sequence[str],
    levels: Sequence[tuple[int, int, float]],
    rounds: int,
    deadline_s: float,
    pipelines: dict[str, dict[str, object]] = PIPELINES,
    baseline: str = BASELINE,
) -> dict[str, Any]:
    """Per pipeline (gateway settings) and concurrency: the summaries of every round; then
    the ratios of the medians (each over the ``baseline`` pipeline's) for QPS and p50.

    Each pipeline's gateway starts from the stack's settings as they were, plus its own:
    ``restart_gateway`` keeps what the last restart changed, so a setting only the baseline
    changes (the cross-encoder pipeline's feature-ranker name) carried over into the next
    pipeline's rounds until 2026-12-05: every second round of the feature ranker ran
    without it."""
    defaults = {key: getattr(stack.settings, key) for p in pipelines.values() for key in p}
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {
        name: {c: [] for c, _, _ in levels} for name in pipelines
    }
    try:
        for r in range(rounds):
            names = list(pipelines) if r % 2 == 0 else list(reversed(pipelines))
            for name in names:
                stack.restart_gateway(**{**defaults, **pipelines[name]})
                gateway.run_load(stack, users, 1, 3, 30.0, deadline_s)  # warm-up
                for concurrency, max_requests, max_seconds in levels:
                    result = gateway.run_load(
                        stack, users, concurrency, max_requests, max_seconds, deadline_s
                    )
                    s = result.summary()
                    runs[name][concurrency].append(s)
                    lat = s["latency_ms"]
                    print(
                        f"  {name:>23} c={concurrency:<3} {s['qps_ranked']:7.1f} ranked/s "
                        f"p50 {lat['p50']:7.1f} ms p99 {lat['p99']:7.1f} ms "
                        f"codes {s['codes']} degraded {s['degraded']}",
                        flush=True,
                    )
    finally:
        stack.restart_gateway(**defaults)
    return {
        "pipelines": pipelines,
        "baseline": baseline,
        "runs": runs,
        "table": table(runs, baseline),
    }


def compare_milvus(
    stack: LocalStack,
    users: Sequence[str],
    rounds: int,
    max_requests: int,
    max_seconds: float,
    deadline_s: float,
) -> dict[str, Any]:
    """Per configuration of :data:`MILVUS_CONFIGS` and visit (:data:`VISITS`), at
    concurrency 1: the Milvus time per ``Recommend`` (p50, p99 of the gateway's histogram),
    the profile and retrieval stages and the end-to-end latency of each round, with the load
    average around it. The warm-up's users are not among the measured ones."""
    runs: dict[str, list[dict[str, Any]]] = {
        f"{name}, {visit}": [] for name in MILVUS_CONFIGS for visit in VISITS
    }
    warm, users = users[:20], users[20:]
    max_requests = min(max_requests, len(users))  # a first visit is a first visit
    saved = {key: os.environ.get(key) for cfg in MILVUS_CONFIGS.values() for key in cfg}
    try:
        for r in range(rounds):
            names = list(MILVUS_CONFIGS) if r % 2 == 0 else list(reversed(MILVUS_CONFIGS))
            for name in names:
                os.environ.update(MILVUS_CONFIGS[name])  # the gateway inherits it
                stack.restart_gateway()
                gateway.run_load(stack, warm, 1, len(warm), 60.0, deadline_s)
                for visit in VISITS:
                    s = _milvus_window(stack, users, max_requests, max_seconds, deadline_s)
                    runs[f"{name}, {visit}"].append(s)
                    print(
                        f"  {name:>20}, {visit:<5} milvus p50 {s['milvus_ms']['p50']:6.1f} ms "
                        f"p99 {s['milvus_ms']['p99']:6.1f} ms | Recommend p50 "
                        f"{s['latency_ms']['p50']:6.1f} ms p99 {s['latency_ms']['p99']:6.1f} ms "
                        f"codes {s['codes']} degraded {s['degraded']} "
                        f"load {s['load_average'][0][0]:.1f} | p50 per "
                        + ", ".join(f"{c} {q['p50']:.1f}" for c, q in s["milvus_calls_ms"].items()),
                        flush=True,
                    )
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        stack.restart_gateway()
    return {"configs": MILVUS_CONFIGS, "runs": runs, "table": milvus_table(runs)}


def _milvus_window(
    stack: LocalStack,
    users: Sequence[str],
    max_requests: int,
    max_seconds: float,
    deadline_s: float,
) -> dict[str, Any]:
    """One measured window at concurrency 1 with the Milvus time of its requests."""
    before = metrics.scrape(stack.ports.gateway_metrics)
    load = load_average()
    result = gateway.run_load(stack, users, 1, max_requests, max_seconds, deadline_s)
    delta = metrics.delta(before, metrics.scrape(stack.ports.gateway_metrics))
    s = result.summary()
    s["milvus_ms"] = _milvus_quantiles(delta, "all")
    s["milvus_calls_ms"] = {call: _milvus_quantiles(delta, call) for call in MILVUS_CALLS}
    s["load_average"] = [load, load_average()]
    return s


def _milvus_quantiles(delta: metrics.Samples, call: str) -> dict[str, float]:
    q = metrics.histogram_quantiles(delta, "recsys_milvus_seconds", {"call": call})
    return {k: v * 1000 if k != "count" else v for k, v in q.items()}


def milvus_table(runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per configuration and visit: each round's figures, and the ratio of the
    medians of the Milvus p50 to the baseline's for the same visit."""
    rows = []
    for name, summaries in runs.items():
        rows.append(
            {
                "config": name,
                "ranked": sum(s["ranked"] for s in summaries),
                "requests": sum(s["requests"] for s in summaries),
                "milvus_p50_ms": [s["milvus_ms"]["p50"] for s in summaries],
                "milvus_p99_ms": [s["milvus_ms"]["p99"] for s in summaries],
                "calls_p50_ms": {
                    c: [s["milvus_calls_ms"][c]["p50"] for s in summaries] for c in MILVUS_CALLS
                },
                "profile_p50_ms": [s["stages_ms"]["profile"]["p50"] for s in summaries],
                "retrieval_p50_ms": [s["stages_ms"]["retrieval"]["p50"] for s in summaries],
                "p50_ms": [s["latency_ms"]["p50"] for s in summaries],
                "p99_ms": [s["latency_ms"]["p99"] for s in summaries],
                "load_average": [s["load_average"][0][0] for s in summaries],
            }
        )
    for row in rows:  # against the baseline's same visit
        visit = row["config"].rsplit(", ", 1)[-1]
        base = next(r for r in rows if r["config"] == f"{MILVUS_BASELINE}, {visit}")
        row["milvus_p50_ratio"] = _median(row["milvus_p50_ms"]) / _median(base["milvus_p50_ms"])
    return rows


def render_milvus(section: dict[str, Any]) -> str:
    """The Markdown table of :func:`milvus_table`'s rows (each round's figure, in order)."""

    def each(values: list[float]) -> str:
        return ", ".join(f"{v:.1f}" for v in values)

    lines = [
        "| gateway, visit | ranked / requests | Milvus p50 ms | Milvus p99 ms | p50 vs no cache | "
        "p50 ms per call: user / items by id / search | "
        "profile p50 ms | retrieval p50 ms | Recommend p50 ms | Recommend p99 ms | load avg |",
        "|---|---:|---|---|---:|---|---|---|---|---|---|",
    ]
    for r in section["table"]:
        lines.append(
            f"| {r['config']} | {r['ranked']} / {r['requests']} | {each(r['milvus_p50_ms'])} | "
            f"{each(r['milvus_p99_ms'])} | {r['milvus_p50_ratio']:.2f}x | "
            f"{' / '.join(each(r['calls_p50_ms'][c]) for c in MILVUS_CALLS[:3])} | "
            f"{each(r['profile_p50_ms'])} | {each(r['retrieval_p50_ms'])} | "
            f"{each(r['p50_ms'])} | {each(r['p99_ms'])} | {each(r['load_average'])} |"
        )
    return "\n".join(lines)


def _median(values: list[float]) -> float:
    """The median over rounds; of two, their mean (the upper one flattered QPS)."""
    return statistics.median(values) if values else float("nan")


def table(
    runs: dict[str, dict[int, list[dict[str, Any]]]], baseline: str = BASELINE
) -> list[dict[str, Any]]:
    """One row per (pipeline, concurrency): medians over rounds, and ours / ``baseline``."""
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
                    # Triton requests per Recommend to the models whose presence tells the
                    # pipelines apart (feature ranker: 1 where it ranks; sequence model: 1)
                    **{
                        f"{model}_requests": sum(
                            s.get("triton", {}).get(model, {}).get("requests", 0.0)
                            for s in summaries
                        )
                        / max(1, sum(s["requests"] for s in summaries))
                        for model in CHECKED_MODELS
                    },
                }
            )
    base = {r["concurrency"]: r for r in rows if r["pipeline"] == baseline}
    for row in rows:
        b = base.get(row["concurrency"])
        row["qps_ratio"] = row["qps"] / b["qps"] if b and b["qps"] else float("nan")
        row["p50_ratio"] = row["p50_ms"] / b["p50_ms"] if b and b["p50_ms"] else float("nan")
    return rows


def render(section: dict[str, Any]) -> str:
    """The Markdown table of :func:`table`'s rows."""
    baseline = section.get("baseline", BASELINE)
    lines = [
        "| pipeline | concurrency | ranked / requests | QPS | p50 ms | p99 ms | QPS vs "
        f"{baseline} | p50 vs {baseline} | Triton requests per call: feature ranker / "
        "sequence model |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    nan = float("nan")
    for r in section["table"]:
        calls = " / ".join(f"{r.get(f'{m}_requests', nan):.2f}" for m in CHECKED_MODELS)
        lines.append(
            f"| {r['pipeline']} | {r['concurrency']} | {r['ranked']} / {r['requests']} | "
            f"{r['qps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
            f"{r['qps_ratio']:.2f}x | {r['p50_ratio']:.2f}x | {calls} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.pipelines``: this section alone, on its own stack (as ``make bench``
    builds it: the release of ``--checkpoint``, a MovieLens slice indexed through Triton)."""
    import argparse
    import json
    import os

    from bench import stack as bench_stack
    from core.config import REPO_ROOT

    parser = argparse.ArgumentParser(prog="python -m bench.pipelines", description=__doc__)
    parser.add_argument("--checkpoint", type=Path, default=REPO_ROOT / "runs" / "local" / "final")
    parser.add_argument("--cache-dir", type=Path, default=REPO_ROOT / "var" / "bench")
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--milvus",
        choices=("lite", "engine"),
        default="engine",
        help="the real engine (make milvus-engine; the default, as in make bench) or the "
        "Milvus Lite server",
    )
    parser.add_argument(
        "--compare",
        choices=("pipelines", "milvus", "releases"),
        default="pipelines",
        help="the two pipelines (default), the Milvus time with and without the item cache, "
        "or the four releases make train chooses between",
    )
    parser.add_argument(
        "--json",
        type=Path,
        help="default reports/bench_pipelines.json, or bench_pipelines_engine.json on the engine",
    )
    args = parser.parse_args(argv)
    suffix = "_engine" if args.milvus == "engine" else ""
    name = {
        "pipelines": "bench_pipelines",
        "milvus": "bench_milvus_time",
        "releases": "bench_release_cost",
    }[args.compare]
    args.json = args.json or REPO_ROOT / "reports" / f"{name}{suffix}.json"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    models = bench_stack.resolve_models(args.checkpoint, args.cache_dir)
    repository, _ = bench_stack.exported_repository(models, args.cache_dir)
    data_dir = bench_stack.dataset_slice(args.items, 0, args.cache_dir)
    state = args.cache_dir / f"pipelines-{os.getpid()}"
    with bench_stack.running_stack(repository, data_dir, state, milvus=args.milvus) as running:
        users = gateway.known_users(running.settings, 200)
        levels = ((1, 200, 30.0), (16, 1000, 30.0))
        if args.compare == "milvus":
            section = compare_milvus(running, users, args.rounds, 200, 30.0, 180.0)
        elif args.compare == "releases":
            section = compare(
                running, users, levels, args.rounds, 180.0, RELEASE_PIPELINES, RELEASE_BASELINE
            )
        else:
            section = compare(running, users, levels, args.rounds, 180.0)
    section["models"] = models.source
    section["milvus"] = args.milvus
    section["items"] = args.items
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(section, indent=2, default=str) + "\n")
    print(render_milvus(section) if args.compare == "milvus" else render(section))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
