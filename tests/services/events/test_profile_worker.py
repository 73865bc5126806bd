"""The profile worker on a real nats-server and a real Milvus Lite server; only the user
tower is faked (a fixed unit vector), so these tests need no Triton.

Covers: a retry through another publisher counts once and applies once; a poison event is
dead-lettered (with its reason, replayable) while the user's other events apply; deleting a
user while their events are pending leaves no row and no event; a nats-server SIGKILL in
the middle of a load loses no acknowledged event and applies none twice; failed applies are
counted per backlog; a worker that stops before re-encoding leaves its pending vectors to
another.
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
from services.api import pb
from services.deadline import Deadline
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
    """A ProfileWorker on its own thread and event loop; ``reencode=False``: its re-encode
    lane never runs (a worker that dies before re-encoding what it applied)."""

    def __init__(self, env: Env, reencode: bool = True, settings: Settings | None = None) -> None:
        profiles = Profiles(env.store, FakeTower(env.settings.embedding_dim), 20)  # type: ignore[arg-type]
        self.worker = ProfileWorker(settings or env.settings, profiles)
        if not reencode:

            async def never() -> None:
                await asyncio.Event().wait()

            self.worker._reencode_loop = never  # type: ignore[method-assign]
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
    # what the gateway's profile read (and its profile cache) relies on: nothing past the row
    done = first.last_seq[user]
    assert env.on_log(lambda log: log.unapplied(user, done)) == (0, done, [])
    assert env.on_log(lambda log: log.unapplied(f"never-{user}", 0)) == (0, 0, [])
    w.stop()  # pending from here on: nobody applies
    env.on_log(lambda log: log.publish([click(user, str(i), f"p{i}") for i in range(6, 12)]))
    # What a worker keeps of the user: a pending vector (naming the user), a failure count.
    env.on_log(lambda log: log.mark_stale(user, first.last_seq[user], "a-worker"))
    env.on_log(lambda log: log.count_failure(user, first.last_seq[user] + 1))
    purged = env.on_log(lambda log: log.forget_user(user, 5.0))
    assert purged == 7
    assert pending(env, user) == []
    assert env.on_log(lambda log: log.count_failure(user, first.last_seq[user] + 1)) == 1
    # a profile read of the row as it was: deleted since (the tombstone), nothing to fold in
    tombstone, _, unapplied = env.on_log(lambda log: log.unapplied(user, first.last_seq[user]))
    assert tombstone > first.last_seq[user] and unapplied == []
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
        assert env.on_log(lambda log: log.unapplied(user, again.last_seq[user]))[2] == []
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


def encoded(env: Env, history: list[str]) -> np.ndarray:
    """The fake user tower's vector of a history, as the worker encodes it."""
    known = env.store.get_items(history, 5)
    return FakeTower(env.settings.embedding_dim).embed_users(
        [user_text([(known[i]["title"], known[i]["categories"]) for i in history])], 5
    )[0]


def item_mean(env: Env, history: list[str]) -> np.ndarray:
    """A new user's vector until its re-encode: the unit mean of its history's item vectors."""
    known = env.store.get_items(history, 5, with_vectors=True)
    mean = np.mean([known[i]["vector"] for i in history], axis=0)
    return np.asarray(mean / np.linalg.norm(mean), dtype=np.float32)


def vector(env: Env, user: str) -> np.ndarray:
    row = env.store.get_user(user, 5, with_vector=True)
    assert row is not None
    return np.asarray(row["vector"], dtype=np.float32)


def pending(env: Env, user: str) -> list[int]:
    """The row versions the re-encode bucket holds for the user (at most one)."""
    return [p.version for p in env.on_log(lambda log: log.pending_vectors()) if p.user_id == user]


def pending_shows(env: Env, user: str, version: int) -> bool:
    """The bucket lists ``version`` for the user within a few reads. Once, in a fresh-clone
    CI run, a listing right after the apply came back without the entry, which the worker
    records before the apply is acknowledged (cause not found, not reproduced here; nats-py's
    end-of-listing marker is a suspect). Workers read the listing every half lease, so a
    later read is what counts; an entry a re-encode removed never comes back and still
    fails this."""
    return wait_for(lambda: pending(env, user) == [version], 5)


