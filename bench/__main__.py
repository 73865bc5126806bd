"""``python -m bench [--quick] [--milvus engine|lite] [--out BENCHMARKS.md] [--json F]``.

Exports (or reuses) a release into ``var/bench``, starts Milvus (the real engine by default,
or the Milvus Lite server), tritonserver and the gateway on free loopback ports, indexes a
MovieLens slice through Triton, then runs each section with bounded counts and time and
writes the Markdown report and the JSON file. ``--quick`` is the smoke run the tests use:
every section, tiny counts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import shutil
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench.tokens import TokenizerSpec, real_texts
from core.config import REPO_ROOT

log = logging.getLogger("bench")


@dataclass(frozen=True)
class Plan:
    """Counts and time bounds of one run."""

    items: int
    users: int  # users kept in the slice (0 = every user who rated the items)
    gemm_seconds: float
    levels: tuple[tuple[int, int, float], ...]  # (concurrency, max requests, max seconds)
    # the top level, in rounds alternating with the baseline: (concurrency, rounds,
    # max requests per window, seconds per window); drift on a shared machine hits both
    paired: tuple[int, int, int, float]
    deadline_s: float
    baseline: tuple[int, float, int]  # per window: max requests, seconds; users compared
    batch_sizes: tuple[int, ...]
    model_seconds: float
    quality: tuple[int, int, int]  # item texts, users, candidates per user
    ranker_lengths: tuple[int, ...]
    triton: tuple[tuple[int, int], ...]  # (client batch, concurrency)
    triton_seconds: float
    perf_concurrency: tuple[int, ...]
    perf_interval_ms: int
    milvus_queries: int
    milvus_efs: tuple[int, ...]
    milvus_seconds: float
    variant_rounds: int  # paired rounds per serving variant (0 = none)
    # feature ranker against the cross-encoder pipeline: (concurrency, max requests, max
    # seconds) per level, and rounds (alternating order)
    pipeline_levels: tuple[tuple[int, int, float], ...] = ((1, 200, 30.0), (16, 1000, 30.0))
    pipeline_rounds: int = 2
    # item indexing, length-bucketed against file-order batches: catalogue items (0 = all of
    # MovieLens) and rounds (the variants take turns batch by batch within each round)
    indexing_items: int = 0
    indexing_rounds: int = 1


FULL = Plan(
    items=2000,
    users=0,
    gemm_seconds=3.0,
    levels=((1, 40, 45.0), (4, 80, 60.0)),
    paired=(16, 3, 200, 40.0),
    deadline_s=180.0,
    baseline=(40, 40.0, 5),
    batch_sizes=(1, 16, 64),
    model_seconds=8.0,
    quality=(256, 6, 50),
    ranker_lengths=(128,),
    triton=((1, 16), (16, 4), (64, 2)),
    triton_seconds=15.0,
    perf_concurrency=(1, 4, 16),
    perf_interval_ms=3000,
    milvus_queries=200,
    milvus_efs=(16, 64),
    milvus_seconds=90.0,
    variant_rounds=2,
    indexing_rounds=2,  # the job's whole pass goes after the others, then before them
)
QUICK = Plan(
    items=300,
    users=80,
    gemm_seconds=0.5,
    levels=((1, 2, 10.0),),
    paired=(2, 1, 2, 10.0),
    deadline_s=90.0,
    baseline=(2, 10.0, 1),
    batch_sizes=(1, 8),
    model_seconds=1.0,
    quality=(16, 1, 16),
    ranker_lengths=(),
    triton=((1, 4), (8, 1)),
    triton_seconds=3.0,
    perf_concurrency=(2,),
    perf_interval_ms=1000,
    milvus_queries=30,
    milvus_efs=(16,),
    milvus_seconds=15.0,
    variant_rounds=0,
    pipeline_levels=((1, 3, 10.0), (4, 6, 10.0)),
    pipeline_rounds=1,
    indexing_items=128,  # two batches of 64 per variant
)
SECTIONS = (
    "machine",
    "gemm_peak",
    "setup",
    "pipelines",
    "gateway",
    "baseline",
    "triton_models",
    "perf_analyzer",
    "milvus",
    "indexing",
    "variants",
    "encoder",
    "ranker",
    "targets",
)


class Results(dict[str, Any]):
    """Section name -> result; a failed section holds its error instead of aborting the run."""

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[dict[str, Any]]:
        started = time.monotonic()
        print(f"\n== {name}", flush=True)
        entry: dict[str, Any] = {}
        self[name] = entry
        try:
            yield entry
        except Exception as exc:
            log.error("section %s failed: %s", name, exc)
            entry["error"] = "".join(traceback.format_exception_only(exc)).strip()[-2000:]
            entry["traceback"] = traceback.format_exc()[-4000:]
        entry["section_seconds"] = round(time.monotonic() - started, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke run: every section, tiny")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "BENCHMARKS.md")
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "reports" / "bench.json")
    parser.add_argument("--cache-dir", type=Path, default=REPO_ROOT / "var" / "bench")
    parser.add_argument("--checkpoint", type=Path, default=REPO_ROOT / "runs" / "local" / "final")
    parser.add_argument("--threads", type=int, default=2, help="PyTorch / ORT intra-op threads")
    parser.add_argument(
        "--milvus",
        choices=("lite", "engine"),
        default="engine",
        help="the real Milvus engine (make milvus-engine; the default: what serves in "
        "production) or the Milvus Lite server (pure Python, brute-force search)",
    )
    parser.add_argument(
        "--omp-wait-policy",
        default="PASSIVE",
        help="OMP_WAIT_POLICY of this process (PyTorch); 'default' leaves it unset",
    )
    args = parser.parse_args(argv)
    if args.omp_wait_policy != "default":
        # libgomp reads it once, when PyTorch loads it; the stack's processes don't get it
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy
        import torch  # noqa: F401

        os.environ.pop("OMP_WAIT_POLICY")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    plan = QUICK if args.quick else FULL
    command = "python -m bench " + shlex.join(argv if argv is not None else sys.argv[1:])
    results = run(
        plan,
        args.cache_dir,
        args.checkpoint,
        args.threads,
        command.strip(),
        args.omp_wait_policy,
        args.milvus,
    )
    from bench.report import write_benchmarks

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    # the generated part only: the sections written below it stay
    if write_benchmarks(results, args.json, args.out) != args.out:
        return 1
    print(f"\nwrote {args.out} and {args.json}")
    failed = [name for name in SECTIONS if "error" in results.get(name, {"error": "missing"})]
    if failed:
        print(f"sections with errors: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def run(
    plan: Plan,
    cache: Path,
    checkpoint: Path,
    threads: int,
    command: str,
    omp_policy: str,
    milvus: str = "engine",
) -> Results:
    from bench import gateway, machine, models, pipelines, stack
    from bench.milvus import bench_milvus
    from bench.perf_analyzer import run_perf_analyzer

    results = Results()
    results["plan"] = plan.__dict__
    cache.mkdir(parents=True, exist_ok=True)
    with results.section("machine") as r:
        r.update(machine.machine_info(command))
    with results.section("gemm_peak") as r:
        r.update(machine.gemm_peaks(seconds=plan.gemm_seconds, threads=threads))

    texts: dict[str, list[str]] = {}
    with results.section("setup") as r:
        t0 = time.monotonic()
        chosen = stack.resolve_models(checkpoint, cache)
        repository, export = stack.exported_repository(chosen, cache)
        r.update(models=chosen.__dict__, repository=str(repository), export=export)
        r["export_seconds"] = round(time.monotonic() - t0, 1)
        data_dir = stack.dataset_slice(plan.items, plan.users, cache)
        texts = real_texts(data_dir)
        r.update(data_dir=str(data_dir), n_item_texts=len(texts["items"]))
        r["n_user_texts"] = len(texts["users"])
        spec = TokenizerSpec.of_release(repository)
        r["tokenizer"] = {k: str(v) for k, v in spec.__dict__.items()}
        r["omp_wait_policy"] = omp_policy
        graphs = _graphs(chosen, repository, export, cache)
        r["graphs"] = {m: {k: str(v) for k, v in g.items()} for m, g in graphs.items()}
    if "error" in results["setup"]:
        for name in SECTIONS[3:]:
            results[name] = {"error": "setup failed"}
        return results

    state = cache / f"stack-{os.getpid()}"
    try:
        with stack.running_stack(repository, data_dir, state, milvus=milvus) as running:
            results["setup"]["stack_ready_s"] = round(time.monotonic() - t0, 1)
            results["setup"]["milvus"] = milvus
            results["setup"]["ports"] = running.ports.__dict__
            users = gateway.known_users(running.settings, 200)
            results["setup"]["load_users"] = len(users)
            baseline: Any = None
            with results.section("pipelines") as r:
                r.update(
                    pipelines.compare(
                        running, users, plan.pipeline_levels, plan.pipeline_rounds, plan.deadline_s
                    )
                )
            with results.section("gateway") as r:
                _gateway(r, running, users, plan)
            with results.section("baseline") as r:
                baseline = gateway.Baseline(running, chosen.ranker, spec)
                baseline.compare(users[: plan.baseline[2]])
                top = _paired(running, users, plan, baseline)
                results["gateway"].setdefault("levels", []).append(top.pop("gateway"))
                r.update(baseline.result.summary(), **top)
            with results.section("triton_models") as r:
                _triton_models(r, running, chosen, texts, spec, plan, threads)
            with results.section("perf_analyzer") as r:
                r.update(
                    run_perf_analyzer(
                        cache,
                        running.settings.triton_url,
                        texts["items"][:200],
                        list(zip(texts["users"][:50], texts["items"][:50], strict=False)),
                        plan.perf_concurrency,
                        plan.perf_interval_ms,
                        timeout_s=60 + plan.perf_interval_ms / 1000 * 12,
                    )
                )
            with results.section("milvus") as r:
                r.update(
                    bench_milvus(
                        running.settings,
                        plan.milvus_queries,
                        list(plan.milvus_efs),
                        max_seconds=plan.milvus_seconds,
                    )
                )
            with results.section("indexing") as r:
                _indexing(r, running, repository, chosen, plan, threads, state)
            with results.section("variants") as r:
                _variants(r, running, users, plan, repository, graphs["ranker"], state, baseline)
            if baseline is not None:
                baseline.close()
    finally:
        shutil.rmtree(state, ignore_errors=True)

    # In-process models after the stack is down, so Triton and Milvus hold no memory or CPU.
    variants = cache / "variants" / repository.name
    quality_items = texts["items"][: plan.quality[0]]
    n_users, n_docs = plan.quality[1], plan.quality[2]
    with results.section("encoder") as r:
        from training.models.two_tower import PooledEncoder
        from training.pretrained import load_bert

        module = PooledEncoder(load_bert(chosen.item_tower)).eval()
        r.update(
            models.bench_model(
                "encoder",
                module,
                Path(str(results["setup"]["export"]["item_encoder"]["onnx"])),
                spec,
                texts["items"],
                None,
                variants / "item_encoder",
                plan.batch_sizes,
                plan.model_seconds,
                [(quality_items, None)],
                threads,
            )
        )
    with results.section("ranker") as r:
        from training.models.ranker import load_scorer

        ranker = load_scorer(chosen.ranker)
        r.update(
            models.bench_model(
                "ranker",
                ranker,
                Path(str(results["setup"]["export"]["ranker"]["onnx"])),
                spec,
                texts["users"],
                texts["items"],
                variants / "ranker",
                plan.batch_sizes,
                plan.model_seconds,
                [
                    ([texts["users"][u]] * n_docs, texts["items"][u * n_docs : (u + 1) * n_docs])
                    for u in range(n_users)
                ],
                threads,
                extra_lengths=plan.ranker_lengths,
            )
        )
    with results.section("targets") as r:
        from bench.report import targets

        r.update(targets(results))
    return results


def _graphs(
    chosen: Any, repository: Path, export: dict[str, Any], cache: Path
) -> dict[str, dict[str, Any]]:
    """Optimized and int8 ONNX graphs of both models (cached beside the release)."""
    from bench.models import ort_variants

    out = {}
    for model, source in (("item_encoder", chosen.item_tower), ("ranker", chosen.ranker)):
        cfg = json.loads((Path(source) / "config.json").read_text())
        out[model] = ort_variants(
            Path(str(export[model]["onnx"])),
            cache / "variants" / repository.name / model,
            int(cfg["hidden_size"]),
            int(cfg["num_attention_heads"]),
        )
    return out


def _paired(running: Any, users: list[str], plan: Plan, baseline: Any) -> dict[str, Any]:
    """The top gateway level in windows alternating with in-process baseline windows."""
    from bench import gateway

    concurrency, rounds, max_requests, window_s = plan.paired
    result = gateway.LoadResult(concurrency)
    per_round = []
    with gateway.scraped(running, result):
        for _ in range(rounds):
            ranked, wall = len(result.ranked_latencies_s), result.wall_s
            gateway.drive(running, users, result, max_requests, window_s, plan.deadline_s)
            gw_qps = (len(result.ranked_latencies_s) - ranked) / (result.wall_s - wall)
            base_qps = baseline.window(users, plan.baseline[0], plan.baseline[1])
            per_round.append({"gateway_qps": gw_qps, "baseline_qps": base_qps})
            print(f"  c={concurrency}: {gw_qps:.2f} ranked/s; PyTorch {base_qps:.2f}/s", flush=True)
    for entry in per_round:
        entry["ratio"] = entry["gateway_qps"] / entry["baseline_qps"]
    return {"gateway": result.summary(), "rounds": per_round}


def _variants(
    r: dict[str, Any],
    running: Any,
    users: list[str],
    plan: Plan,
    repository: Path,
    ranker_graphs: dict[str, Any],
    state: Path,
    baseline: Any,
) -> None:
    """The paired top level again with the ranker served as the int8 graph."""
    from bench import gateway
    from bench.variants import Variant, serve, variant_repository

    if not plan.variant_rounds or baseline is None:
        r["skipped"] = "not part of --quick" if baseline is not None else "no baseline"
        return
    r["runs"] = []
    int8 = Path(ranker_graphs["int8"])
    for variant in (Variant("ranker int8 (per-channel dynamic quantisation)", ranker_graph=int8),):
        repo = variant_repository(repository, variant, state / "variant-repository")
        serve(running, repo)
        gateway.run_load(running, users, 1, 2, 60.0, plan.deadline_s)  # warm-up
        before = (len(baseline.result.latencies_s), baseline.result.wall_s)
        paired = _paired(
            running,
            users,
            replace(plan, paired=(*plan.paired[:1], plan.variant_rounds, *plan.paired[2:])),
            baseline,
        )
        base_n = len(baseline.result.latencies_s) - before[0]
        base_qps = base_n / (baseline.result.wall_s - before[1])
        run = {"variant": variant.name, **paired["gateway"], "rounds": paired["rounds"]}
        run["baseline_qps"] = base_qps
        r["runs"].append(run)
        print(f"  {variant.name}: {run['qps_ranked']:.2f} ranked/s", flush=True)


def _indexing(
    r: dict[str, Any],
    running: Any,
    repository: Path,
    chosen: Any,
    plan: Plan,
    threads: int,
    state: Path,
) -> None:
    """Item indexing of the whole catalogue (not the slice), into scratch collections; Triton
    restarted with a twin item embedder serving the release's item tower otherwise."""
    from bench import indexing, machine, models, stack
    from bench.variants import (
        FP32,
        ITEM_TWIN,
        Variant,
        item_tower_served,
        serve,
        served_label,
        variant_repository,
    )
    from core.behaviour import popularity_half_life
    from ops.indexing import item_rows
    from training.data import load_dataset
    from training.export.repository import INT8_GRAPH
    from training.models.two_tower import PooledEncoder
    from training.pretrained import load_bert

    t0 = time.monotonic()
    ds = load_dataset(stack.MOVIELENS)
    days = popularity_half_life(ds.events, running.settings.popularity_half_life_days)
    rows = item_rows(ds, days)
    rows = rows[: plan.indexing_items] if plan.indexing_items else rows
    r["row_build_seconds"] = round(time.monotonic() - t0, 1)
    arch = models.arch_of(PooledEncoder(load_bert(chosen.item_tower)))
    served = item_tower_served(repository / "item_encoder")
    other = FP32 if served != FP32 else (INT8_GRAPH, "onnxruntime")
    twin = Variant(f"item embedder twin on {other}", item_twin=other)
    serve(running, variant_repository(repository, twin, state / "indexing-repository"))
    peak = machine.quick_fp32_peak(1.0, threads)
    r.update(
        indexing.compare(
            running.settings,
            rows,
            repository,
            plan.indexing_rounds,
            arch=arch,
            fp32_peak=peak,
            twin=indexing.Twin(served_label(served), served_label(other), ITEM_TWIN),
        )
    )


