"""Event-log figures: acknowledged ingest events/s and apply lag, on real processes.

``python -m bench.event_log [--events N] [--publishers 3]`` starts nats-server (JetStream,
file storage) and a Milvus Lite server on free ports, then

* publishes N keyed events (100 per call, like an ``IngestEvents`` of 100) from
  ``--publishers`` concurrent connections, as that many gateway replicas would, and reports
  acknowledged events/s;
* runs one profile worker over that backlog (applied events/s), then publishes a quarter as
  many paced to ``--rate`` events/s and reports the apply lag (from the acknowledgement of
  a call to the moment its user's applied sequence covers it: what a gateway waits for),
  p50 and p99.

The worker's user tower is a fixed vector here (no Triton): the figures are the log, the
lease/version protocol and Milvus, not the BERT re-encoding, which the gateway benchmarks
measure. Nothing here goes through the gRPC gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from core.config import Settings
from ops.processes import free_port, milvus_process, nats_healthy, nats_process, port_open
from services.api import pb
from services.events.log import EventLog
from services.profile_worker.worker import ProfileWorker
from services.profiles.profiles import Profiles
from services.vectors.store import VectorStore

BATCH = 100


class FixedTower:
    """The user tower's interface without a model: one unit vector per text."""

    def __init__(self, dim: int) -> None:
        self.vector = np.ones(dim, dtype=np.float32) / np.sqrt(dim)

    def embed_users(self, texts: Sequence[str], timeout_s: float) -> np.ndarray:
        return np.stack([self.vector for _ in texts])


def events(n: int, users: int, run: str) -> list[pb.Event]:
    return [
        pb.Event(
            user_id=f"bench-{run}-{i % users}",
            item_id=str(i % 5000),
            event_type=pb.EVENT_TYPE_CLICK,
            idempotency_key=f"{run}-{i}",
        )
        for i in range(n)
    ]


async def publish_all(
    settings: Settings,
    batches: list[list[pb.Event]],
    publishers: int,
    rate: float = 0.0,
    acks: dict[str, list[tuple[int, float]]] | None = None,
) -> tuple[float, dict[str, list[tuple[int, float]]]]:
    """Publish the batches round-robin over ``publishers`` connections (all at once, or paced
    to ``rate`` events/s); returns the wall time and, per user, (sequence, acknowledgement
    time) of each acknowledged call."""
    logs = [EventLog(settings, f"bench-{i}") for i in range(publishers)]
    for log in logs:
        await log.connect()
    acks = {} if acks is None else acks
    queue: asyncio.Queue[list[pb.Event]] = asyncio.Queue()
    for b in batches:
        queue.put_nowait(b)

    started = time.monotonic()
    sent = 0

    async def replica(log: EventLog) -> None:
        nonlocal sent
        while not queue.empty():
            batch = queue.get_nowait()
            if rate:
                sent += len(batch)
                await asyncio.sleep(max(0.0, started + sent / rate - time.monotonic()))
            result = await log.publish(batch)
            now = time.monotonic()
            for user, seq in result.last_seq.items():
                acks.setdefault(user, []).append((seq, now))

    await asyncio.gather(*(replica(log) for log in logs))
    wall = time.monotonic() - started
    for log in logs:
        await log.close()
    return wall, acks