def test_the_vector_follows_the_history_and_the_history_is_visible_first(
    env: Env, worker: Worker
) -> None:
    """The apply writes history, counts and version at once and keeps the row's vector (a
    new user's: its history's mean item vector); the re-encode lane then brings the vector
    to the user tower's encoding of that history."""
    user = f"vec-{uuid.uuid4().hex[:8]}"
    first = env.on_log(lambda log: log.publish([click(user, "a", f"{user}-1")]))
    assert env.on_log(lambda log: log.wait_applied(first.last_seq, 20))
    assert wait_for(lambda: np.allclose(vector(env, user), encoded(env, ["a"]), atol=1e-5), 20)
    second = env.on_log(lambda log: log.publish([click(user, "b", f"{user}-2")]))
    assert env.on_log(lambda log: log.wait_applied(second.last_seq, 20))
    row = env.row(user)
    assert row is not None and row["recent_items"][:2] == ["b", "a"] and row["history_size"] == 2
    assert wait_for(lambda: np.allclose(vector(env, user), encoded(env, ["b", "a"]), atol=1e-5), 20)
    assert wait_for(lambda: user not in worker.worker.stale, 5)
    assert pending(env, user) == []  # the durable entry went with the vector write
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
        # Both keys: a worker merges popularity, then co-occurrence (two compare-and-sets),
        # and a read in between saw the one without the other.
        popular = online.popularity.get("cold", 0.0) >= 25 - 1e-3
        return popular and "cold" in online.co_occurrence.get("a", [])

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


def test_a_stopped_workers_pending_vectors_are_re_encoded_by_another(env: Env) -> None:
    """Worker A applies a user's event (history now, vector later) and stops before its
    re-encode lane gets to it; its in-memory queue is gone, the bucket entry is not, and
    worker B takes it over once it is older than the lease and re-encodes the user."""
    user = f"orphan-{uuid.uuid4().hex[:8]}"
    a = Worker(env, reencode=False)
    try:
        first = env.on_log(lambda log: log.publish([click(user, "a", f"{user}-1")]))
        assert env.on_log(lambda log: log.wait_applied(first.last_seq, 20))
        second = env.on_log(lambda log: log.publish([click(user, "b", f"{user}-2")]))
        assert env.on_log(lambda log: log.wait_applied(second.last_seq, 20))
        assert user in a.worker.stale
    finally:
        a.stop()
    assert pending_shows(env, user, second.last_seq[user])
    # still the vector of its first apply: its history's mean item vector ("a"'s)
    assert np.allclose(vector(env, user), item_mean(env, ["a"]), atol=1e-5)
    assert not np.allclose(item_mean(env, ["a"]), encoded(env, ["a"]), atol=1e-3)
    b = Worker(env)
    try:
        fresh = encoded(env, ["b", "a"])
        # Taken over after worker_lease_s (6 s here), looked for every half lease.
        assert wait_for(lambda: np.allclose(vector(env, user), fresh, atol=1e-5), 30)
        assert wait_for(lambda: pending(env, user) == [], 10)
        row = env.row(user)
        assert row is not None and row["history_size"] == 2  # everything else kept
    finally:
        b.stop()


def test_a_new_user_is_written_without_waiting_for_the_user_tower(env: Env) -> None:
    """A new user's first apply needs no Triton request of its own: its vector is its
    history's mean item vector, recorded as pending for the re-encode lane (encoding each
    new user in the apply capped a worker at ~45 new users/s). A user whose history has no
    catalogue item gets the tower's vector of an empty history at once (nothing pending)."""
    user, stranger = f"new-{uuid.uuid4().hex[:8]}", f"stranger-{uuid.uuid4().hex[:8]}"
    a = Worker(env, reencode=False)
    try:
        done = env.on_log(
            lambda log: log.publish(
                [
                    click(user, "a", f"{user}-1"),
                    click(user, "pop-3", f"{user}-2"),
                    click(stranger, "not-in-the-catalogue", f"{stranger}-1"),
                ]
            )
        )
        assert env.on_log(lambda log: log.wait_applied(done.last_seq, 20))
        assert np.allclose(vector(env, user), item_mean(env, ["pop-3", "a"]), atol=1e-5)
        assert pending_shows(env, user, done.last_seq[user]) and user in a.worker.stale
        assert np.allclose(vector(env, stranger), encoded(env, []), atol=1e-5)
        assert pending(env, stranger) == [] and stranger not in a.worker.stale
        row = env.row(user)
        assert row is not None and row["recent_items"] == ["pop-3", "a"]
    finally:
        a.stop()
    b = Worker(env)  # its lane takes the entry over after worker_lease_s (6 s here)
    try:
        fresh = encoded(env, ["pop-3", "a"])
        assert wait_for(lambda: np.allclose(vector(env, user), fresh, atol=1e-5), 30)
        assert wait_for(lambda: pending(env, user) == [], 10)
    finally:
        b.stop()


