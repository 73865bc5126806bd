"""Gateway ``Recommend`` under closed-loop load, and the same pipeline in-process on PyTorch.

Load: ``concurrency`` client threads, each with its own channel, issue ``Recommend`` for a pool
of known users (round robin) with a deadline, until ``max_requests`` were issued or
``max_seconds`` passed. Client-side latency is exact; per-stage quantiles come from the
gateway's ``recsys_stage_seconds`` histogram (bucket deltas of a scrape before and after) and
Triton's own per-model queue/compute counters.

Baseline: the gateway's :class:`~services.recommend.pipeline.Pipeline` as the cross-encoder
pipeline (same Milvus, same retrieval, 30 candidates, same MMR) with the cross-encoder
swapped for the ranker in PyTorch in this process, one request at a time, no batching
across requests, no Triton. Its inputs are tokenized with the release's own
``tokenizer.json`` and the Triton tokenizer's settings (:class:`~bench.tokens.TokenizerSpec`),
so both score the same token ids.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import grpc
import numpy as np

from bench import metrics
from bench.tokens import TokenizerSpec, encode
from bench.util import load_average, quantiles
from core.config import Settings
from ops.stack import OWN_CONNECTION, LocalStack
from services.api import pb, pb_grpc

STAGES = ("profile", "retrieval", "ranking", "diversify", "explain")


def known_users(settings: Settings, limit: int, seed: int = 0) -> list[str]:
    """Users with more than ``cold_start_events`` items of history (they get the ranker)."""
    from services.vectors.store import VectorStore

    store = VectorStore(settings)
    try:
        rows = store.scan(store.users.name, ["user_id", "recent_items"])
    finally:
        store.close()
    warm = sorted(r["user_id"] for r in rows if len(r["recent_items"]) > settings.cold_start_events)
    rng = np.random.default_rng(seed)
    return [str(u) for u in rng.permutation(warm)[:limit]]


@dataclass
class LoadResult:
    concurrency: int
    wall_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)  # OK answers
    ranked_latencies_s: list[float] = field(default_factory=list)  # OK and not degraded
    codes: Counter[str] = field(default_factory=Counter)
    degraded: Counter[str] = field(default_factory=Counter)
    stages: dict[str, dict[str, float]] = field(default_factory=dict)
    triton: dict[str, dict[str, float]] = field(default_factory=dict)
    load_average: list[list[float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        ok = len(self.latencies_s)
        ranked = len(self.ranked_latencies_s)
        lat = {k: v * 1000 for k, v in quantiles(self.ranked_latencies_s).items()}
        return {
            "concurrency": self.concurrency,
            "requests": sum(self.codes.values()),
            "ok": ok,
            "ranked": ranked,
            "codes": dict(self.codes),
            "degraded": dict(self.degraded),
            "wall_s": self.wall_s,
            "qps_ok": ok / self.wall_s if self.wall_s else 0.0,
            "qps_ranked": ranked / self.wall_s if self.wall_s else 0.0,
            "latency_ms": lat,
            "latency_ms_all_ok": {k: v * 1000 for k, v in quantiles(self.latencies_s).items()},
            "p99_over_p50": lat["p99"] / lat["p50"] if lat["p50"] else float("nan"),
            "stages_ms": self.stages,
            "triton": self.triton,
            "load_average": self.load_average,
        }


def run_load(
    stack: LocalStack,
    users: Sequence[str],
    concurrency: int,
    max_requests: int,
    max_seconds: float,
    deadline_s: float,
    k: int = 10,
) -> LoadResult:
    """One closed-loop window with the gateway's and Triton's metrics around it."""
    result = LoadResult(concurrency)
    with scraped(stack, result):
        drive(stack, users, result, max_requests, max_seconds, deadline_s, k)
    return result


@contextlib.contextmanager
def scraped(stack: LocalStack, result: LoadResult) -> Iterator[None]:
    """Stage quantiles and Triton per-model stats of what ran inside the block."""
    gw_before = metrics.scrape(stack.ports.gateway_metrics)
    tr_before = metrics.scrape(stack.ports.triton_metrics)
    yield
    gw = metrics.delta(gw_before, metrics.scrape(stack.ports.gateway_metrics))
    tr = metrics.delta(tr_before, metrics.scrape(stack.ports.triton_metrics))
    for stage in STAGES:
        q = metrics.histogram_quantiles(gw, "recsys_stage_seconds", {"stage": stage})
        result.stages[stage] = {k: v * 1000 if k != "count" else v for k, v in q.items()}
    q = metrics.histogram_quantiles(gw, "recsys_request_seconds", {"method": "Recommend"})
    result.stages["rpc"] = {k: v * 1000 if k != "count" else v for k, v in q.items()}
    result.triton = metrics.triton_model_stats(tr)


def drive(
    stack: LocalStack,
    users: Sequence[str],
    result: LoadResult,
    max_requests: int,
    max_seconds: float,
    deadline_s: float,
    k: int = 10,
) -> None:
    """Closed-loop load at ``result.concurrency``, added to ``result``; bounded by request
    count and wall time (in-flight calls then finish, within their deadline).

    Calls the gateway sheds at once (``RESOURCE_EXHAUSTED``: more than ``max_in_flight``
    waiting) are counted by code but not against ``max_requests``. Each client thread has
    its own connection (:data:`ops.stack.OWN_CONNECTION`), as separate clients have: until
    2026-12-06 all 16 threads' calls went over one."""
    lock = threading.Lock()
    issued = 0
    offset = sum(result.codes.values())  # later windows continue through the user pool
    stop_at = time.monotonic() + max_seconds

    def next_user() -> str | None:
        nonlocal issued
        with lock:
            if issued >= max_requests or time.monotonic() >= stop_at:
                return None
            issued += 1
            return users[(offset + issued) % len(users)]

    def worker() -> None:
        nonlocal issued
        with grpc.insecure_channel(stack.gateway_target, options=OWN_CONNECTION) as channel:
            stub = pb_grpc.RecommenderServiceStub(channel)
            while (user := next_user()) is not None:
                t0 = time.perf_counter()
                try:
                    reply = stub.Recommend(
                        pb.RecommendRequest(user_id=user, k=k), timeout=deadline_s
                    )
                except grpc.RpcError as exc:
                    code = cast(grpc.Call, exc).code().name
                    with lock:
                        result.codes[code] += 1
                        if code == "RESOURCE_EXHAUSTED":
                            issued -= 1  # shed by the gateway: not a served request
                    if code in ("UNAVAILABLE", "RESOURCE_EXHAUSTED"):
                        time.sleep(0.05)  # a real client backs off a little
                    continue
                elapsed = time.perf_counter() - t0
                with lock:
                    result.codes["OK"] += 1
                    result.latencies_s.append(elapsed)
                    if reply.degraded:
                        result.degraded[reply.degraded_reason.split(":")[0]] += 1
                    else:
                        result.ranked_latencies_s.append(elapsed)

    result.load_average.append(load_average())
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(result.concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max_seconds + deadline_s + 30)
    result.wall_s += time.perf_counter() - start
    result.load_average.append(load_average())


