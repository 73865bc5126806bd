"""``python -m bench --quick`` end to end: real stack (the Milvus engine), every section in the
JSON report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bench import indexing
from bench.__main__ import SECTIONS
from bench.metrics import histogram_quantiles
from bench.report import GENERATED_BEGIN, GENERATED_END, splice, targets
from core.config import REPO_ROOT, Settings
from tests.nats_server import nats_settings
from tests.training.export.served_runner import tower_atol
from training.precision import cpu_has_bf16

__all__ = ["nats_settings"]  # the fixture


def test_histogram_quantiles_interpolate_within_buckets() -> None:
    samples = {
        ("h_bucket", frozenset({("le", "0.1"), ("stage", "x")})): 50.0,
        ("h_bucket", frozenset({("le", "1.0"), ("stage", "x")})): 100.0,
        ("h_bucket", frozenset({("le", "+Inf"), ("stage", "x")})): 100.0,
    }
    q = histogram_quantiles(samples, "h", {"stage": "x"}, qs=(50, 75))
    assert q["p50"] == pytest.approx(0.1)
    assert q["p75"] == pytest.approx(0.55)
    assert q["count"] == 100


def test_targets_compare_with_the_baseline() -> None:
    results = {
        "gateway": {"levels": [{"concurrency": 16, "qps_ranked": 3.0, "p99_over_p50": 3.0}]},
        "baseline": {"qps": 1.0},
    }
    t = targets(results)
    assert t["gateway_vs_pytorch"]["met"]
    assert not t["tail_c16"]["met"]


def test_the_serving_targets_read_the_default_pipeline() -> None:
    def row(pipeline: str, c: int, qps: float, p50: float, p99: float) -> dict[str, object]:
        return {"pipeline": pipeline, "concurrency": c, "qps": qps, "p50_ms": p50, "p99_ms": p99}

    rows = [row("feature ranker", 1, 70.0, 14.0, 51.0), row("feature ranker", 16, 120.0, 0, 0)]
    rows += [row("cross-encoder", 1, 4.0, 300.0, 400.0), row("cross-encoder", 16, 4.0, 0, 0)]
    t = targets({"pipelines": {"table": rows}})
    assert t["recommend_p50_c1"]["met"] and t["recommend_p50_c1"]["measured"] == 14.0
    assert not t["recommend_p99_c1"]["met"]  # 51 ms against 50
    assert t["recommend_qps_c16"]["met"] and t["recommend_qps_c16"]["measured"] == 120.0


def test_two_gateway_processes_get_their_own_throughput_row() -> None:
    """The default pipeline's row stays the one-process gateway's; two processes report
    beside it, not in its place."""
    from bench.pipelines import PROCESSES_PIPELINE

    rows = [
        {"pipeline": "feature ranker", "concurrency": 16, "qps": 85.0, "p50_ms": 0, "p99_ms": 0},
        {"pipeline": PROCESSES_PIPELINE, "concurrency": 16, "qps": 110.0, "p50_ms": 0, "p99_ms": 0},
        {"pipeline": PROCESSES_PIPELINE, "concurrency": 1, "qps": 40.0, "p50_ms": 30, "p99_ms": 60},
    ]
    t = targets({"pipelines": {"table": rows}})
    assert not t["recommend_qps_c16"]["met"] and t["recommend_qps_c16"]["measured"] == 85.0
    two = t[f"recommend_qps_c16 [{PROCESSES_PIPELINE}]"]
    assert two["met"] and two["measured"] == 110.0
    assert "recommend_p50_c1" not in t  # latency targets: the default pipeline's only


def test_a_gemm_timed_at_another_size_says_so() -> None:
    from bench.report import _gemm

    rates = {"torch_fp32": 60e9, "torch_int8": 1.5e9, "ort_int8": 70e9}
    g = {"n": 2048, "threads": 2, "seconds_each": 3.0, "rates": rates, "fp32": 60e9}
    g |= {"int8": 70e9, "load_average": [], "sizes": {"torch_int8": 256}}
    text = "\n".join(_gemm({"gemm_peak": g}))
    assert "| torch_int8 (at 256: a fallback loop) | 1.5 |" in text
    assert "| torch_fp32 | 60.0 |" in text
    g.pop("sizes")  # a report written before sizes were recorded
    assert "| torch_int8 | 1.5 |" in "\n".join(_gemm({"gemm_peak": g}))


def test_a_run_replaces_only_the_generated_part_of_the_report() -> None:
    """Sections written below the generated part (single runs with their conditions) are
    what BENCHMARKS.md keeps of every past measurement: a run must not erase them."""
    first = splice(None, "# Benchmarks\n\nrun 1\n")
    assert first.startswith(GENERATED_BEGIN) and first.endswith(GENERATED_END + "\n")
    written = first + "\n## By hand (2026-12-05)\n\nmeasured once\n"
    second = splice(written, "# Benchmarks\n\nrun 2\n")
    assert "run 2" in second and "run 1" not in second
    assert second.endswith("\n## By hand (2026-12-05)\n\nmeasured once\n")
    assert splice(second, "# Benchmarks\n\nrun 2\n") == second
    with pytest.raises(ValueError, match="not overwritten"):
        splice("# Benchmarks written by hand\n", "# Benchmarks\n")


@pytest.mark.integration
@pytest.mark.timeout(1500)
def test_quick_bench_writes_every_section(tmp_path: Path) -> None:
    out, report = tmp_path / "BENCHMARKS.md", tmp_path / "bench.json"
    kept = "## Measured by hand\n\nkept by every run\n"
    out.write_text(splice(None, "# Benchmarks\n\nan earlier run\n") + "\n" + kept)
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out), "--json", str(report)],
        cwd=REPO_ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=1400,
    )
    assert report.is_file(), proc.stderr[-3000:]
    results = json.loads(report.read_text())
    failed = {s: results.get(s, {}).get("error", "missing") for s in SECTIONS}
    assert not {s: e for s, e in failed.items() if s not in results or "error" in results[s]}
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert results["setup"]["milvus"] == "engine"  # benchmarks run on the real engine
    assert results["gateway"]["levels"][0]["ranked"] > 0
    assert results["baseline"]["requests"] > 0
    assert {r["backend"] for r in results["ranker"]["rows"]} >= {"pytorch", "ort-plain", "ort-int8"}
    assert results["milvus"]["runs"][0]["recall_at_k"] > 0.5
    # the indexing job's own pass (upserts overlapped) beside the turn-taking variants, and
    # again through a twin serving the release's item tower otherwise: different vectors
    variants = results["indexing"]["variants"]
    assert set(variants) >= {indexing.BASELINE, indexing.JOB, indexing.TWIN_JOB}
    graphs = results["indexing"]["item_graphs"]
    fp32 = "model.onnx, ONNX Runtime fp32"
    other = "model.onnx, OpenVINO bf16" if cpu_has_bf16() else "model.int8.onnx, ONNX Runtime fp32"
    assert {graphs[indexing.JOB], graphs[indexing.TWIN_JOB]} == {fp32, other}
    # bf16: a few vectors move by up to ~1e-3 with their batch's padding; fp32: none
    assert variants[indexing.JOB]["max_abs_diff_vs_file_order"] < tower_atol(1e-5)
    assert 1e-4 < variants[indexing.TWIN_JOB]["max_abs_diff_vs_file_order"] < 0.1
    assert results["targets"]["item_indexing"]["at"].startswith(indexing.JOB)
    assert "perf_analyzer" in results and "targets" in results
    text = out.read_text()
    for heading in ("## Targets", "## Gateway", "## Milvus", "## perf_analyzer"):
        assert heading in text
    assert text.endswith(kept) and "an earlier run" not in text


def test_the_pipelines_table_takes_the_median_of_the_rounds() -> None:
    from bench.pipelines import BASELINE, table

    def summary(qps: float, p50: float) -> dict[str, object]:
        latency = {"p50": p50, "p99": 2 * p50}
        return {"requests": 10, "ranked": 10, "qps_ranked": qps, "latency_ms": latency}

    rows = table(
        {
            "feature ranker": {1: [summary(50.0, 20.0), summary(80.0, 10.0)]},
            BASELINE: {1: [summary(4.0, 250.0), summary(5.0, 200.0)]},
        }
    )
    ours = rows[0]
    assert (ours["qps"], ours["p50_ms"], ours["p99_ms"]) == (65.0, 15.0, 30.0)  # two: their mean
    assert ours["qps_ratio"] == 65.0 / 4.5 and ours["requests"] == 20


def test_every_setting_a_pipeline_comparison_changes_reaches_the_restarted_gateway(
    tmp_path: Path,
) -> None:
    """``restart_gateway(**config)`` changes the stack's settings; the gateway process only
    sees what :meth:`LocalStack.env` passes on (the sequence model's name once was not: the
    gateway "without it" still called it)."""
    from bench.pipelines import PIPELINES, RELEASE_PIPELINES
    from core.config import Settings
    from ops.stack import LocalStack, Ports

    stack = LocalStack(Settings(), tmp_path, Ports())
    for config in (*PIPELINES.values(), *RELEASE_PIPELINES.values()):
        stack.settings = stack.settings.model_copy(update=config)
        env = stack.env()
        for key, value in config.items():
            assert env[f"RECSYS_{key.upper()}"] == str(value), key


def test_each_releases_cost_is_a_ratio_against_the_retrieval_order() -> None:
    """``--compare releases``: the default pipeline, with the name of each model the release
    leaves out one Triton does not have (never ready), ratios against the retrieval order."""
    from bench.pipelines import (
        PIPELINES,
        RELEASE_BASELINE,
        RELEASE_PIPELINES,
        render,
        table,
    )
    from core.config import Settings

    assert list(RELEASE_PIPELINES) == [
        "retrieval order",
        "feature ranker",
        "retrieval order + sequence model",
        "feature ranker + sequence model",
    ]
    assert RELEASE_BASELINE == "retrieval order"
    assert RELEASE_PIPELINES["feature ranker + sequence model"] == PIPELINES["feature ranker"]
    served = {
        key: Settings.model_fields[key].default
        for key in ("triton_feature_ranker_model", "triton_sequence_model")
    }
    for name, config in RELEASE_PIPELINES.items():
        named = {k: config.get(k, v) == v for k, v in served.items()}
        assert named == {
            "triton_feature_ranker_model": name.startswith("feature ranker"),
            "triton_sequence_model": name.endswith("sequence model"),
        }, name

    def summary(qps: float, ranker: float, sequence: float) -> dict[str, object]:
        return {
            "requests": 5,
            "ranked": 5,
            "qps_ranked": qps,
            "latency_ms": {"p50": 1000 / qps, "p99": 1},
            "triton": {
                "sequence_recommender": {"requests": sequence},
                "feature_ranker": {"requests": ranker},
            },
        }

    runs = {
        RELEASE_BASELINE: {1: [summary(100.0, 0.0, 0.0)]},
        "feature ranker + sequence model": {1: [summary(80.0, 5.0, 5.0)]},
    }
    rows = table(runs, RELEASE_BASELINE)
    assert rows[0]["qps_ratio"] == 1.0 and rows[1]["qps_ratio"] == 0.8
    # what shows that each side ran as named: a request per Recommend, and none
    calls = [(r["feature_ranker_requests"], r["sequence_recommender_requests"]) for r in rows]
    assert calls == [(0.0, 0.0), (1.0, 1.0)]
    text = render({"baseline": RELEASE_BASELINE, "table": rows})
    assert "QPS vs retrieval order" in text and "| 0.80x | 1.25x | 1.00 / 1.00 |" in text


def test_each_pipeline_starts_from_the_same_settings_whatever_ran_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rounds alternate the order; a setting one pipeline changes must not carry over into
    the next one's gateway (the cross-encoder's feature-ranker name once did: every second
    round of the feature ranker ran without it)."""
    import bench.pipelines as bp
    from core.config import Settings
    from ops.stack import LocalStack, Ports

    started: list[tuple[str, str, int]] = []

    class Stack(LocalStack):
        def start_gateway(self, timeout: float = 60) -> Any:
            s = self.settings
            started.append(
                (s.triton_feature_ranker_model, s.triton_sequence_model, s.gateway_processes)
            )

    def load(*args: object) -> Any:
        latency = {"p50": 1.0, "p99": 1.0}
        summary = {"requests": 1, "ranked": 1, "qps_ranked": 1.0, "latency_ms": latency}
        return SimpleNamespace(summary=lambda: {**summary, "codes": {}, "degraded": {}})

    monkeypatch.setattr(bp.gateway, "run_load", load)
    stack = Stack(Settings(), tmp_path, Ports())
    s = stack.settings
    served = (s.triton_feature_ranker_model, s.triton_sequence_model, s.gateway_processes)
    bp.compare(stack, ["u"], [(1, 1, 1.0)], 2, 1.0)
    feature, cross = served, ("no_feature_ranker", served[1], 1)
    two = (*served[:2], 2)
    # the last: settings restored
    assert started == [feature, two, cross, cross, two, feature, served]
    started.clear()
    bp.compare(stack, ["u"], [(1, 1, 1.0)], 2, 1.0, bp.RELEASE_PIPELINES, bp.RELEASE_BASELINE)
    ranker, sequence = served[:2]
    order = [
        ("no_feature_ranker", "no_sequence_model", 1),
        (ranker, "no_sequence_model", 1),
        ("no_feature_ranker", sequence, 1),
        served,
    ]
    assert started == [*order, *reversed(order), served]