def test_a_read_folds_in_what_no_worker_applied_yet_as_the_worker_will(env: Env) -> None:
    """What the gateway's profile reads do (``EventLog.unapplied``, ``Profiles.merged``) so
    that a profile is current once its events are acknowledged, whatever the workers' lag:
    the merged row is the row a worker writes afterwards (history, seen items, counts,
    sequence events, interests, version, vector), for a known user and for a new one."""
    run = uuid.uuid4().hex[:8]
    known, new = f"merge-{run}", f"merge-new-{run}"
    profiles = Profiles(env.store, FakeTower(env.settings.embedding_dim), 20)  # type: ignore[arg-type]
    w = Worker(env, reencode=False)  # the vectors stay the applies' (no lane rewrites them)
    try:
        first = env.on_log(
            lambda log: log.publish(
                [click(known, "a", f"{run}-1"), click(known, "pop-2", f"{run}-2")]
            )
        )
        assert env.on_log(lambda log: log.wait_applied(first.last_seq, 20))
    finally:
        w.stop()  # pending from here on
    later = [
        click(known, "b", f"{run}-3"),
        click(known, "a", f"{run}-4"),  # again: to the front, counted twice
        pb.Event(user_id=known, item_id="pop-9", event_type=pb.EVENT_TYPE_VIEW),
        click(new, "pop-3", f"{run}-5"),
        click(new, "cold", f"{run}-6"),
    ]
    more = env.on_log(lambda log: log.publish(later))

    def merged(user: str) -> dict[str, Any] | None:
        row = env.store.get_user(user, 5, with_vector=True)
        version = int(row["version"]) if row else 0
        tombstone, _, found = env.on_log(lambda log: log.unapplied(user, version))
        assert tombstone == 0
        events = [(seq, pb.Event.FromString(data)) for seq, data in found]
        return profiles.merged(row, events, Deadline.after(5)) if events else row

    maybe = {u: merged(u) for u in (known, new)}
    assert env.row(new) is None and env.row(known)["history_size"] == 2  # type: ignore[index]
    assert maybe[known] is not None and maybe[new] is not None
    now = {u: row for u, row in maybe.items() if row is not None}  # narrowed: both are there
    assert now[known]["history_size"] == 5  # one publish: ties in time, in item order
    assert set(now[known]["recent_items"]) == {"a", "b", "pop-2", "pop-9"}
    assert now[known]["version"] == more.last_seq[known]
    assert set(now[new]["recent_items"]) == {"cold", "pop-3"}
    assert np.allclose(now[new]["vector"], item_mean(env, ["cold", "pop-3"]), atol=1e-5)
    w = Worker(env, reencode=False)
    try:
        assert env.on_log(lambda log: log.wait_applied(more.last_seq, 20))
    finally:
        w.stop()
    for user in (known, new):
        row = env.store.get_user(user, 5, with_vector=True)
        assert row is not None
        for name in ("recent_items", "seen_items", "history_size", "events", "interests"):
            assert now[user][name] == row[name], (user, name)
        assert now[user]["version"] == row["version"]
        assert np.allclose(now[user]["vector"], row["vector"], atol=1e-5)
        version = int(row["version"])

        # a def, not a lambda: mypy cannot infer a lambda with the extra (binding) defaults
        def unapplied(log: EventLog, u: str = user, at: int = version) -> Any:
            return log.unapplied(u, at)

        assert env.on_log(unapplied)[2] == []


