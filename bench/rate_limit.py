"""A client's rate limit kept per gateway process against one shared by all of them.

``python -m bench.rate_limit`` (``make bench-limits``) starts a real nats-server on free
loopback ports and measures, side by side in one run:

* **what a call's check costs**: :class:`TokenBuckets` (the per-process bucket, the
  baseline) against :class:`SharedBuckets` (one bucket per client in NATS, spent by
  compare-and-set leases) at a low rate (each call writes a lease of one token) and a high
  one (a lease covers a tenth of a second's calls); the bucket is large enough that no call
  is refused;
* **what the limit admits**: ``--processes`` processes (each its own NATS connection, as
  gateway processes have) call as fast as they can for ``--seconds`` seconds under one
  client's limit; per process, each admits the limit, shared, all of them together do;
* **what a real gateway admits**: ``python -m services.gateway`` with
  ``--gateway-processes`` OS processes on one port (``SO_REUSEPORT``), started once with
  ``RECSYS_RATE_LIMIT_SHARED=false`` and once with it true, called by ``--channels``
  connections of one client (the kernel spreads them over the processes) as fast as they
  answer, for ``--seconds`` seconds. The calls are ``Recommend`` with ``k`` out of range,
  so an admitted call answers ``INVALID_ARGUMENT`` at once and a refused one
  ``RESOURCE_EXHAUSTED``: the limit is checked before the request is, and the figures are the
  limit's, not the pipeline's (Triton and Milvus are not started).

A table is printed and written with the raw figures (``--json``).
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, cast

import grpc
import numpy as np

from bench.util import fmt, load_average, publish, table
from core.config import Settings
from core.paths import REPO_ROOT
from ops.processes import gateway_process
from ops.stack import OWN_CONNECTION, LocalStack, gateway_serving, local_stack
from services.api import pb, pb_grpc
from services.events.log import BlockingEventLog
from services.reliability.ratelimit import SharedBuckets, TokenBuckets

BASELINE = "per process"
OURS = "shared (NATS)"
BUCKET = "bench_rate_limits"


def buckets(
    kind: str, events: BlockingEventLog, rate: float, burst: int
) -> TokenBuckets | SharedBuckets:
    local = TokenBuckets(rate, burst)
    return local if kind == BASELINE else SharedBuckets(events, BUCKET, local)


def check_cost(events: BlockingEventLog, rate: float, calls: int) -> dict[str, dict[str, float]]:
    """Microseconds per granted check, per kind (a bucket no call empties)."""
    out = {}
    for kind in (BASELINE, OURS):
        b, client = buckets(kind, events, rate, 10**9), f"cost-{rate:g}-{kind}"
        for _ in range(200):  # warm: the KV bucket created, the first lease written
            b.take(client)
        times = np.empty(calls)
        for i in range(calls):
            t0 = time.perf_counter()
            if b.take(client) != 0.0:
                raise RuntimeError("a check was refused: the bucket should never empty")
            times[i] = time.perf_counter() - t0
        us = times * 1e6
        out[kind] = {
            "mean_us": float(us.mean()),
            "p50_us": float(np.percentile(us, 50)),
            "p99_us": float(np.percentile(us, 99)),
        }
    return out


def admitted(
    logs: list[BlockingEventLog], kind: str, rate: float, seconds: float
) -> dict[str, Any]:
    """Calls admitted per second, in all, when every process calls as fast as it can."""
    client = f"admit-{kind}-{time.monotonic()}"
    per = [buckets(kind, events, rate, int(rate)) for events in logs]
    counts = [0] * len(logs)
    start = time.monotonic() + 0.2

    def hammer(i: int) -> None:
        while time.monotonic() < start:
            time.sleep(0.001)
        while time.monotonic() < start + seconds:
            if per[i].take(client) == 0.0:
                counts[i] += 1
            else:
                time.sleep(0.001)

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(len(logs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # the bucket starts full: a burst of ``rate`` comes on top of ``rate`` per second
    return {"admitted_per_s": sum(counts) / seconds, "per_process": [c / seconds for c in counts]}


def gateway_admitted(stack: LocalStack, kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """Recommend calls a real gateway of ``args.gateway_processes`` processes admitted per
    second, and the status codes of all calls, under one client's limit."""
    env = stack.env() | {
        "RECSYS_GATEWAY_PROCESSES": str(args.gateway_processes),
        "RECSYS_RATE_LIMIT_RPS": f"{args.limit:g}",
        "RECSYS_RATE_LIMIT_BURST": str(int(args.limit)),
        "RECSYS_RATE_LIMIT_SHARED": str(kind == OURS).lower(),
        "RECSYS_RATE_LIMIT_BUCKET": f"bench_gateway_{time.time_ns()}",
    }
    log = f"gateway-{'shared' if kind == OURS else 'per-process'}.log"
    proc = gateway_process(env, stack.var_dir, log).start()
    try:  # each check a new connection: 8 per process all answered leave none unasked
        checks = 8 * args.gateway_processes
        proc.wait_ready(lambda: all(answers(stack.gateway_target) for _ in range(checks)), 90)
        codes = call_gateway(stack.gateway_target, args.channels, args.seconds)
    finally:
        proc.stop()
    refused = codes.get("RESOURCE_EXHAUSTED", 0)
    return {"admitted_per_s": (sum(codes.values()) - refused) / args.seconds, "codes": codes}