async def applied_times(
    settings: Settings,
    acks: dict[str, list[tuple[int, float]]],
    timeout: float,
    publishing: asyncio.Event | None = None,
) -> list[float]:
    """Poll each user's applied sequence (while ``publishing`` is set, also for calls still
    being acknowledged); the lag of each acknowledged call."""
    log = EventLog(settings, "bench-lag")
    await log.connect()
    lags: list[float] = []
    end = time.monotonic() + timeout

    async def check(user: str) -> None:
        applied = await log.applied_seq(user)
        now = time.monotonic()
        calls = acks[user]
        calls.sort()
        while calls and calls[0][0] <= applied:
            lags.append(now - calls.pop(0)[1])

    while time.monotonic() < end:
        waiting = [u for u, calls in acks.items() if calls]
        if not waiting and not (publishing and publishing.is_set()):
            break
        await asyncio.gather(*(check(u) for u in waiting))
        await asyncio.sleep(0.005)
    await log.close()
    return lags


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--publishers", type=int, default=3)
    parser.add_argument(
        "--rate", type=float, default=500.0, help="events/s of the steady phase (apply lag)"
    )
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-event-log-"))
    nats_port, monitor, milvus_port = free_port(), free_port(), free_port()
    settings = Settings(
        nats_urls=f"nats://127.0.0.1:{nats_port}",
        milvus_uri=f"http://127.0.0.1:{milvus_port}",
        users_collection="bench_users",
        items_collection="bench_items",
        segments_collection="bench_segments",
    )
    nats = nats_process(root / "nats", nats_port, monitor, root).start()
    milvus = milvus_process(root / "milvus", milvus_port, root).start()
    try:
        nats.wait_ready(lambda: nats_healthy(monitor), 30)
        milvus.wait_ready(lambda: port_open("127.0.0.1", milvus_port), 60)
        store = VectorStore(settings.model_copy(update={"milvus_user_consistency": "Strong"}))
        store.ensure_collections()

        async def prepare() -> None:
            log = EventLog(settings)
            await log.connect()
            await log.ensure()
            await log.close()

        asyncio.run(prepare())
        run = f"{time.time_ns():x}"
        evs = events(args.events, args.users, run)
        batches = [evs[i : i + BATCH] for i in range(0, len(evs), BATCH)]
        # 1. acknowledged ingest alone (no worker competing for the CPU)
        wall, acks = asyncio.run(publish_all(settings, batches, args.publishers))
        # 2. the worker drains the backlog; then 3. steady state with the worker running
        profiles = Profiles(store, FixedTower(settings.embedding_dim), 20)  # type: ignore[arg-type]
        worker = ProfileWorker(settings, profiles)
        loop = asyncio.new_event_loop()

        def work() -> None:
            asyncio.set_event_loop(loop)
            worker.stop = asyncio.Event()
            loop.run_until_complete(worker.run())

        thread = threading.Thread(target=work, daemon=True)
        started = time.monotonic()
        thread.start()
        drained = asyncio.run(applied_times(settings, {u: list(a) for u, a in acks.items()}, 600))
        drain_s = time.monotonic() - started
        run2 = f"{time.time_ns():x}"
        evs2 = events(args.events // 4, args.users, run2)
        batches2 = [evs2[i : i + BATCH] for i in range(0, len(evs2), BATCH)]

        async def steady() -> tuple[float, list[float]]:
            acks2: dict[str, list[tuple[int, float]]] = {}
            publishing = asyncio.Event()
            publishing.set()
            lag = asyncio.create_task(applied_times(settings, acks2, 180, publishing))
            wall2, _ = await publish_all(settings, batches2, args.publishers, args.rate, acks2)
            publishing.clear()
            return wall2, await lag

        wall2, lags = asyncio.run(steady())
        loop.call_soon_threadsafe(worker.stop.set)
        thread.join(timeout=30)
        store.close()
        lag = np.array(lags) if lags else np.array([float("nan")])
        report = {
            "events": args.events,
            "users": args.users,
            "publishers": args.publishers,
            "acknowledged_events_per_s": round(args.events / wall, 1),
            "backlog_applied_events_per_s": round(args.events / drain_s, 1),
            "backlog_calls_applied": len(drained),
            "steady_events": len(evs2),
            "steady_rate_events_per_s": round(len(evs2) / wall2, 1),
            "steady_apply_lag_p50_s": round(float(np.percentile(lag, 50)), 3),
            "steady_apply_lag_p99_s": round(float(np.percentile(lag, 99)), 3),
        }
        print(json.dumps(report, indent=2))
        return 0
    finally:
        nats.stop()
        milvus.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