def test_failed_applies_are_counted_per_backlog(env: Env) -> None:
    """The dead-letter count on a real bucket: failures of one backlog (same first sequence)
    add up; a backlog starting later (the earlier events applied since) counts from 1."""
    user = f"fail-{uuid.uuid4().hex[:8]}"

    async def counts(log: EventLog) -> list[int]:
        out = [await log.count_failure(user, 10) for _ in range(3)]
        out.append(await log.count_failure(user, 12))
        await log.clear_failures(user)
        out.append(await log.count_failure(user, 12))
        return out

    assert env.on_log(counts) == [1, 2, 3, 1, 1]


def test_an_apply_that_dies_after_its_write_is_caught_up_by_the_redelivery(env: Env) -> None:
    """The worker writes the row, then fails before recording the pending vector and the
    applied sequence (as a process killed right there would). The redelivered trigger finds
    nothing new to apply but a row ``version`` past the applied sequence: it records both,
    and the vector is re-encoded (before, the trigger was acknowledged and both were lost
    until the user's next event)."""
    user = f"crash-{uuid.uuid4().hex[:8]}"
    w = Worker(env)
    try:
        first = env.on_log(lambda log: log.publish([click(user, "a", f"{user}-1")]))
        assert env.on_log(lambda log: log.wait_applied(first.last_seq, 20))
        events = w.worker.events
        real = events.mark_stale
        crashed: list[str] = []

        async def crash_once(user_id: str, version: int, owner: str) -> Any:
            if user_id == user and not crashed:
                crashed.append(user_id)
                raise RuntimeError("killed after the upsert")
            return await real(user_id, version, owner)

        events.mark_stale = crash_once  # type: ignore[method-assign]
        second = env.on_log(lambda log: log.publish([click(user, "b", f"{user}-2")]))
        assert wait_for(lambda: bool(crashed), 20)
        assert (env.row(user) or {}).get("version") == second.last_seq[user]  # written
        # Redelivered after the consumer's ack wait (2 x worker_lease_s = 12 s here).
        assert env.on_log(lambda log: log.wait_applied(second.last_seq, 40))
        fresh = encoded(env, ["b", "a"])
        assert wait_for(lambda: np.allclose(vector(env, user), fresh, atol=1e-5), 20)
        row = env.row(user)
        assert row is not None and row["history_size"] == 2  # applied once
    finally:
        w.stop()


def test_batched_reads_match_the_per_user_reads(env: Env) -> None:
    """The worker's batched reads of many users (events from the stream's tail, applied and
    tombstone sequences by ``multi_last``) give what one read per user gives, whether the
    tail fits one read, needs several or more than allowed (continued per user)."""
    run = uuid.uuid4().hex[:8]
    users = [f"batch-{run}-{u}" for u in range(4)]
    published = env.on_log(
        lambda log: log.publish([click(users[i % 3], f"i{i}", f"{run}-{i}") for i in range(30)])
    )
    seqs = published.last_seq

    async def compare(log: EventLog) -> None:
        one = {u: await log.user_events(u, 0, 1000) for u in users}
        assert [len(one[u]) for u in users] == [10, 10, 10, 0]
        first = {u: one[u][0][0] if one[u] else 0 for u in users}
        cases = [
            {users[0]: 0, users[1]: one[users[1]][4][0], users[2]: seqs[users[2]], users[3]: 0},
            first,  # all recent: with tail 2 the tail is longer than TAIL_READS reads
        ]
        for after in cases:
            expected = {u: [e for e in one[u] if e[0] > after[u]] for u in users}
            for tail in (2000, 7, 2):  # one read; several; more than allowed
                assert await log.users_events(after, tail) == expected, (after, tail)
        await log.mark_applied(users[0], 5)
        await log.mark_applied(users[1], 9)
        await (await log.bucket(log.settings.applied_bucket)).delete(log.token(users[1]))
        applied = await log.applied_seqs(users)
        assert applied == {users[0]: 5, users[1]: 0, users[2]: 0, users[3]: 0}
        assert applied == {u: await log.applied_seq(u) for u in users}

    env.on_log(compare)


