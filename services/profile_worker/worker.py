"""Apply the events stream to the Milvus user rows: in order per user, once, with dead letters.

One durable pull consumer (``profile_consumer``) is shared by every worker process; its
messages are *triggers*. For each user in a fetched batch the worker

1. takes the user's lease (a key created only if absent in ``profile_lease_bucket``; it
   expires after ``worker_lease_s`` if a worker dies), so no two workers, and no
   ``DeleteUser``, touch one user at once;
2. reads the row's ``version`` (the log sequence of the newest event it contains, Strong
   read) and the user's tombstone, then reads *the user's own subject* from the stream after
   ``max(version, tombstone)``, in sequence order: whatever arrived, whichever worker got
   the triggers, and whatever was redelivered, is applied once and in order;
3. folds those events in (one ``Profiles.apply`` for all users of the batch) and upserts
   each row with its new ``version``: history, counts and order at once, the vector kept;
   a separate lane re-encodes the changed users' vectors on Triton as fast as it can
   (``_reencode_loop``: BERT is most of the cost, see there);
4. records the applied sequence (``applied_bucket``, what the gateway waits for), releases
   the lease and acknowledges the triggers.

Why no update is lost although Milvus has no compare-and-set: a row is only written under
its user's lease, from a Strong read taken under that lease, and the reads, the wait for
this worker's Triton slot and the write each have a deadline of ``worker_lease_s`` / 4, so a
lease cannot expire while its write may still land (the re-encode lane writes under the
lease as well). A crash after the upsert and before the acknowledgement is
harmless: the redelivered trigger finds ``version`` already past those events.

Failures: an event that cannot succeed (undecodable, invalid, or a value the Milvus schema
refuses) goes to the dead-letter stream at once with its reason and is removed from the
log; an outage of Triton or Milvus is waited out (the triggers are nak'ed with a backoff of
at most ``OUTAGE_BACKOFF_S``, never dead-lettered: the events are good, the dependency will
be back, and an acknowledged event must reach its profile); any other failure is retried with
exponential backoff and after ``worker_max_deliveries`` deliveries the user's pending events
are dead-lettered, so everything else keeps flowing. ``python -m services.profile_worker
dead-letters`` lists and replays them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import defaultdict
from dataclasses import dataclass, field

import nats.errors
from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from prometheus_client import Counter, Histogram
from pymilvus import MilvusException
from pymilvus.exceptions import DataNotMatchException, ParamError

from core.config import Settings
from services.api import pb
from services.deadline import Deadline, DeadlineExceeded
from services.events import aggregates
from services.events.log import EventLog
from services.gateway import validation as v
from services.inference.triton_client import InferenceUnavailable, TritonClient
from services.profiles.profiles import Profiles
from services.vectors.store import StoreUnavailable, VectorStore

log = logging.getLogger(__name__)

DEAD_LETTERS = Counter(
    "recsys_dead_letters_total", "Events moved to the dead-letter stream", ["reason"]
)
APPLIED = Counter("recsys_events_applied_total", "Events folded into user profiles")
APPLY_SECONDS = Histogram("recsys_profile_apply_seconds", "One batch: lease, read, apply, ack")
REENCODED = Counter("recsys_user_vectors_reencoded_total", "User vectors re-encoded on Triton")
BACKOFF_S = (0.5, 30.0)  # first and largest redelivery delay
OUTAGE_BACKOFF_S = 5.0  # largest delay while Triton or Milvus is down: apply soon after
BUSY_RETRY_S = 0.2  # redelivery of a user another applier holds
USERS_PER_APPLY = 16  # users re-encoded in one Triton request, well inside the lease


class Permanent(Exception):
    """An event that can never be applied; it is dead-lettered with this message."""


def is_permanent(exc: BaseException) -> bool:
    """Milvus refusing a value (too long, wrong type) is permanent; outages are not."""
    cause = exc.__cause__ or exc
    if isinstance(cause, ParamError | DataNotMatchException):
        return True
    if isinstance(cause, MilvusException):
        text = str(cause.message).lower()
        return cause.code == 1100 or "exceeds max length" in text or "invalid" in text
    return isinstance(exc, Permanent)


@dataclass
class UserWork:
    """One user's part of a fetched batch."""

    user_id: str
    triggers: list[Msg]
    lease: int | None = None
    events: list[tuple[int, pb.Event]] = field(default_factory=list)
    row: dict[str, object] | None = None  # as read under the lease (with its vector)
    read: bool = False  # ``row`` is the row as it stands (not for a split, event by event)


