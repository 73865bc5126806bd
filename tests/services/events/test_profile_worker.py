"""The profile worker on a real nats-server and a real Milvus Lite server; only the user
tower is faked (a fixed unit vector), so these tests need no Triton.

Covers: a retry through another publisher counts once and applies once; a poison event is
dead-lettered (with its reason, replayable) while the user's other events apply; deleting a
user while their events are pending leaves no row and no event; a nats-server SIGKILL in
the middle of a load loses no acknowledged event and applies none twice.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from core.config import Settings
from core.rows import item_row
from core.text import user_text
from ops.processes import (
    ManagedProcess,
    free_port,
    milvus_process,
    nats_healthy,
    nats_process,
    port_open,
)
from services.events import aggregates
from services.events.log import EventLog, EventLogUnavailable
from services.profile_worker.dead_letters import list_dead, replay
from services.profile_worker.worker import DEAD_LETTERS, ProfileWorker
from services.profiles.profiles import Profiles
from services.recommend.retrieve import PopularItems
from services.vectors.store import VectorStore
from tests.services.events.helpers import click, wait_for

pytestmark = pytest.mark.integration


class FakeTower:
    """The user tower's interface: a unit vector that is a function of the text."""

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def embed_users(self, texts: Sequence[str], timeout_s: float) -> np.ndarray:
        out = []
        for text in texts:
            v = np.random.default_rng(zlib.crc32(text.encode())).normal(size=self.dim)
            out.append((v / np.linalg.norm(v)).astype(np.float32))
        return np.stack(out)


class Env:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.nats_port, self.monitor, milvus_port = free_port(), free_port(), free_port()
        self.settings = Settings(
            nats_urls=f"nats://127.0.0.1:{self.nats_port}",
            milvus_uri=f"http://127.0.0.1:{milvus_port}",
            users_collection="worker_users",
            items_collection="worker_items",
            segments_collection="worker_segments",
            worker_lease_s=6.0,
        )
        self.milvus = milvus_process(root / "milvus", milvus_port, root).start()
        self.milvus.wait_ready(lambda: port_open("127.0.0.1", milvus_port), 60)
        self.nats: ManagedProcess = self.start_nats()
        self.store = VectorStore(
            self.settings.model_copy(update={"milvus_user_consistency": "Strong"})
        )
        self.store.ensure_collections()
        # A small catalogue: the user text (and so the vector) is a function of the history;
        # "pop-i" have a catalogue popularity of i, "cold" none.
        unit = [1.0] + [0.0] * (self.settings.embedding_dim - 1)
        self.store.upsert_items(
            [
                item_row(f"pop-{i}", f"Movie {i}", ["Drama"], "", popularity=i, vector=unit)
                for i in range(1, 21)
            ]
            + [item_row(i, f"Title {i}", ["War"], "", vector=unit) for i in ("cold", "a", "b")]
        )

    def start_nats(self) -> ManagedProcess:
        proc = nats_process(self.root / "nats", self.nats_port, self.monitor, self.root).start()
        proc.wait_ready(lambda: nats_healthy(self.monitor), 30)
        return proc

    def on_log(self, work: Callable[[EventLog], Any]) -> Any:
        async def run() -> Any:
            log = EventLog(self.settings)
            await log.connect()
            try:
                await log.ensure()
                return await work(log)
            finally:
                await log.close()

        return asyncio.run(run())

    def row(self, user: str) -> dict[str, Any] | None:
        return self.store.get_user(user, 5, with_vector=False)  # type: ignore[no-any-return]


class Worker:
    """A ProfileWorker on its own thread and event loop."""

    def __init__(self, env: Env) -> None:
        profiles = Profiles(env.store, FakeTower(env.settings.embedding_dim), 20)  # type: ignore[arg-type]
        self.worker = ProfileWorker(env.settings, profiles)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.worker.stop = asyncio.Event()
        self.loop.run_until_complete(self.worker.run())

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.worker.stop.set)
        self.thread.join(timeout=20)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = Env(tmp_path_factory.mktemp("worker"))
    yield e
    e.store.close()
    e.nats.stop()
    e.milvus.stop()


@pytest.fixture()
def worker(env: Env) -> Iterator[Worker]:
    w = Worker(env)
    yield w
    w.stop()


def test_a_retry_through_another_publisher_counts_and_applies_once(
    env: Env, worker: Worker
) -> None:
    user = f"idem-{uuid.uuid4().hex[:8]}"
    events = [click(user, "1", "k1"), click(user, "2", "k2")]
    first = env.on_log(lambda log: log.publish(events))
    again = env.on_log(lambda log: log.publish(events))  # another connection: another replica
    assert (first.accepted, first.duplicates) == (2, 0)
    assert (again.accepted, again.duplicates) == (0, 2)
    assert env.on_log(lambda log: log.wait_applied(first.last_seq, 20))
    row = env.row(user)
    assert row is not None and row["history_size"] == 2 and row["version"] == first.last_seq[user]


