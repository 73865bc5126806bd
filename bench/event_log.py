"""Event-log figures through the real gateway: acknowledged ingest events/s and apply lag.

``python -m bench.event_log`` starts the whole local stack (Milvus Lite, or the real engine
with ``--milvus engine``; tritonserver with the bench release; nats-server) with a MovieLens
slice indexed, three gateway replicas and profile workers as their own processes, then, from
``--clients`` client threads calling ``IngestEvents`` round-robin over the replicas:

1. *acknowledged*: ``--events`` events in calls of 100, as fast as the replicas acknowledge
   them (no worker running: the log's and the gateways' capacity alone; ``OK`` = durable,
   ``RECSYS_INGEST_WAIT_APPLIED_S=0``), beside the previous figure's path (as many events
   published straight to JetStream from as many connections as replicas, no gateway);
2. *backlog*: one worker started on both backlogs: applied events/s until every profile
   holds its events;
3. *paced*: ``--rate`` events/s offered for ``--seconds`` (calls of ``--call-events``,
   spaced evenly): the apply lag of each acknowledged call, from its acknowledgement to the
   moment its user's row in Milvus (Strong read, as the gateway's ``GetUserProfile``/
   ``Recommend`` read it) holds its events, p50/p99, and the applied rate; with the former
   worker behaviour (``RECSYS_WORKER_REENCODE_APART=0``: every apply re-encodes its users,
   the baseline), then ours with 1 and 2 workers;
4. *new users*: the same pace for ``--new-seconds``, every event from one of
   ``--new-users`` users seen for the first time (a launch, a crawl, a campaign), with the
   former worker (each new user encoded in its apply, 16 per Triton request) and ours (a new
   user's first vector is its history's mean item vector, re-encoded later like the rest).

In the paced phases, *profile lag*: every fifth call, one of its users' ``GetUserProfile``
through the gateways until the profile holds that user's acknowledged events (the gateway
folds the events no worker applied yet into the row it reads), stamped at the reply; the
apply lag is the same calls' lag to the Milvus row, which is what a profile read saw before
the gateway folded in pending events (the baseline of this column).

The workers re-encode users with the real user tower on Triton. The lag is polled every 50
ms (one Strong Milvus query for every user still waiting) and a call counts from the start of
the poll that found it, so it is at most one pause and one poll late. Results are printed as
JSON and, with ``--out``, written as a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import json
import os
import shutil
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from pymilvus import MilvusClient

from bench.util import quantiles
from core.config import REPO_ROOT
from ops.processes import ManagedProcess, free_port, gateway_process
from ops.stack import LocalStack, gateway_serving
from services.api import pb, pb_grpc

POLL_S = 0.05
PROFILE_PROBE_EVERY = 5  # paced calls per GetUserProfile probe (10 probes/s at the defaults)


@dataclass
class Ledger:
    """Per user: events acknowledged so far and, per call, (events up to it, ack time)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    acked: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    calls: dict[str, list[tuple[int, float]]] = field(default_factory=lambda: defaultdict(list))
    errors: int = 0

    def ack(self, events: list[pb.Event], at: float, base: dict[str, int]) -> None:
        with self.lock:
            for e in events:
                self.acked[e.user_id] += 1
            for user in {e.user_id for e in events}:
                self.calls[user].append((base.get(user, 0) + self.acked[user], at))


def make_events(run: str, n: int, users: list[str], items: list[str]) -> list[pb.Event]:
    rng = np.random.default_rng(abs(hash(run)) % 2**32)
    return [
        pb.Event(
            user_id=users[i % len(users)],
            item_id=items[int(rng.integers(len(items)))],
            event_type=pb.EVENT_TYPE_CLICK,
            idempotency_key=f"{run}-{i}",
        )
        for i in range(n)
    ]


