"""Prometheus scrapes of the gateway and of Triton, and quantiles from histogram deltas."""

from __future__ import annotations

import math
import urllib.request
from collections.abc import Mapping

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int, timeout: float = 5.0) -> Samples:
    """Every sample of ``http://127.0.0.1:<port>/metrics`` keyed by (name, labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as reply:
        text = reply.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            # the parser appends _total to counters; keep the names as the server wrote them
            name = s.name.removesuffix("_total") if family.type == "counter" else s.name
            out[(name, frozenset(s.labels.items()))] = float(s.value)
    return out


def delta(before: Samples, after: Samples) -> Samples:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def _match(labels: frozenset[tuple[str, str]], want: Mapping[str, str]) -> bool:
    d = dict(labels)
    return all(d.get(k) == v for k, v in want.items())


def histogram_quantiles(
    samples: Samples, metric: str, want: Mapping[str, str], qs: tuple[float, ...] = (50, 95, 99)
) -> dict[str, float]:
    """``histogram_quantile`` of Prometheus: linear interpolation inside the bucket.

    Only as precise as the buckets (the gateway's are 2, 5, 10, 25, 50, 100, 250, 500 ms,
    1, 2.5, 5 s); a quantile beyond the last finite bound is ``inf`` (``"> 5 s"``).
    """
    buckets = sorted(
        (float(dict(labels)["le"]), value)
        for (name, labels), value in samples.items()
        if name == f"{metric}_bucket" and _match(labels, want)
    )
    out: dict[str, float] = {}
    total = buckets[-1][1] if buckets else 0.0
    for q in qs:
        key = f"p{q:g}"
        if total <= 0:
            out[key] = float("nan")
            continue
        rank = q / 100 * total
        lower_bound, lower_count = 0.0, 0.0
        for bound, count in buckets:
            if count >= rank:
                if math.isinf(bound):
                    out[key] = math.inf
                else:
                    share = (rank - lower_count) / max(count - lower_count, 1e-12)
                    out[key] = lower_bound + (bound - lower_bound) * share
                break
            lower_bound, lower_count = bound, count
    out["count"] = total
    out["last_bound"] = max((b for b, _ in buckets if not math.isinf(b)), default=math.nan)
    return out


def triton_model_stats(samples: Samples) -> dict[str, dict[str, float]]:
    """Per model: requests, inferences, executions (batches), mean queue/compute µs."""
    names = {
        "nv_inference_request_success": "requests",
        "nv_inference_count": "inferences",
        "nv_inference_exec_count": "executions",
        "nv_inference_queue_duration_us": "queue_us",
        "nv_inference_compute_input_duration_us": "input_us",
        "nv_inference_compute_infer_duration_us": "infer_us",
        "nv_inference_compute_output_duration_us": "output_us",
        "nv_inference_request_duration_us": "request_us",
    }
    per: dict[str, dict[str, float]] = {}
    for (name, labels), value in samples.items():
        if name in names:
            model = dict(labels).get("model", "?")
            entry = per.setdefault(model, {})
            entry[names[name]] = entry.get(names[name], 0.0) + value
    out = {}
    for model, e in per.items():
        requests = e.get("requests", 0.0)
        if requests <= 0:
            continue
        out[model] = {
            "requests": requests,
            "inferences": e.get("inferences", 0.0),
            "executions": e.get("executions", 0.0),
            "mean_batch": e.get("inferences", 0.0) / max(e.get("executions", 0.0), 1.0),
            "mean_queue_ms": e.get("queue_us", 0.0) / requests / 1000,
            "mean_compute_ms": (
                e.get("input_us", 0.0) + e.get("infer_us", 0.0) + e.get("output_us", 0.0)
            )
            / requests
            / 1000,
            "mean_request_ms": e.get("request_us", 0.0) / requests / 1000,
        }
    return out