def test_poison_event_is_dead_lettered_while_the_rest_applies(env: Env, worker: Worker) -> None:
    user = f"poison-{uuid.uuid4().hex[:8]}"
    before = DEAD_LETTERS.labels(reason="permanent")._value.get()
    poison = click(user, "x" * 128 + "\n", "bad")  # the gateway refuses it; the log may not
    result = env.on_log(lambda log: log.publish([click(user, "3"), poison, click(user, "4")]))
    assert env.on_log(lambda log: log.wait_applied(result.last_seq, 20))
    row = env.row(user)
    assert row is not None and row["history_size"] == 2 and set(row["recent_items"]) == {"3", "4"}
    dead = [
        d for d in asyncio.run(list_dead(env.settings, 10_000)) if d.event.get("userId") == user
    ]
    assert len(dead) == 1 and "item_id" in dead[0].reason, dead
    assert DEAD_LETTERS.labels(reason="permanent")._value.get() == before + 1
    remaining = env.on_log(lambda log: log.user_events(user, 0, 100))
    assert len(remaining) == 2  # the poison event left the log for the dead-letter stream

    # Replay (after a "fix" that did not fix it): back on the log, dead-lettered again.
    assert asyncio.run(replay(env.settings, [dead[0].seq])) == 1

    def mine() -> list[Any]:
        letters = asyncio.run(list_dead(env.settings, 10_000))
        return [d for d in letters if d.event.get("userId") == user]

    assert wait_for(lambda: len(mine()) == 1 and mine()[0].seq != dead[0].seq, 20)
    assert (env.row(user) or {}).get("history_size") == 2


def test_delete_with_pending_events_leaves_no_trace(env: Env) -> None:
    user = f"gone-{uuid.uuid4().hex[:8]}"
    w = Worker(env)
    first = env.on_log(lambda log: log.publish([click(user, "5")]))
    assert env.on_log(lambda log: log.wait_applied(first.last_seq, 20))
    # what the gateway's profile read (and its profile cache) relies on
    assert env.on_log(lambda log: log.visible_version(user)) == first.last_seq[user]
    assert env.on_log(lambda log: log.visible_version(f"never-{user}")) == 0
    w.stop()  # pending from here on: nobody applies
    env.on_log(lambda log: log.publish([click(user, str(i), f"p{i}") for i in range(6, 12)]))
    purged = env.on_log(lambda log: log.forget_user(user, 5.0))
    assert purged == 7
    assert env.on_log(lambda log: log.visible_version(user)) is None  # no cached row serves
    assert env.store.delete_user(user, 5)
    w = Worker(env)
    try:
        marker = f"marker-{uuid.uuid4().hex[:8]}"
        done = env.on_log(lambda log: log.publish([click(marker, "1")]))
        assert env.on_log(lambda log: log.wait_applied(done.last_seq, 20))
        assert env.row(user) is None, "a pending event brought the deleted user back"
        assert env.on_log(lambda log: log.user_events(user, 0, 100)) == []
        # A late retry of a deleted event (within the duplicate window) stays a duplicate and
        # is never applied; new data after the deletion makes a new profile.
        retry = env.on_log(lambda log: log.publish([click(user, "6", "p6")]))
        assert (retry.accepted, retry.duplicates) == (0, 1)
        again = env.on_log(lambda log: log.publish([click(user, "7", "new")]))
        assert again.accepted == 1
        assert env.on_log(lambda log: log.wait_applied(again.last_seq, 20))
        assert env.on_log(lambda log: log.visible_version(user)) == again.last_seq[user]
        row = env.row(user)
        assert row is not None and row["history_size"] == 1
    finally:
        w.stop()


