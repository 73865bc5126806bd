"""Prometheus metrics of the gateway, served on ``RECSYS_METRICS_PORT`` at ``/metrics``.

Requests by RPC and status code come from a server interceptor, so every path (including
validation errors and aborts) is counted; each pipeline stage observes its own latency as it
ends (:func:`observe_stage`), candidate counts and degraded answers come from the answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc
from prometheus_client import Counter, Histogram, start_http_server

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

REQUESTS = Counter("recsys_requests_total", "RPCs answered", ["method", "code"])
LATENCY = Histogram(
    "recsys_request_seconds", "End-to-end RPC latency", ["method"], buckets=LATENCY_BUCKETS
)
STAGE_LATENCY = Histogram(
    "recsys_stage_seconds",
    "Recommend latency per pipeline stage (profile, retrieval, ranking, diversify, explain)",
    ["stage"],
    buckets=LATENCY_BUCKETS,
)
MILVUS_SECONDS = Histogram(
    "recsys_milvus_seconds",
    "Milvus time per Recommend: the summed wall time of its vector-store calls, in total "
    "(call=all) and per store method",
    ["call"],
    buckets=(0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 1, 5),
)
CANDIDATES = Histogram(
    "recsys_candidates", "Candidates after retrieval fusion", buckets=(0, 5, 10, 25, 50, 100, 200)
)
DEGRADED = Counter("recsys_degraded_total", "Degraded answers", ["component"])


def start_metrics_server(port: int, host: str) -> None:
    """Serve /metrics; port 0 turns metrics off."""
    if port:
        start_http_server(port, addr=host)


def observe_stage(stage: str, seconds: float) -> None:
    """One ``Recommend`` stage's latency, called by the stage as it ends; ``milvus`` (the
    request's time in Milvus calls, across stages) and ``milvus.<method>`` (its share per
    store method) go to their own, finer histogram."""
    if stage == "milvus":
        MILVUS_SECONDS.labels("all").observe(seconds)
    elif stage.startswith("milvus."):
        MILVUS_SECONDS.labels(stage.removeprefix("milvus.")).observe(seconds)
    else:
        STAGE_LATENCY.labels(stage).observe(seconds)


def record_recommendation(candidates: int, degraded: list[str]) -> None:
    """What the finished answer says: candidates after fusion, why it degraded."""
    CANDIDATES.observe(candidates)
    for reason in degraded:
        DEGRADED.labels(reason.split(" ", 1)[0]).inc()


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts every RPC by method and final status code and times it."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        if handler.unary_unary is not None:
            inner = handler.unary_unary
            return grpc.unary_unary_rpc_method_handler(
                _timed(method, inner),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary is not None:
            inner = handler.stream_unary
            return grpc.stream_unary_rpc_method_handler(
                _timed(method, inner),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


def _timed(method: str, inner: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
    def wrapper(request: Any, context: grpc.ServicerContext) -> Any:
        start = time.perf_counter()
        code = "OK"
        try:
            response = inner(request, context)
            code_now = context.code()  # type: ignore[attr-defined]
            if code_now is not None:
                code = code_now.name
            return response
        except Exception:
            code_now = context.code()  # type: ignore[attr-defined]
            code = code_now.name if code_now is not None else "UNKNOWN"
            raise
        finally:
            REQUESTS.labels(method, code).inc()
            LATENCY.labels(method).observe(time.perf_counter() - start)

    return wrapper