def answers(target: str) -> bool:
    """Whether the gateway's health service answers (NOT_SERVING included: no Triton)."""
    try:
        gateway_serving(target)
    except grpc.RpcError:
        return False
    return True


def call_gateway(target: str, channels: int, seconds: float) -> dict[str, int]:
    """``Recommend`` (``k`` out of range) from ``channels`` connections of one client (one
    host) as fast as the gateway answers, for ``seconds``: the count of each status code."""
    counts: Counter[str] = Counter()
    lock = threading.Lock()
    start = time.monotonic() + 0.5

    def hammer() -> None:
        mine: Counter[str] = Counter()
        with grpc.insecure_channel(target, options=OWN_CONNECTION) as channel:
            stub = pb_grpc.RecommenderServiceStub(channel)
            grpc.channel_ready_future(channel).result(timeout=10)
            while time.monotonic() < start:
                time.sleep(0.001)
            while time.monotonic() < start + seconds:
                try:
                    stub.Recommend(pb.RecommendRequest(user_id="bench", k=-1), timeout=5)
                    mine["OK"] += 1
                except grpc.RpcError as exc:
                    mine[cast(grpc.Call, exc).code().name] += 1
        with lock:
            counts.update(mine)

    threads = [threading.Thread(target=hammer) for _ in range(channels)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return dict(counts)


def run(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    logs = [BlockingEventLog(settings, f"bench-{i}") for i in range(args.processes)]
    try:
        for events in logs:
            if not events.wait_connected(30):
                raise RuntimeError("nats-server did not answer")
        load_before = load_average()
        cost = {f"{rate:g}": check_cost(logs[0], rate, args.calls) for rate in args.rates}
        admit = {kind: admitted(logs, kind, args.limit, args.seconds) for kind in (BASELINE, OURS)}
    finally:
        for events in logs:
            events.close()
    return {
        "calls": args.calls,
        "rates": args.rates,
        "processes": args.processes,
        "limit": args.limit,
        "seconds": args.seconds,
        "cost": cost,
        "admitted": admit,
        "load_average": [load_before, load_average()],
    }


def run_gateways(stack: LocalStack, args: argparse.Namespace) -> dict[str, Any]:
    """What a real gateway of several processes admits, per-process buckets then shared."""
    load_before = load_average()
    by_kind = {kind: gateway_admitted(stack, kind, args) for kind in (BASELINE, OURS)}
    return {
        "processes": args.gateway_processes,
        "channels": args.channels,
        "admitted": by_kind,
        "load_average": [load_before, load_average()],
    }


def render(result: dict[str, Any]) -> str:
    rows = []
    for rate, by_kind in result["cost"].items():
        base = by_kind[BASELINE]["mean_us"]
        for kind, c in by_kind.items():
            ratio = fmt(c["mean_us"] / base, 1) + "x"
            rows.append(
                [rate, kind, fmt(c["mean_us"], 1), fmt(c["p50_us"], 1), fmt(c["p99_us"], 1), ratio]
            )
    cost = table(
        ["limit (calls/s)", "bucket", "mean µs", "p50 µs", "p99 µs", "mean vs per process"], rows
    )
    n, limit = result["processes"], result["limit"]
    admit = table(
        ["bucket", "admitted calls/s, all processes", "per process"],
        [
            [kind, fmt(a["admitted_per_s"], 0), " / ".join(fmt(x, 0) for x in a["per_process"])]
            for kind, a in result["admitted"].items()
        ],
    )
    return (
        f"A check's cost ({result['calls']:,} granted checks per row, nats-server on loopback):"
        f"\n\n{cost}\n\n{n} processes calling as fast as they can for {result['seconds']:g} s "
        f"under one client's limit of {limit:g} calls/s (burst {limit:g}, full at the start):"
        f"\n\n{admit}"
    ) + _render_gateways(result)


def _render_gateways(result: dict[str, Any]) -> str:
    gateways = result.get("gateways")
    if not gateways:
        return ""
    rows = [
        [kind, fmt(a["admitted_per_s"], 0), ", ".join(f"{c} {n}" for c, n in a["codes"].items())]
        for kind, a in gateways["admitted"].items()
    ]
    return (
        f"\n\nA real gateway, {gateways['processes']} processes on one port, called by "
        f"{gateways['channels']} connections of one client for {result['seconds']:g} s under a "
        f"limit of {result['limit']:g} calls/s (burst {result['limit']:g}):\n\n"
        + table(["bucket", "admitted calls/s, the gateway", "status codes"], rows)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rate_limit", description=__doc__)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--rates", type=float, nargs="+", default=[5.0, 200.0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--limit", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument(
        "--gateway-processes", type=int, default=2, help="0: no real gateway is started"
    )
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument(
        "--json", type=Path, default=REPO_ROOT / "reports" / "bench_rate_limit.json"
    )
    args = parser.parse_args(argv)
    with (
        tempfile.TemporaryDirectory(prefix="rate-limit-") as tmp,
        local_stack(Settings(), Path(tmp)) as stack,
    ):
        stack.start_nats()
        result = run(stack.settings, args)
        if args.gateway_processes:
            result["gateways"] = run_gateways(stack, args)
    publish(result, render(result), args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