def test_nats_sigkill_under_load_loses_nothing_and_applies_once(env: Env, worker: Worker) -> None:
    run = uuid.uuid4().hex[:8]
    users = [f"kill-{run}-{u}" for u in range(4)]
    batches = [[click(users[e % 4], f"{b}.{e}", f"{b}-{e}") for e in range(8)] for b in range(80)]
    acked: set[int] = set()

    def writer() -> None:  # retries each batch with the same keys until acknowledged
        async def go() -> None:
            log = EventLog(env.settings)
            while True:
                try:
                    await log.connect()
                    break
                except Exception:
                    await asyncio.sleep(0.2)
            deadline = time.monotonic() + 120
            for n, events in enumerate(batches):
                while time.monotonic() < deadline:
                    try:
                        await log.publish(events)
                        acked.add(n)
                        break
                    except (EventLogUnavailable, Exception):
                        await asyncio.sleep(0.2)
                await asyncio.sleep(0.01)
            await log.close()

        asyncio.run(go())

    thread = threading.Thread(target=writer)
    thread.start()
    assert wait_for(lambda: len(acked) >= 20, 60), "no progress"
    env.nats.kill()
    time.sleep(0.5)
    env.nats = env.start_nats()
    thread.join(timeout=150)
    assert acked == set(range(len(batches)))
    expected = {u: {e.item_id for b in batches for e in b if e.user_id == u} for u in users}

    def exact() -> bool:
        rows = {u: env.row(u) for u in users}
        return all(r is not None and r["history_size"] == len(expected[u]) for u, r in rows.items())

    assert wait_for(exact, 90), {u: (env.row(u) or {}).get("history_size") for u in users}
    for u in users:
        row = env.row(u)
        assert row is not None and set(row["seen_items"]) == expected[u]


def test_the_vector_follows_the_history_and_the_history_is_visible_first(
    env: Env, worker: Worker
) -> None:
    """The apply writes history, counts and version at once and keeps the row's vector; the
    re-encode lane then brings the vector to the user tower's encoding of that history."""
    user = f"vec-{uuid.uuid4().hex[:8]}"
    first = env.on_log(lambda log: log.publish([click(user, "a", f"{user}-1")]))
    assert env.on_log(lambda log: log.wait_applied(first.last_seq, 20))
    tower = FakeTower(env.settings.embedding_dim)

    def encoded(history: list[str]) -> np.ndarray:
        known = env.store.get_items(history, 5)
        return tower.embed_users(
            [user_text([(known[i]["title"], known[i]["categories"]) for i in history])], 5
        )[0]

    def vector() -> np.ndarray:
        row = env.store.get_user(user, 5, with_vector=True)
        assert row is not None
        return np.asarray(row["vector"], dtype=np.float32)

    assert np.allclose(vector(), encoded(["a"]), atol=1e-5)  # a new user: encoded at once
    second = env.on_log(lambda log: log.publish([click(user, "b", f"{user}-2")]))
    assert env.on_log(lambda log: log.wait_applied(second.last_seq, 20))
    row = env.row(user)
    assert row is not None and row["recent_items"][:2] == ["b", "a"] and row["history_size"] == 2
    assert wait_for(lambda: np.allclose(vector(), encoded(["b", "a"]), atol=1e-5), 20)
    assert worker.worker.stale == {}
    row = env.row(user)
    assert row is not None and row["history_size"] == 2  # the re-encode kept everything else


def test_feedback_moves_online_popularity_and_co_occurrence_without_reindexing(
    env: Env, worker: Worker
) -> None:
    run = uuid.uuid4().hex[:8]
    cache = PopularItems(size=10)
    assert cache.refresh(env.store)
    assert "cold" not in [r["item_id"] for r in cache.top(10)]  # popularity 0: not listed
    users = [f"pop-{run}-{u}" for u in range(25)]
    events = [click(u, "a", f"{u}-a") for u in users] + [click(u, "cold", f"{u}-c") for u in users]
    result = env.on_log(lambda log: log.publish(events))
    assert env.on_log(lambda log: log.wait_applied(result.last_seq, 30))
    online = aggregates.Aggregates()

    def merged() -> bool:
        nonlocal online
        online = env.on_log(aggregates.read)
        return online.popularity.get("cold", 0.0) >= 25 - 1e-3

    assert wait_for(merged, 10), online
    assert "cold" in online.co_occurrence.get("a", []) and "a" in online.co_occurrence["cold"]
    cache.set_online(online.popularity, online.co_occurrence)  # what a gateway does
    top = [r["item_id"] for r in cache.top(10)]
    assert top[:2] == ["cold", "a"] or top[:2] == ["a", "cold"], top  # 25 (+) > 20 ("pop-20")
    assert "pop-20" in top  # the catalogue's own order below them is kept
    assert list(cache.neighbours("a"))[:1] == ["cold"]
    # A retried event is no new positive, and neither is a repeat of an item in the history.
    again = env.on_log(lambda log: log.publish([*events[:5], click(users[0], "cold", "x")]))
    assert env.on_log(lambda log: log.wait_applied(again.last_seq, 30))
    time.sleep(env.settings.aggregates_flush_s * 2)
    assert env.on_log(aggregates.read).popularity["cold"] == pytest.approx(
        online.popularity["cold"], rel=1e-3
    )