def ingest(
    targets: list[str],
    calls: list[list[pb.Event]],
    clients: int,
    ledger: Ledger,
    base: dict[str, int],
    rate: float = 0.0,
    on_ack: Callable[[int, list[pb.Event], float], None] | None = None,
) -> float:
    """Send the calls from ``clients`` threads round-robin over ``targets`` (a failed call is
    retried with the same events on the next replica); all at once, or paced to ``rate``
    events/s; ``on_ack(n, call, at)`` after each acknowledged call. Returns the wall time."""
    channels = [grpc.insecure_channel(t) for t in targets]
    stubs = [pb_grpc.RecommenderServiceStub(c) for c in channels]
    per_call = max(1, len(calls[0])) if calls else 1
    started = time.monotonic()
    lock = threading.Lock()
    cursor = [0]

    def client(index: int) -> None:
        while True:
            with lock:
                n = cursor[0]
                cursor[0] += 1
            if n >= len(calls):
                return
            if rate:
                time.sleep(max(0.0, started + n * per_call / rate - time.monotonic()))
            for attempt in range(20):
                stub = stubs[(n + index + attempt) % len(stubs)]
                try:
                    stub.IngestEvents(pb.IngestEventsRequest(events=calls[n]), timeout=10)
                    at = time.monotonic()
                    ledger.ack(calls[n], at, base)
                    if on_ack is not None:
                        on_ack(n, calls[n], at)
                    break
                except grpc.RpcError:
                    with ledger.lock:
                        ledger.errors += 1
                    time.sleep(0.1)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - started
    for c in channels:
        c.close()
    return wall


def history_sizes(milvus: MilvusClient, collection: str, users: list[str]) -> dict[str, int]:
    if not users:
        return {}
    ids = ", ".join(json.dumps(u) for u in users)
    rows = milvus.query(
        collection,
        filter=f"user_id in [{ids}]",
        output_fields=["user_id", "history_size"],
        consistency_level="Strong",
    )
    return {str(r["user_id"]): int(r["history_size"]) for r in rows}


@dataclass
class Probe:
    """What the lag poll saw besides the lag: its own cost, and the workers' consumer."""

    monitor_port: int = 0
    polls: list[float] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)  # consumer: not delivered + not acked
    _at: float = 0.0

    def sample(self) -> None:
        if not self.monitor_port or time.monotonic() - self._at < 1.0:
            return
        self._at = time.monotonic()
        url = f"http://127.0.0.1:{self.monitor_port}/jsz?consumers=true"
        with urllib.request.urlopen(url, timeout=2) as reply:
            jsz = json.load(reply)
        for account in jsz.get("account_details", []):
            for stream in account.get("stream_detail", []):
                for consumer in stream.get("consumer_detail") or []:
                    if consumer.get("name") == "profile-worker":
                        self.pending.append(
                            int(consumer.get("num_pending", 0))
                            + int(consumer.get("num_ack_pending", 0))
                        )

    def summary(self) -> dict[str, float]:
        return {
            "poll_mean_s": round(float(np.mean(self.polls)), 3) if self.polls else 0.0,
            "consumer_pending_mean": round(float(np.mean(self.pending)), 1)
            if self.pending
            else 0.0,
            "consumer_pending_max": max(self.pending, default=0),
        }