def test_the_token_mirror_pads_as_the_triton_tokenizer_does(tmp_path: Path) -> None:
    """A request under ``exact_padding_from`` texts is rounded up to the multiple, a larger
    one only to its longest text; never past ``max_length``."""
    from bench.tokens import TokenizerSpec

    repo = REPO_ROOT / "model_repository"
    spec = TokenizerSpec(tmp_path / "tokenizer.json", max_length=128, multiple=16, exact_from=33)
    assert (spec.width(3, 14), spec.width(32, 14), spec.width(33, 14)) == (16, 16, 14)
    assert spec.width(64, 140) == 128 and spec.width(1, 120) == 128
    text = (repo / "tokenizer" / "config.pbtxt").read_text()
    assert 'key: "exact_padding_from", value: { string_value: "33" }' in text  # the release's


def test_each_load_driver_thread_is_its_own_connection() -> None:
    """Channels of one process to one target share one connection unless told otherwise;
    the driver's 16 "clients" were one connection, so several gateway processes on one port
    (spread by connection) got every call on one of them."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from ops.processes import free_port
    from ops.stack import OWN_CONNECTION

    peers: list[str] = []

    class Recording(health.HealthServicer):
        def Check(self, request: Any, context: Any) -> Any:
            peers.append(context.peer())
            return super().Check(request, context)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(Recording(), server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:

        def connections(options: list[tuple[str, int]]) -> int:
            peers.clear()
            channels = [grpc.insecure_channel(f"127.0.0.1:{port}", options) for _ in range(4)]
            for channel in channels:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            for channel in channels:
                channel.close()
            return len(set(peers))

        assert connections([]) == 1  # what the driver had
        assert connections(OWN_CONNECTION) == 4
    finally:
        server.stop(0)


def test_the_popularity_refresh_bench_agrees_on_the_top_and_renders(tmp_path: Path) -> None:
    """Every refresh on one Milvus (an embedded Lite file here; the engine in the bench)
    over a catalogue larger than the item cache: the same top items, a row per refresh; the
    first refresh counts and reads part of the catalogue, as the later one does."""
    from bench.popularity import BASELINE, FIRST, OURS, SCAN, SCAN_4096, render, run
    from core.config import Settings

    settings = Settings(
        milvus_uri=str(tmp_path / "milvus.db"),
        embedding_dim=8,
        milvus_item_cache_size=50,
        popular_cache_size=20,
    )
    result = run(settings, items=300, text_chars=40, rounds=2)
    assert result["same_top_items"] == 20 and result["scanned"] == 300
    assert 20 <= result["read_above_floor"] < 300  # the later refresh reads the top's part
    assert 20 <= result["read_first"] < 300 and result["first_counts"] >= 2
    assert all(
        len(result["timings"][name]) == 2 for name in (BASELINE, SCAN_4096, SCAN, FIRST, OURS)
    )
    # every row's texts kept against the top's only: the baseline keeps more
    assert result["memory"][BASELINE]["kept_mb"] > result["memory"][FIRST]["kept_mb"] > 0
    text = render(result)
    assert "300 items scanned of 300 written" in text and f"| {FIRST} |" in text
    few = run(settings, items=300, text_chars=40, rounds=1, popular=10)  # the top reaches 0
    assert few["same_top_items"] == 20 and few["read_first"] == few["read_above_floor"] == 20


def test_the_reads_bench_reads_the_same_items_by_queries_as_by_the_iterator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every read of ``bench.reads`` on one Milvus (an embedded Lite file here; the engine in
    the bench): ours and the iterator's agree (the run fails otherwise), ours never opens an
    iterator, and a query limit below the catalogue makes the first pages narrow."""
    import argparse

    from bench import reads
    from core.config import Settings
    from services.vectors import store as store_module

    monkeypatch.setattr(store_module, "QUERY_LIMIT", 120)
    settings = Settings(
        milvus_uri=str(tmp_path / "milvus.db"), embedding_dim=8, popular_cache_size=20
    )
    args = argparse.Namespace(
        items=230, popular=10, text_chars=20, page=7, pages=3, scan_rows=50, rounds=2
    )
    result = reads.run(settings, args)
    calls = result["calls"]
    assert calls[reads.PAGES_START]["items"] == calls[reads.PAGES_MIDDLE]["items"] == 7
    assert calls[reads.LEAST_POPULAR]["items"] == 20
    assert calls[reads.SCAN_VECTORS]["items"] == calls[reads.SCAN_IDS]["items"] == 50
    for name in result["timings"]:
        assert "query_iterator" not in calls[name][reads.OURS], name
        assert calls[name][reads.ITERATOR]["query_iterator"] >= 1, name
        assert len(result["timings"][name][reads.OURS]) == 2
    # 230 items, 120 a query: a page from the start reads ids, narrows, then reads its rows
    assert calls[reads.PAGES_START][reads.OURS]["query"] >= 3 * 3
    text = reads.render(result)
    assert "230 items (10 with any popularity" in text and f"| {reads.SCAN_IDS} | 50 |" in text