class ProfileWorker:
    """The consume-apply-acknowledge loop of one worker process."""

    def __init__(self, settings: Settings, profiles: Profiles | None = None) -> None:
        # The worker must see the other workers' writes: Strong reads of user rows.
        self.settings = settings.model_copy(update={"milvus_user_consistency": "Strong"})
        self.events = EventLog(self.settings, name="profile-worker")
        if profiles is None:
            store = VectorStore(self.settings)
            profiles = Profiles(store, TritonClient(self.settings), settings.history_window)
        self.profiles = profiles
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.stop = asyncio.Event()
        self.delta = aggregates.Delta()  # online aggregates not merged yet
        self.stale: dict[str, float] = {}  # users whose vector lags their history: since
        self.encoding = asyncio.Semaphore(1)  # one Triton request of this worker at a time

    async def connect(self) -> None:
        while not self.stop.is_set():
            try:
                await self.events.connect()
                await self.events.ensure()
                return
            except Exception as exc:  # retried until NATS answers
                log.warning("event log not reachable yet (%s); retrying", exc)
                await self.events.close()
                await asyncio.sleep(0.5)

    async def run(self) -> None:
        await self.connect()
        s = self.settings
        sub = await self.events.js.pull_subscribe(
            f"{s.events_subject}.*",
            durable=s.profile_consumer,
            stream=s.events_stream,
            config=ConsumerConfig(
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=s.worker_lease_s * 2,
                max_deliver=-1,  # counted here: past worker_max_deliveries -> dead letter
                max_ack_pending=max(1000, s.worker_fetch_batch * 4),
            ),
        )
        log.info("profile worker %s consuming %s", self.owner, s.events_stream)
        flusher = asyncio.create_task(self._flush_aggregates())
        encoder = asyncio.create_task(self._reencode_loop())
        while not self.stop.is_set():
            try:
                msgs = await sub.fetch(s.worker_fetch_batch, timeout=1.0)
            except nats.errors.TimeoutError:
                continue
            except Exception as exc:  # NATS restarting: the client reconnects by itself
                log.warning("fetch failed (%s); retrying", exc)
                await asyncio.sleep(0.5)
                continue
            started = time.monotonic()
            try:
                await self.handle(msgs)
            except Exception:  # a batch must never stop the worker; triggers redeliver
                log.exception("batch of %d failed; its events will be redelivered", len(msgs))
            APPLY_SECONDS.observe(time.monotonic() - started)
        flusher.cancel()
        encoder.cancel()
        await self._flush_once()
        await self.events.close()

    async def _flush_aggregates(self) -> None:
        """Merge the aggregate increments every ``aggregates_flush_s`` (see
        :mod:`services.events.aggregates`: one compare-and-set per key, not one per batch)."""
        while True:
            await asyncio.sleep(self.settings.aggregates_flush_s)
            await self._flush_once()

    async def _flush_once(self) -> None:
        delta, self.delta = self.delta, aggregates.Delta()
        if not delta:
            return
        try:
            await aggregates.merge(self.events, delta)
        except Exception as exc:  # approximate by design: never stops applying events
            log.warning("online aggregates not merged (%s); increments dropped", exc)

    # --- one fetched batch ----------------------------------------------------------------
    async def handle(self, msgs: list[Msg]) -> None:
        by_subject: dict[str, list[Msg]] = defaultdict(list)
        for msg in msgs:
            by_subject[msg.subject].append(msg)
        work: list[UserWork] = []
        for subject, triggers in by_subject.items():
            user_id = await self._user_of(subject, triggers)
            if user_id is not None:
                work.append(UserWork(user_id, triggers))
        # Triggers whose events an earlier apply already covered (it read the user's whole
        # subject): acknowledge them without a lease or a Milvus read. The applied sequence
        # is recorded after the row is written, so it never runs ahead of the row.
        applied = await asyncio.gather(*(self.events.applied_seq(w.user_id) for w in work))
        covered = [
            w
            for w, seq in zip(work, applied, strict=True)
            if max(m.metadata.sequence.stream for m in w.triggers) <= seq
        ]
        await asyncio.gather(*(m.ack() for w in covered for m in w.triggers))
        work = [w for w in work if w not in covered]
        # Chunks are disjoint sets of users under their own leases: applied side by side
        # (each apply is mostly waiting on Milvus and Triton round trips).
        chunks = [work[i : i + USERS_PER_APPLY] for i in range(0, len(work), USERS_PER_APPLY)]
        await asyncio.gather(*(self._handle_users(chunk) for chunk in chunks))

    async def _handle_users(self, work: list[UserWork]) -> None:
        """Lease, apply and release a few users (one deadline).

        A lease another applier holds is not waited for: holding some users' leases while
        waiting for others let two workers each wait on the other's until the wait ran out
        (10 s batches with 2 workers). That user's triggers come back shortly instead; most
        often the holder has applied their events by then (it reads the whole subject)."""
        leases = await asyncio.gather(
            *(self.events.acquire_lease(w.user_id, self.owner, 0.0) for w in work)
        )
        ready: list[UserWork] = []
        for w, lease in zip(work, leases, strict=True):
            if lease is None:  # another worker (or DeleteUser) is on this user: soon again
                await asyncio.gather(*(m.nak(delay=BUSY_RETRY_S) for m in w.triggers))
            else:
                w.lease = lease
                ready.append(w)
        try:
            if ready:
                await self._apply(ready)
        finally:
            await asyncio.gather(
                *(self.events.release_lease(w.user_id, w.lease) for w in ready if w.lease)
            )

    async def _user_of(self, subject: str, triggers: list[Msg]) -> str | None:
        """The user id a subject belongs to, from its first decodable event; undecodable
        triggers are dead-lettered here (their user is unknown)."""
        for msg in triggers:
            try:
                event = pb.Event.FromString(msg.data)
                if event.user_id:
                    return event.user_id
            except DecodeError:
                pass
            await self._dead_raw(msg, "undecodable event")
        return None

    async def _dead_raw(self, msg: Msg, reason: str) -> None:
        seq = msg.metadata.sequence.stream
        token = msg.subject.rsplit(".", 1)[-1]
        await self.events.js.publish(
            f"{self.settings.dead_letter_subject}.{token}",
            msg.data,
            stream=self.settings.dead_letter_stream,
            headers={"Recsys-Reason": reason, "Recsys-Original-Seq": str(seq)},
        )
        await self.events.js.delete_msg(self.settings.events_stream, seq)
        DEAD_LETTERS.labels(reason="permanent").inc()
        await msg.ack()

    async def _apply(self, work: list[UserWork]) -> None:
        deadline = Deadline.after(self.settings.worker_lease_s / 4)
        rows = await asyncio.gather(
            *(asyncio.to_thread(self.profiles.get, w.user_id, deadline.left(), True) for w in work)
        )

        async def backlog(w: UserWork, row: dict[str, object] | None) -> None:
            w.row, w.read = row, True
            version = int(row.get("version") or 0) if row else 0  # type: ignore[call-overload]
            after = max(version, await self.events.tombstone_seq(w.user_id))
            for seq, payload in await self.events.user_events(w.user_id, after, 10_000):
                event = await self._checked(w.user_id, seq, payload)
                if event is not None:
                    w.events.append((seq, event))

        await asyncio.gather(*(backlog(w, row) for w, row in zip(work, rows, strict=True)))
        todo = [w for w in work if w.events]
        for w in work:  # nothing new (already applied, tombstoned or dead): done
            if not w.events:
                await asyncio.gather(*(m.ack() for m in w.triggers))
        if not todo:
            return
        # A new user needs a vector now: one Triton request at a time (concurrent chunks each
        # sending theirs made every one miss its deadline on a busy machine, over and over).
        new_users = not self.settings.worker_reencode_apart or any(
            not w.row or w.row.get("vector") is None for w in todo
        )
        wait = self.settings.worker_lease_s / 4
        if new_users:
            try:
                await asyncio.wait_for(self.encoding.acquire(), wait)
            except TimeoutError:  # Triton busy with this worker's other users: soon again
                await asyncio.gather(*(m.nak(delay=0.5) for w in todo for m in w.triggers))
                return
        try:
            try:  # a fresh deadline: reads, this wait and the write each within lease / 4
                await self._write(todo, Deadline.after(wait))
            finally:
                if new_users:
                    self.encoding.release()
        except Exception as exc:
            await self._retry_or_dead(todo, exc)
            return
        done = [(w, row) for w, row in zip(work, rows, strict=True) if w.events]
        apart = self.settings.worker_reencode_apart
        await asyncio.gather(
            *(self.events.mark_applied(w.user_id, w.events[-1][0]) for w, _ in done)
        )
        self._count(done)
        now = time.monotonic()
        for w, row in done:
            APPLIED.inc(len(w.events))
            if apart and row and row.get("vector") is not None:  # kept its vector
                self.stale.setdefault(w.user_id, now)
        await asyncio.gather(*(m.ack() for w in todo for m in w.triggers))

    def _count(self, done: list[tuple[UserWork, dict[str, object] | None]]) -> None:
        """The users' new positives into the online aggregates' increments (one call of
        the implicit-feedback rule for all: it is pandas, ~1 ms a call)."""
        if not done:
            return
        weights = iter(self.profiles.positive_weights([e for w, _ in done for _, e in w.events]))
        now = time.time()
        for w, row in done:
            positives = [
                (e.item_id, e.event_time.ToSeconds() if e.HasField("event_time") else now)
                for _, e in w.events
                if next(weights) > 0
            ]
            previous = [str(i) for i in (row or {}).get("recent_items") or []]  # type: ignore[attr-defined]
            self.delta.add_user(previous, positives, self.settings.aggregates_half_life_s)

    async def _checked(self, user_id: str, seq: int, payload: bytes) -> pb.Event | None:
        """The decoded event, or None after dead-lettering it when it can never apply."""
        try:
            event = pb.Event.FromString(payload)
            v.check_event(event, 0)
            if event.user_id != user_id:
                raise v.InvalidArgument("user_id does not match its subject")
            return event
        except (DecodeError, v.InvalidArgument) as exc:
            await self._dead(user_id, seq, payload, f"invalid event: {exc}")
            return None

    async def _dead(self, user_id: str, seq: int, payload: bytes, reason: str) -> None:
        log.error("event %d of user %r dead-lettered: %s", seq, user_id, reason)
        await self.events.dead_letter(user_id, seq, payload, reason)
        DEAD_LETTERS.labels(reason="permanent" if "gave up" not in reason else "retries").inc()

    async def _write(self, work: list[UserWork], deadline: Deadline) -> None:
        """All users in one apply; on a permanent error, per user and then per event, so
        that only what cannot succeed is dead-lettered."""
        if not work:
            return
        try:
            await self._apply_events(work, deadline)
            return
        except Exception as exc:
            if not is_permanent(exc):
                raise
            failure: Exception = exc
        if len(work) > 1:
            for w in work:
                await self._write([w], deadline)
            return
        w = work[0]
        if len(w.events) == 1:
            seq, event = w.events[0]
            await self._dead(w.user_id, seq, event.SerializeToString(), f"refused: {failure}")
            w.events = []
            return
        kept: list[tuple[int, pb.Event]] = []
        for seq, event in w.events:  # one at a time, in order
            single = UserWork(w.user_id, [], w.lease, [(seq, event)])
            await self._write([single], deadline)
            kept += single.events
        w.events = kept

    async def _apply_events(self, work: list[UserWork], deadline: Deadline) -> None:
        """The history, counts and version now; the vector later (``_reencode_loop``), except
        for a new user, who needs one to be found at all."""
        events = [e for w in work for _, e in w.events]
        versions = {w.user_id: w.events[-1][0] for w in work}
        current = {w.user_id: w.row for w in work if w.read}
        apart = self.settings.worker_reencode_apart
        await asyncio.to_thread(
            self.profiles.apply, events, deadline, versions, current, lambda _: not apart
        )

    # --- the user vectors, re-encoded apart ------------------------------------------------
    async def _reencode_loop(self) -> None:
        """Re-encode the users whose history moved past their vector, oldest first,
        ``USERS_PER_APPLY`` per Triton request, one request at a time.

        Why apart: BERT is most of an apply (measured here, idle-ish 2 cores: 16 users' texts
        took 386 ms on Triton of a 468 ms ``Profiles.apply``), so encoding every changed
        user in every apply caps a worker at ~35 users/s, and the apply lag grows with the
        number of active users. Apart, the history is visible within the apply and the vector
        follows as fast as Triton encodes (a user is encoded once for however many events
        arrived meanwhile), ``worker_reencode_share`` of the time, so that the applies keep
        the CPU. A worker that dies forgets its pending re-encodes: those users' vectors
        catch up at their next event (history, counts and order are exact regardless)."""
        while True:
            due = sorted(self.stale, key=self.stale.__getitem__)[:USERS_PER_APPLY]
            if not due:
                await asyncio.sleep(0.05)
                continue
            started = time.monotonic()
            try:
                async with self.encoding:
                    await self._reencode(due)
            except Exception as exc:  # Triton or Milvus down: retried, never fatal
                log.warning("re-encoding %d users failed (%s); retrying", len(due), exc)
                await asyncio.sleep(OUTAGE_BACKOFF_S / 5)
            # A share of the time only: BERT would otherwise take every core there is and
            # starve the applies (the history), which matter more than a fresh vector.
            share = self.settings.worker_reencode_share
            await asyncio.sleep((time.monotonic() - started) * (1 - share) / share)

    async def _reencode(self, users: list[str]) -> None:
        """Encode outside the users' leases (the slow part), then write each new vector
        under the lease only if the row is still the one encoded (same ``version``); a user
        applied meanwhile stays stale for the next round."""
        deadline = Deadline.after(self.settings.worker_lease_s / 4)
        rows = await asyncio.gather(
            *(asyncio.to_thread(self.profiles.get, u, deadline.left(), False) for u in users)
        )
        for u, row in zip(users, rows, strict=True):
            if row is None:  # deleted meanwhile
                self.stale.pop(u, None)
        found = [r for r in rows if r is not None]
        if not found:
            return
        encoded = await asyncio.to_thread(self.profiles.reencoded, found, deadline)
        wait = 0.05  # a user being applied is simply taken up again on the next round
        leases = await asyncio.gather(
            *(self.events.acquire_lease(r["user_id"], self.owner, wait) for r in encoded)
        )
        held = {r["user_id"]: lease for r, lease in zip(encoded, leases, strict=True) if lease}
        try:
            write = Deadline.after(self.settings.worker_lease_s / 4)
            now = await asyncio.gather(
                *(asyncio.to_thread(self.profiles.get, u, write.left(), False) for u in held)
            )
            version = {r["user_id"]: int(r.get("version") or 0) for r in now if r is not None}
            same = [r for r in encoded if version.get(r["user_id"], -1) == r["version"]]
            if same:
                await asyncio.to_thread(self.profiles.store.upsert_users, same, write.left())
            for r in same:
                self.stale.pop(r["user_id"], None)
            REENCODED.inc(len(same))
        finally:
            await asyncio.gather(*(self.events.release_lease(u, r) for u, r in held.items()))

    async def _retry_or_dead(self, work: list[UserWork], exc: Exception) -> None:
        # Down or too slow to answer in time: the events are good, wait it out.
        outage = isinstance(exc, InferenceUnavailable | StoreUnavailable | DeadlineExceeded)
        for w in work:
            delivered = max(m.metadata.num_delivered for m in w.triggers)
            if outage:
                delay = min(OUTAGE_BACKOFF_S, BACKOFF_S[0] * 2 ** (delivered - 1))
                log.warning("dependency down (%s); retry %d in %.1fs", exc, delivered, delay)
                await asyncio.gather(*(m.nak(delay=delay) for m in w.triggers))
            elif delivered >= self.settings.worker_max_deliveries:
                reason = f"gave up after {delivered} deliveries: {exc}"
                for seq, event in w.events:
                    await self._dead(w.user_id, seq, event.SerializeToString(), reason)
                await asyncio.gather(*(m.ack() for m in w.triggers))
            else:
                delay = min(BACKOFF_S[1], BACKOFF_S[0] * 2 ** (delivered - 1))
                log.warning("apply failed (%s); retry %d in %.1fs", exc, delivered, delay)
                await asyncio.gather(*(m.nak(delay=delay) for m in w.triggers))