def _gateway(r: dict[str, Any], running: Any, users: list[str], plan: Plan) -> None:
    from bench import gateway

    gateway.run_load(running, users, 1, 2, 60.0, plan.deadline_s)  # warm-up, not reported
    r["deadline_s"] = plan.deadline_s
    r["levels"] = []
    for concurrency, max_requests, max_seconds in plan.levels:
        result = gateway.run_load(
            running, users, concurrency, max_requests, max_seconds, plan.deadline_s
        )
        summary = result.summary()
        r["levels"].append(summary)
        print(
            f"  c={concurrency}: {summary['qps_ranked']:.2f} ranked/s, "
            f"p50 {summary['latency_ms']['p50']:.0f} ms, codes {summary['codes']}",
            flush=True,
        )


def _triton_models(
    r: dict[str, Any],
    running: Any,
    chosen: Any,
    texts: dict[str, list[str]],
    spec: TokenizerSpec,
    plan: Plan,
    threads: int,
) -> None:
    from bench import machine, models
    from training.models.ranker import load_scorer
    from training.models.two_tower import PooledEncoder
    from training.pretrained import load_bert

    peak = machine.quick_fp32_peak(1.0, threads)
    r["fp32_peak"] = peak
    encoder_arch = models.arch_of(PooledEncoder(load_bert(chosen.item_tower)))
    ranker_arch = models.arch_of(load_scorer(chosen.ranker))
    common: dict[str, Any] = {
        "settings": running.settings,
        "triton_metrics_port": running.ports.triton_metrics,
        "spec": spec,
        "configs": plan.triton,
        "max_seconds": plan.triton_seconds,
        "fp32_peak": peak,
    }
    r["encoder"] = models.bench_triton(
        kind="encoder", texts=texts["items"], pairs=None, arch=encoder_arch, **common
    )
    r["ranker"] = models.bench_triton(
        kind="ranker", texts=texts["users"], pairs=texts["items"], arch=ranker_arch, **common
    )


if __name__ == "__main__":
    sys.exit(main())