def test_the_rate_limit_bench_admits_a_shared_limit_once(nats_settings: Settings) -> None:
    """Two processes under one client's limit: shared, they admit no more than the bucket
    and its refill (plus what each may hold of one lease); each on its own bucket, more
    than that."""
    import argparse

    from bench.rate_limit import BASELINE, OURS, render, run

    args = argparse.Namespace(calls=50, rates=[5.0, 200.0], processes=2, limit=50.0, seconds=1.0)
    result = run(nats_settings, args)
    most = (50.0 + 50.0 * 1.0 + 2 * 5) / 1.0  # burst + a second's refill + two leases
    assert result["admitted"][OURS]["admitted_per_s"] <= most
    assert result["admitted"][BASELINE]["admitted_per_s"] > most
    assert set(result["cost"]) == {"5", "200"} and f"| {OURS} |" in render(result)


def test_a_real_gateway_of_two_processes_admits_a_shared_limit_once(tmp_path: Path) -> None:
    """``python -m services.gateway`` with two OS processes on one port, called by sixteen
    connections of one client (all on one process with p = 2^-15): with the limit shared
    through NATS the gateway admits the bucket and its refill once (plus a lease a
    process may hold), with a bucket per process more than that."""
    import argparse

    from bench.rate_limit import BASELINE, OURS, render, run_gateways
    from ops.stack import local_stack

    args = argparse.Namespace(gateway_processes=2, channels=16, limit=20.0, seconds=2.0)
    with local_stack(Settings(), tmp_path) as stack:
        stack.start_nats()
        gateways = run_gateways(stack, args)
    most = (20.0 + 20.0 * 2.0 + 2 * 2) / 2.0  # burst + 2 s of refill + a lease per process
    admitted = {kind: a["admitted_per_s"] for kind, a in gateways["admitted"].items()}
    assert admitted[OURS] <= most < admitted[BASELINE], gateways
    assert set(gateways["admitted"][OURS]["codes"]) == {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}
    text = render(
        {
            "cost": {},
            "admitted": {},
            "processes": 2,
            "seconds": 2.0,
            "limit": 20.0,
            "calls": 0,
            "gateways": gateways,
        }
    )
    assert f"| {OURS} |" in text and "2 processes on one port" in text