def test_segments_are_assigned_in_one_search_as_one_by_one(env: Env) -> None:
    """A re-encode's online segment assignment searches once for all the users' vectors and
    finds each the segment ``VectorStore.nearest_segment`` finds for it alone."""
    from core.rows import segment_row
    from services.deadline import Deadline

    dim = env.settings.embedding_dim
    rng = np.random.default_rng(7)
    centroids = rng.normal(size=(3, dim)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    env.store.replace_segments([segment_row(f"s{i}", c, [], 1) for i, c in enumerate(centroids)])
    try:
        vectors = rng.normal(size=(8, dim)).astype(np.float32)
        profiles = Profiles(env.store, FakeTower(dim), 20)  # type: ignore[arg-type]
        batched = profiles._nearest_segments(vectors, Deadline.after(5))
        alone = [(env.store.nearest_segment(v, 5) or {}).get("segment_id") for v in vectors]
        assert batched == alone and set(batched) <= {"s0", "s1", "s2"}
    finally:
        env.store.replace_segments([])
    assert profiles._nearest_segments(vectors[:2], Deadline.after(5)) == [None, None]


def test_busy_lease_redeliveries_and_one_failure_dead_letter_nothing(env: Env) -> None:
    """Another applier holds a user's lease while their events arrive: the worker's triggers
    come back every ``BUSY_RETRY_S``, each a delivery. Then one apply fails. With
    ``worker_max_deliveries`` 2 that failure is the first, not the last: retried, applied,
    nothing dead-lettered (counting deliveries dead-lettered the good events here)."""
    user = f"hot-{uuid.uuid4().hex[:8]}"
    w = Worker(env, settings=env.settings.model_copy(update={"worker_max_deliveries": 2}))
    failed: list[int] = []
    real = w.worker._write

    async def fail_once(work: list[Any], deadline: Any) -> None:
        mine = [x for x in work if x.user_id == user]
        if not failed and mine:
            failed.append(max(m.metadata.num_delivered for x in mine for m in x.triggers))
            raise RuntimeError("one real failure")
        await real(work, deadline)

    w.worker._write = fail_once  # type: ignore[method-assign]
    try:
        lease = env.on_log(lambda log: log.acquire_lease(user, "another-worker", 0))
        assert lease is not None
        result = env.on_log(
            lambda log: log.publish([click(user, str(i), f"{user}-{i}") for i in range(3)])
        )
        time.sleep(1.5)  # busy: nak'ed and redelivered meanwhile
        env.on_log(lambda log: log.release_lease(user, lease))
        assert env.on_log(lambda log: log.wait_applied(result.last_seq, 30))
        assert failed and failed[0] >= 2, failed  # it failed on a redelivery
        row = env.row(user)
        assert row is not None and row["history_size"] == 3
        letters = asyncio.run(list_dead(env.settings, 10_000))
        assert [d for d in letters if d.event.get("userId") == user] == []
    finally:
        w.stop()


def test_a_lease_is_one_holder_at_a_time_through_release_markers(env: Env) -> None:
    """Leases taken over this process's own release marker (one round trip) and over
    another's (create) exclude each other the same way; a stale release never frees
    someone else's lease."""
    user = f"lease-{uuid.uuid4().hex[:8]}"

    async def run(mine: EventLog) -> None:
        other = EventLog(env.settings)
        await other.connect()
        try:
            first = await mine.acquire_lease(user, "me", 0)
            assert first and await other.acquire_lease(user, "other", 0) is None
            await mine.release_lease(user, first)
            again = await mine.acquire_lease(user, "me", 0)  # over our own marker
            assert again and again > first and await other.acquire_lease(user, "other", 0) is None
            await mine.release_lease(user, again)
            theirs = await other.acquire_lease(user, "other", 0)  # over our marker, by create
            assert theirs and await mine.acquire_lease(user, "me", 0) is None  # stale marker
            await mine.release_lease(user, again)  # not ours any more: nothing happens
            assert await mine.acquire_lease(user, "me", 0) is None
            await other.release_lease(user, theirs)
            assert await mine.acquire_lease(user, "me", 0)
        finally:
            await other.close()

    env.on_log(run)