# --- in-process PyTorch baseline ---------------------------------------------------------
class TorchScorer:
    """``TritonClient.score`` semantics on the PyTorch ranker: one forward per request."""

    def __init__(self, ranker_dir: str, spec: TokenizerSpec, threads: int = 2) -> None:
        import torch

        from training.models.ranker import load_scorer

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = load_scorer(ranker_dir)
        self.tokenizer = spec.tokenizer(pairs=True)

    def score(
        self,
        query: str,
        documents: Sequence[str],
        timeout_s: float,
        version: str | None = None,
        *_: object,
        **__: object,
    ) -> np.ndarray:
        """One forward over all candidates; ``timeout_s``/``version`` have no meaning here."""
        feeds = encode(self.tokenizer, [query] * len(documents), list(documents))
        with self.torch.inference_mode():
            _, prob = self.model(**{k: self.torch.from_numpy(v) for k, v in feeds.items()})
        return prob.reshape(-1).numpy()


@dataclass
class BaselineResult:
    latencies_s: list[float] = field(default_factory=list)
    stages: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in STAGES})
    ranked: int = 0
    wall_s: float = 0.0
    same_top_k: int = 0
    compared: int = 0
    load_average: list[list[float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        n = len(self.latencies_s)
        return {
            "requests": n,
            "ranked": self.ranked,
            "wall_s": self.wall_s,
            "qps": n / self.wall_s if self.wall_s else 0.0,
            "latency_ms": {k: v * 1000 for k, v in quantiles(self.latencies_s).items()},
            "stages_ms": {
                s: {k: v * 1000 for k, v in quantiles(t).items()} for s, t in self.stages.items()
            },
            "same_top_k_as_gateway": f"{self.same_top_k}/{self.compared}",
            "load_average": self.load_average,
        }


class Baseline:
    """The gateway's pipeline in this process with the PyTorch ranker, one call at a time."""

    def __init__(self, stack: LocalStack, ranker_dir: str, spec: TokenizerSpec) -> None:
        from services.inference.triton_client import TritonClient
        from services.recommend.pipeline import Pipeline
        from services.recommend.rank import Rankers, RankerStatus
        from services.recommend.retrieve import PopularItems
        from services.vectors.store import VectorStore

        self.stack = stack
        # the cross-encoder pipeline (bench.pipelines): 30 candidates, each scored by it
        settings = stack.settings.model_copy(
            update={"rank_candidates": 30, "cross_encoder_top": 30}
        )
        self.store = VectorStore(settings)
        popular = PopularItems(settings.popular_cache_size)
        for _ in range(5):  # a fresh pymilvus connection to Milvus Lite sometimes fails once
            if popular.refresh(self.store):
                break
            time.sleep(1.0)
        else:
            raise RuntimeError("could not read the popular items from Milvus")
        scorer = TorchScorer(ranker_dir, spec)
        ready = Rankers(cross_encoder=RankerStatus(deployed=True, ready=True))
        self.pipeline = Pipeline(
            settings, self.store, cast(TritonClient, scorer), popular, lambda _: ready
        )
        self.result = BaselineResult()

    def close(self) -> None:
        self.store.close()

    def call(self, user: str, k: int = 10) -> Any:
        from services.deadline import Deadline
        from services.recommend.context import Filters

        return self.pipeline.recommend(user, k, Filters(), Deadline.after(600.0))

    def compare(self, users: Sequence[str], k: int = 10) -> None:
        """Same top-k as the gateway? (ORT and PyTorch scores differ by rounding only.)"""
        self.call(users[0])  # warm-up
        with grpc.insecure_channel(self.stack.gateway_target) as channel:
            stub = pb_grpc.RecommenderServiceStub(channel)
            for user in users:
                reply = stub.Recommend(pb.RecommendRequest(user_id=user, k=k), timeout=300)
                mine = [c.item_id for c in self.call(user, k).items]
                self.result.compared += 1
                self.result.same_top_k += int(mine == [s.item.item_id for s in reply.items])

    def window(self, users: Sequence[str], max_requests: int, max_seconds: float) -> float:
        """Sequential calls until a bound; adds to ``self.result``; returns this window's QPS."""
        result = self.result
        result.load_average.append(load_average())
        offset = len(result.latencies_s)
        start = time.perf_counter()
        n = 0
        for i in range(max_requests):
            t0 = time.perf_counter()
            rec = self.call(users[(offset + i) % len(users)])
            result.latencies_s.append(time.perf_counter() - t0)
            result.ranked += int(rec.ranked)
            for stage in STAGES:
                result.stages[stage].append(rec.timings.get(stage, 0.0))
            n += 1
            if time.perf_counter() - start >= max_seconds:
                break
        wall = time.perf_counter() - start
        result.wall_s += wall
        result.load_average.append(load_average())
        return n / wall