class ProfileProbe:
    """The lag as a client sees it: after every ``every``-th acknowledged call, one of its
    users' ``GetUserProfile`` through the gateways (round-robin, as a client's next call
    would land; each probe on its own thread) until the profile holds that user's
    acknowledged events. Stamped at the reply that showed them, so each lag includes that
    read (an upper bound). The gateway reads the Milvus row and folds in the events the
    workers have not applied yet."""

    def __init__(
        self, targets: list[str], ledger: Ledger, base: dict[str, int], every: int
    ) -> None:
        self.channels = [grpc.insecure_channel(t) for t in targets]
        self.stubs = [pb_grpc.RecommenderServiceStub(c) for c in self.channels]
        self.ledger, self.base, self.every = ledger, base, every
        self.pool = ThreadPoolExecutor(max_workers=16)
        self.probes: list[Future[float | None]] = []
        self.reads: list[float] = []  # every GetUserProfile's own time

    def on_ack(self, n: int, call: list[pb.Event], at: float) -> None:
        if n % self.every == 0 and call:
            user = call[(n // self.every) % len(call)].user_id  # across the call's users
            with self.ledger.lock:
                expected = self.base.get(user, 0) + self.ledger.acked[user]
            self.probes.append(self.pool.submit(self._probe, n, user, expected, at))

    def _probe(self, n: int, user: str, expected: int, at: float) -> float | None:
        """The lag, or None when the profile did not show the events within 30 s."""
        for turn in itertools.count(n):
            started = time.monotonic()
            try:
                request = pb.GetUserProfileRequest(user_id=user)
                size = (
                    self.stubs[turn % len(self.stubs)]
                    .GetUserProfile(request, timeout=5)
                    .history_size
                )
            except grpc.RpcError:
                size = 0
            now = time.monotonic()
            self.reads.append(now - started)
            if size >= expected:
                return now - at
            if now > at + 30.0:
                return None
            time.sleep(0.005)
        return None

    def summary(self) -> dict[str, float | int]:
        found = [f.result() for f in self.probes]
        self.pool.shutdown()
        for channel in self.channels:
            channel.close()
        lags = [lag for lag in found if lag is not None]
        lag, read = quantiles(lags, (50, 99)), quantiles(self.reads, (50,))
        return {
            "profile_lag_p50_s": round(lag["p50"], 3),
            "profile_lag_p99_s": round(lag["p99"], 3),
            "profile_read_p50_s": round(read["p50"], 3),
            "profile_probes": len(lags),
            "profile_probes_missed": len(found) - len(lags),
        }


def track_lag(
    milvus: MilvusClient,
    collection: str,
    ledger: Ledger,
    running: Callable[[], bool],
    timeout: float,
    probe: Probe | None = None,
) -> tuple[list[float], float]:
    """Poll until every acknowledged call is visible (or ``timeout``); the lag of each call
    and the time the last one became visible.

    A call counts as visible at the *start* of the first poll that found it: a Strong read
    sees every write made before it was sent. On the Milvus engine that read waits for the
    next time tick (~0.2-0.3 s, against ~0.05 s on Milvus Lite), and stamping its return
    instead would add the probe's own wait to every lag."""
    lags: list[float] = []
    last = time.monotonic()
    end = time.monotonic() + timeout
    probe = probe or Probe()
    while time.monotonic() < end:
        with ledger.lock:
            waiting = [u for u, c in ledger.calls.items() if c]
        if not waiting and not running():
            break
        polled = time.monotonic()
        sizes = history_sizes(milvus, collection, waiting)
        now = time.monotonic()
        probe.polls.append(now - polled)
        probe.sample()
        with ledger.lock:
            for user in waiting:
                calls = ledger.calls[user]
                while calls and calls[0][0] <= sizes.get(user, 0):
                    lags.append(max(polled - calls.pop(0)[1], 0.0))  # acked mid-poll: 0
                    last = polled
        time.sleep(POLL_S)
    return lags, last


def publish_direct(
    stack: LocalStack, events: list[pb.Event], connections: int, ledger: Ledger
) -> float:
    """The previous figure's path: 100 events per publish straight to JetStream from
    ``connections`` connections (no gateway); returns the wall time."""
    from services.events.log import EventLog

    calls = [events[i : i + 100] for i in range(0, len(events), 100)]

    async def run() -> float:
        logs = [EventLog(stack.settings, f"bench-{i}") for i in range(connections)]
        for log in logs:
            await log.connect()
        started = time.monotonic()

        async def one(log: EventLog, mine: list[list[pb.Event]]) -> None:
            for call in mine:
                await log.publish(call)
                ledger.ack(call, time.monotonic(), {})

        await asyncio.gather(*(one(log, calls[i::connections]) for i, log in enumerate(logs)))
        wall = time.monotonic() - started
        for log in logs:
            await log.close()
        return wall

    return asyncio.run(run())


def replicas(stack: LocalStack, count: int) -> tuple[list[str], list[ManagedProcess]]:
    """``count - 1`` more gateway processes beside the stack's (same log, Milvus, Triton)."""
    targets = [stack.gateway_target]
    procs: list[ManagedProcess] = []
    with contextlib.ExitStack() as on_error:
        for i in range(1, count):
            port = free_port()
            env = {**stack.env(), "RECSYS_GRPC_PORT": str(port), "RECSYS_METRICS_PORT": "0"}
            proc = gateway_process(env, stack.var_dir, f"gateway-{i}.log").start()
            procs.append(proc)
            on_error.callback(proc.stop)
            target = f"127.0.0.1:{port}"
            proc.wait_ready(functools.partial(gateway_serving, target), 90)
            targets.append(target)
        on_error.pop_all()
    return targets, procs


def paced(
    stack: LocalStack,
    targets: list[str],
    milvus: MilvusClient,
    args: argparse.Namespace,
    run: str,
    users: list[str],
    items: list[str],
    base: dict[str, int],
) -> dict[str, Any]:
    n = int(args.rate * args.seconds)
    evs = make_events(run, n, users, items)
    calls = [evs[i : i + args.call_events] for i in range(0, n, args.call_events)]
    ledger = Ledger()
    sending = threading.Event()
    sending.set()
    result: dict[str, Any] = {}

    profiles = ProfileProbe(targets, ledger, base, PROFILE_PROBE_EVERY)

    def send() -> None:
        result["wall"] = ingest(
            targets, calls, args.clients, ledger, base, args.rate, profiles.on_ack
        )
        sending.clear()

    sender = threading.Thread(target=send)
    started = time.monotonic()
    sender.start()
    probe = Probe(stack.ports.nats_monitor)
    lags, last = track_lag(
        milvus, stack.settings.users_collection, ledger, sending.is_set, 120, probe
    )
    sender.join()
    for user, count in ledger.acked.items():
        base[user] = base.get(user, 0) + count
    lag = np.array(lags) if lags else np.array([float("nan")])
    return {
        "events": n,
        "offered_events_per_s": round(n / result["wall"], 1),
        "applied_events_per_s": round(n / (last - started), 1),
        "apply_lag_p50_s": round(float(np.percentile(lag, 50)), 3),
        "apply_lag_p99_s": round(float(np.percentile(lag, 99)), 3),
        "apply_lag_max_s": round(float(lag.max()), 3),
        "calls": len(lags),
        "retried_calls": ledger.errors,
        **probe.summary(),
        **profiles.summary(),
    }


def new_users(
    stack: LocalStack,
    targets: list[str],
    milvus: MilvusClient,
    args: argparse.Namespace,
    run: str,
    items: list[str],
    base: dict[str, int],
) -> dict[str, Any]:
    """The paced phase with ``--new-users`` users nobody has seen, for ``--new-seconds``."""
    fresh = [f"new-{run}-{u}" for u in range(args.new_users)]
    phase = argparse.Namespace(**{**vars(args), "seconds": args.new_seconds})
    return {"users": len(fresh), **paced(stack, targets, milvus, phase, run, fresh, items, base)}


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    from bench import stack as bench_stack
    from training.data import load_dataset

    cache = args.cache_dir
    cache.mkdir(parents=True, exist_ok=True)
    models = bench_stack.resolve_models(bench_stack.DEFAULT_CHECKPOINT, cache)
    repository, _ = bench_stack.exported_repository(models, cache)
    data_dir = bench_stack.dataset_slice(args.items, 50, cache)
    items = [str(i) for i in load_dataset(data_dir).items["item_id"]]
    os.environ["RECSYS_INGEST_WAIT_APPLIED_S"] = "0"  # OK = durable: the log's throughput
    report: dict[str, Any] = {"load_before": os.getloadavg(), "cpus": os.cpu_count()}
    state = cache / f"events-{os.getpid()}"
    with bench_stack.running_stack(
        repository, data_dir, state, segments=4, milvus=args.milvus
    ) as stack:
        report["milvus"] = stack.settings.milvus_server  # what ran, whoever chose it
        targets, procs = replicas(stack, args.replicas)
        milvus = MilvusClient(uri=stack.settings.milvus_uri)
        try:
            stack.processes.pop("profile-worker").stop()
            run = f"{time.time_ns():x}"
            users = [f"bench-{run}-{u}" for u in range(args.users)]
            base: dict[str, int] = {}
            evs = make_events(run, args.events, users, items)
            calls = [evs[i : i + 100] for i in range(0, len(evs), 100)]
            ledger = Ledger()
            direct_users = [f"direct-{run}-{u}" for u in range(args.users)]
            direct = make_events(f"{run}d", args.events, direct_users, items)
            direct_wall = publish_direct(stack, direct, len(targets), ledger)
            report["acknowledged_direct"] = {
                "events": args.events,
                "connections": len(targets),
                "events_per_s": round(args.events / direct_wall, 1),
            }
            wall = ingest(targets, calls, args.clients, ledger, base)
            report["acknowledged"] = {
                "events": args.events,
                "replicas": len(targets),
                "clients": args.clients,
                "events_per_s": round(args.events / wall, 1),
                "retried_calls": ledger.errors,
            }
            started = time.monotonic()
            stack.start_worker()
            _, last = track_lag(milvus, stack.settings.users_collection, ledger, lambda: False, 240)
            report["backlog"] = {
                "events": 2 * args.events,
                "workers": 1,
                "applied_events_per_s": round(2 * args.events / (last - started), 1),
            }
            base = dict(ledger.acked)
            # The former worker (every apply re-encodes its users on Triton) beside ours.
            stack.processes.pop("profile-worker").stop()
            os.environ["RECSYS_WORKER_REENCODE_APART"] = "0"
            stack.start_worker("profile-worker-inline")
            del os.environ["RECSYS_WORKER_REENCODE_APART"]
            time.sleep(2.0)
            report["paced_1_worker_inline_encode"] = paced(
                stack, targets, milvus, args, f"{run}p0", users, items, base
            )
            report["new_users_inline_encode"] = new_users(
                stack, targets, milvus, args, f"{run}n0", items, base
            )
            stack.processes.pop("profile-worker-inline").stop()
            stack.start_worker()
            time.sleep(2.0)
            report["paced_1_worker"] = paced(
                stack, targets, milvus, args, f"{run}p1", users, items, base
            )
            report["new_users"] = new_users(stack, targets, milvus, args, f"{run}n1", items, base)
            stack.start_worker("profile-worker-2")
            time.sleep(2.0)
            report["paced_2_workers"] = paced(
                stack, targets, milvus, args, f"{run}p2", users, items, base
            )
            everyone = [*users, *direct_users]
            everyone += [u for u in base if u.startswith("new-")]
            sizes = history_sizes(milvus, stack.settings.users_collection, everyone)
            report["exact"] = all(sizes.get(u, 0) == base.get(u, 0) for u in everyone)
        finally:
            milvus.close()
            for proc in procs:
                proc.stop()
    shutil.rmtree(state, ignore_errors=True)
    report["load_after"] = os.getloadavg()
    return report


def table(report: dict[str, Any]) -> str:
    d, a, b = report["acknowledged_direct"], report["acknowledged"], report["backlog"]
    p0 = report["paced_1_worker_inline_encode"]
    rows = [
        f"Milvus: {report['milvus']}",
        "",
        "| phase | events | events/s | apply lag p50 | apply lag p99 | vs baseline "
        "| profile lag p50 | profile lag p99 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| acknowledged, direct to JetStream, {d['connections']} connections (baseline) "
        f"| {d['events']} | {d['events_per_s']} | - | - | 1.00 | - | - |",
        f"| acknowledged, `IngestEvents` on {a['replicas']} gateways, {a['clients']} clients "
        f"| {a['events']} | {a['events_per_s']} | - | - "
        f"| {a['events_per_s'] / d['events_per_s']:.2f} | - | - |",
        f"| backlog applied, 1 worker | {b['events']} | {b['applied_events_per_s']} "
        "| - | - | - | - | - |",
    ]
    for name, key in (
        ("1 worker, re-encoding in every apply (baseline)", "paced_1_worker_inline_encode"),
        ("1 worker, vectors re-encoded apart", "paced_1_worker"),
        ("2 workers, vectors re-encoded apart", "paced_2_workers"),
    ):
        p = report[key]
        rows.append(
            f"| paced {p['offered_events_per_s']} ev/s, {name}: applied | {p['events']} "
            f"| {p['applied_events_per_s']} | {p['apply_lag_p50_s']} s | {p['apply_lag_p99_s']} s "
            f"| p99 {p0['apply_lag_p99_s'] / max(p['apply_lag_p99_s'], 1e-9):.1f}x lower "
            f"| {p['profile_lag_p50_s']} s | {p['profile_lag_p99_s']} s |"
        )
    n0, n1 = report["new_users_inline_encode"], report["new_users"]
    for name, p in (("former worker (baseline)", n0), ("ours", n1)):
        rows.append(
            f"| paced {p['offered_events_per_s']} ev/s from {p['users']} new users, {name}: "
            f"applied | {p['events']} | {p['applied_events_per_s']} | {p['apply_lag_p50_s']} s "
            f"| {p['apply_lag_p99_s']} s "
            f"| {p['applied_events_per_s'] / max(n0['applied_events_per_s'], 1e-9):.1f}x applied "
            f"| {p['profile_lag_p50_s']} s | {p['profile_lag_p99_s']} s |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--items", type=int, default=400, help="MovieLens slice indexed")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--rate", type=float, default=1000.0, help="paced events/s")
    parser.add_argument("--seconds", type=float, default=20.0, help="paced phase length")
    parser.add_argument("--call-events", type=int, default=20, help="events per paced call")
    parser.add_argument("--new-users", type=int, default=2000, help="users of the new-user phase")
    parser.add_argument("--new-seconds", type=float, default=3.0, help="new-user phase length")
    parser.add_argument(
        "--milvus",
        choices=("lite", "engine"),
        default=None,
        help="the Milvus Lite server or the real engine (default: RECSYS_MILVUS_SERVER)",
    )
    parser.add_argument("--cache-dir", type=Path, default=REPO_ROOT / "var" / "bench")
    parser.add_argument("--out", type=Path, default=None, help="Markdown table file")
    args = parser.parse_args(argv)
    report = run_bench(args)
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(table(report) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
