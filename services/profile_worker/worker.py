"""Apply the events stream to the Milvus user rows: in order per user, once, with dead letters.

One durable pull consumer (``profile_consumer``) is shared by every worker process; its
messages are *triggers*. For each user in a fetched batch the worker

1. takes the user's lease (a key created only if absent in ``profile_lease_bucket``; it
   expires after ``worker_lease_s`` if a worker dies), so no two workers, and no
   ``DeleteUser``, touch one user at once;
2. reads the row's ``version`` (the log sequence of the newest event it contains, Strong
   read) and the user's tombstone, then reads *the user's own subject* from the stream after
   ``max(version, tombstone)``, in sequence order: whatever arrived, whichever worker got
   the triggers, and whatever was redelivered, is applied once and in order. Each of these
   reads is one request for the whole batch, not one per user (one Milvus query for the
   rows, ``multi_last`` direct gets for the sequences, the stream's tail for the events:
   per-user round trips were most of an apply);
3. folds those events in (one ``Profiles.apply`` for all users of the batch) and upserts
   each row with its new ``version``: history, counts and order at once, the vector kept
   (a new user's: the mean of its history's item vectors); a separate lane re-encodes the
   changed users' vectors on Triton as fast as it can (``_reencode_loop``: BERT is most of
   the cost, see there);
4. records the users whose vector now lags (``reencode_bucket``, durable: any worker's lane
   takes over what a dead worker left), then the applied sequence (``applied_bucket``, what
   the gateway waits for), releases the lease and acknowledges the triggers. A worker that
   died after the upsert and before recording the applied sequence is caught up by the
   redelivered trigger: it finds the row's ``version`` past the applied sequence and records
   both then.

Why no update is lost although Milvus has no compare-and-set: a row is only written under
its user's lease, from a Strong read taken under that lease; the reads end within
``worker_lease_s`` / 2 of taking the leases (the Milvus read has a deadline of lease / 4,
and a batch whose log reads took longer is not written but retried), and the wait for this
worker's Triton slot and the write each have a deadline of lease / 4, so a lease cannot
expire while its write may still land (the re-encode lane writes under the lease as well).
A crash after the upsert and before the acknowledgement is harmless: the redelivered
trigger finds ``version`` already past those events.

Failures: an event that cannot succeed (undecodable, invalid, or a value the Milvus schema
refuses) goes to the dead-letter stream at once with its reason and is removed from the
log; an outage of Triton or Milvus is waited out (the triggers are nak'ed with a backoff of
at most ``OUTAGE_BACKOFF_S``, never dead-lettered: the events are good, the dependency will
be back, and an acknowledged event must reach its profile); any other failure is retried with
exponential backoff and after ``worker_max_deliveries`` *failed applies* of the user's backlog
its pending events are dead-lettered, so everything else keeps flowing. Failures are counted
per user in ``apply_failures_bucket`` (not JetStream's ``num_delivered``: a trigger nak'ed
because another worker held the lease is redelivered too, and two workers on one hot user
made a good event reach the limit after a single real failure). ``python -m
services.profile_worker dead-letters`` lists and replays them.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from services.api import validation as v
from services.deadline import Deadline, DeadlineExceeded
from services.events import aggregates
from services.events.log import EventLog, PendingVector
from services.inference.triton_client import InferenceUnavailable, TritonClient
from services.profiles.profiles import Profiles
from services.vectors.store import StoreUnavailable, VectorStore, row_version

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
    applied: int = 0  # the user's applied sequence as read before the lease
    interim: bool = False  # written with its history's mean item vector: re-encode it


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
        self.half_life_s = aggregates.half_life_s(self.settings, {})  # as the last merge's
        self.stale: dict[str, PendingVector] = {}  # users whose vector lags their history
        self.next_adoption = 0.0  # monotonic time of the next look for others' leftovers
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
            self.half_life_s = await aggregates.merge(self.events, delta)
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
        # One batched read for the batch's users (a direct get may answer a write behind:
        # an older applied sequence only means more work here, never a lost event).
        applied = await self.events.applied_seqs([w.user_id for w in work])
        for w in work:
            w.applied = applied[w.user_id]
        covered = [
            w for w in work if max(m.metadata.sequence.stream for m in w.triggers) <= w.applied
        ]
        await asyncio.gather(*(m.ack() for w in covered for m in w.triggers))
        done = {id(w) for w in covered}  # by identity: UserWork equality compares messages
        await self._handle_users([w for w in work if id(w) not in done])

    async def _handle_users(self, work: list[UserWork]) -> None:
        """Lease, apply and release the batch's users (one deadline for the reads).

        A lease another applier holds is not waited for: holding some users' leases while
        waiting for others let two workers each wait on the other's until the wait ran out
        (10 s batches with 2 workers). That user's triggers come back shortly instead; most
        often the holder has applied their events by then (it reads the whole subject)."""
        leased = time.monotonic()  # no lease of these is older
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
                await self._apply(ready, leased)
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

    async def _apply(self, work: list[UserWork], leased: float) -> None:
        deadline = Deadline.after(self.settings.worker_lease_s / 4)
        users = [w.user_id for w in work]  # one Strong query for all, not one per user
        found = await asyncio.to_thread(self.profiles.get_many, users, deadline.left(), True)
        rows = [found.get(u) for u in users]

        # Tombstones: one batched read for the users with a row (their row is newer than
        # any tombstone: DeleteUser deletes it under the lease), and the exact read from the
        # stream leader for those without one (new users, or deleted: that one counts).
        tombstones = await self.events.tombstone_seqs(list(found))
        rowless = [u for u in users if u not in found]
        exact = await asyncio.gather(*(self.events.tombstone_seq(u) for u in rowless))
        tombstones.update(zip(rowless, exact, strict=True))
        after: dict[str, int] = {}
        for w, row in zip(work, rows, strict=True):
            w.row, w.read = row, True
            after[w.user_id] = max(row_version(row), tombstones[w.user_id])
        # Each user's own events after that, in sequence order (most in one read of the
        # stream's tail: ``EventLog.users_events``).
        backlog = await self.events.users_events(after)
        for w in work:
            for seq, payload in backlog[w.user_id]:
                event = await self._checked(w.user_id, seq, payload)
                if event is not None:
                    w.events.append((seq, event))
        # The Milvus reads had lease / 4; with the log's reads this must leave the Triton
        # wait and the write (lease / 4 each) inside the lease, or no write at all.
        if time.monotonic() - leased > self.settings.worker_lease_s / 2:
            await self._retry_or_dead(work, DeadlineExceeded("reads took over lease / 2"))
            return
        todo = [w for w in work if w.events]
        await self._caught_up([w for w in work if not w.events])
        # Vectors re-encoded apart: the batch's users are written together, one upsert and
        # one implicit-feedback call (one per 16 users cost most of an apply in round trips
        # and thread hand-offs); a new user gets its history's mean item vector, so Triton
        # encodes at most one text here (an empty history's). Encoding inline, every user
        # needs Triton now: ``USERS_PER_APPLY`` per request.
        if self.settings.worker_reencode_apart:
            groups = [(todo, False)] if todo else []
        else:
            groups = [
                (todo[i : i + USERS_PER_APPLY], True) for i in range(0, len(todo), USERS_PER_APPLY)
            ]
        await asyncio.gather(*(self._apply_group(g, encodes) for g, encodes in groups))

    async def _apply_group(self, todo: list[UserWork], encodes: bool) -> None:
        """Write one group of leased users (read and with their events), then record and
        acknowledge them; a failure is retried or dead-lettered here."""
        # Encoding inline: one Triton request at a time (concurrent chunks each sending
        # theirs made every one miss its deadline on a busy machine, over and over).
        wait = self.settings.worker_lease_s / 4
        if encodes:
            try:
                await asyncio.wait_for(self.encoding.acquire(), wait)
            except TimeoutError:  # Triton busy with this worker's other users: soon again
                await asyncio.gather(*(m.nak(delay=0.5) for w in todo for m in w.triggers))
                return
        try:
            try:  # a fresh deadline: reads, this wait and the write each within lease / 4
                await self._write(todo, Deadline.after(wait))
            finally:
                if encodes:
                    self.encoding.release()
        except Exception as exc:
            await self._retry_or_dead(todo, exc)
            return
        done = [(w, w.row) for w in todo if w.events]
        apart = self.settings.worker_reencode_apart
        # Stale first: once the applied sequence is recorded a redelivered trigger is
        # acknowledged unseen, so a crash in between would forget the vector.
        await self._mark_stale(
            [
                (w.user_id, w.events[-1][0])
                for w, row in done
                if apart and (w.interim or (row and row.get("vector") is not None))  # kept
            ]
        )
        await asyncio.gather(
            *(self.events.mark_applied(w.user_id, w.events[-1][0]) for w, _ in done)
        )
        self._count(done)
        for w, _ in done:
            APPLIED.inc(len(w.events))
        await asyncio.gather(*(m.ack() for w in todo for m in w.triggers))

    async def _caught_up(self, work: list[UserWork]) -> None:
        """Users with nothing new to apply (already applied, tombstoned or dead-lettered):
        acknowledged; a row whose ``version`` is past the applied sequence was written by an
        apply that died before recording it, so its pending vector and applied sequence are
        recorded now (the row was read Strong under the lease)."""
        behind = [
            (w.user_id, row_version(w.row), w.row.get("vector") is not None)
            for w in work
            if w.row and row_version(w.row) > w.applied
        ]
        if self.settings.worker_reencode_apart:
            await self._mark_stale([(u, version) for u, version, vector in behind if vector])
        await asyncio.gather(*(self.events.mark_applied(u, version) for u, version, _ in behind))
        await asyncio.gather(*(m.ack() for w in work for m in w.triggers))

    async def _mark_stale(self, users: list[tuple[str, int]]) -> None:
        """Record (durably, then here) that these users' rows need a new vector."""
        marked = await asyncio.gather(
            *(self.events.mark_stale(u, version, self.owner) for u, version in users)
        )
        for pending in marked:
            before = self.stale.get(pending.user_id)  # keeps its place in the queue
            at = before.at if before is not None else pending.at
            self.stale[pending.user_id] = PendingVector(
                pending.user_id, pending.version, pending.owner, at, pending.revision
            )

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
            self.delta.add_user(previous, positives, self.half_life_s)

    async def _checked(self, user_id: str, seq: int, payload: bytes) -> pb.Event | None:
        """The decoded event, or None after dead-lettering it when it can never apply."""
        try:
            return v.stored_event(payload, user_id)
        except (DecodeError, v.InvalidArgument) as exc:
            await self._dead(user_id, seq, payload, f"invalid event: {exc}")
            return None

    async def _dead(self, user_id: str, seq: int, payload: bytes, reason: str) -> None:
        log.error("event %d of user %r dead-lettered: %s", seq, user_id, reason)
        await self.events.dead_letter(user_id, seq, payload, reason)
        DEAD_LETTERS.labels(reason="permanent" if "gave up" not in reason else "retries").inc()

    async def _write(self, work: list[UserWork], deadline: Deadline) -> None:
        """All users in one apply; on a permanent error, by halves down to one user and then
        per event, so that only what cannot succeed is dead-lettered."""
        if not work:
            return
        try:
            await self._apply_events(work, deadline)
            return
        except Exception as exc:
            if not is_permanent(exc):
                raise
            failure: Exception = exc
        if len(work) > 1:  # halves: a batch's one refused user costs ~2 log2(n) writes
            half = len(work) // 2
            await self._write(work[:half], deadline)
            await self._write(work[half:], deadline)
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
            w.interim = w.interim or single.interim
        w.events = kept

    async def _apply_events(self, work: list[UserWork], deadline: Deadline) -> None:
        """The history, counts and version now; the vector later (``_reencode_loop``), except
        for a new user, who needs one to be found at all."""
        events = [e for w in work for _, e in w.events]
        versions = {w.user_id: w.events[-1][0] for w in work}
        current = {w.user_id: w.row for w in work if w.read}
        apart = self.settings.worker_reencode_apart
        update = await asyncio.to_thread(
            self.profiles.apply, events, deadline, versions, current, lambda _: not apart
        )
        interim = set(update.interim)
        for w in work:
            w.interim = w.user_id in interim

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
        the CPU. The pending users are recorded in ``reencode_bucket`` as well as here: every
        ``worker_lease_s`` / 2 the lane also takes the entries nobody re-marked for
        ``worker_lease_s`` (a dead worker's, or a slow one's), so a worker's death loses no
        re-encode (:meth:`_adopt`)."""
        while True:
            await self._adopt()
            due = sorted(self.stale.values(), key=lambda p: p.at)[:USERS_PER_APPLY]
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

    async def _adopt(self) -> None:
        """Take over the pending vectors not re-marked for ``worker_lease_s``: their worker
        died (or is far behind; two encodes of one row are harmless, the write compares
        versions). Cheap: one ordered consumer over the bucket every half lease."""
        if time.monotonic() < self.next_adoption:
            return
        self.next_adoption = time.monotonic() + self.settings.worker_lease_s / 2
        try:
            pending = await self.events.pending_vectors()
        except Exception as exc:  # NATS restarting: next time
            log.warning("pending vectors not read (%s)", exc)
            return
        cutoff = time.time() - self.settings.worker_lease_s
        for p in pending:
            mine = self.stale.get(p.user_id)
            if p.at <= cutoff and (mine is None or mine.revision < p.revision):
                self.stale[p.user_id] = p

    async def _reencode(self, due: list[PendingVector]) -> None:
        """Encode outside the users' leases (the slow part), then write each new vector
        under the lease only if the row is still the one encoded (same ``version``); a user
        applied meanwhile stays stale for the next round. A written (or deleted) user's
        entry goes, unless an apply re-marked it meanwhile."""
        deadline = Deadline.after(self.settings.worker_lease_s / 4)
        users = [p.user_id for p in due]
        rows = await asyncio.to_thread(self.profiles.get_many, users, deadline.left(), False)
        gone = [p for p in due if p.user_id not in rows]  # deleted meanwhile
        await self._vectors_done(gone)
        found = [rows[u] for u in users if u in rows]
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
            now = await asyncio.to_thread(self.profiles.get_many, list(held), write.left(), False)
            version = {u: row_version(r) for u, r in now.items()}
            same = [r for r in encoded if version.get(r["user_id"], -1) == r["version"]]
            if same:
                await asyncio.to_thread(self.profiles.store.upsert_users, same, write.left())
            written = {r["user_id"]: r["version"] for r in same}
            await self._vectors_done([p for p in due if p.version <= written.get(p.user_id, -1)])
            REENCODED.inc(len(same))
        finally:
            await asyncio.gather(*(self.events.release_lease(u, r) for u, r in held.items()))

    async def _vectors_done(self, done: list[PendingVector]) -> None:
        """Drop these entries, here and in the bucket, unless an apply re-marked them."""
        await asyncio.gather(*(self.events.vector_written(p) for p in done))
        for p in done:
            mine = self.stale.get(p.user_id)
            if mine is not None and mine.revision == p.revision:
                del self.stale[p.user_id]

    async def _retry_or_dead(self, work: list[UserWork], exc: Exception) -> None:
        """Retry later, or dead-letter after ``worker_max_deliveries`` failed applies.

        Only real failures count (``EventLog.count_failure``): an outage is waited out, and
        the triggers' ``num_delivered`` also counts redeliveries for a lease another worker
        held, which are no failure of these events."""
        # Down or too slow to answer in time: the events are good, wait it out.
        outage = isinstance(exc, InferenceUnavailable | StoreUnavailable | DeadlineExceeded)
        for w in work:
            if outage:
                delivered = max(m.metadata.num_delivered for m in w.triggers)
                delay = min(OUTAGE_BACKOFF_S, BACKOFF_S[0] * 2 ** (delivered - 1))
                log.warning("dependency down (%s); retry %d in %.1fs", exc, delivered, delay)
                await asyncio.gather(*(m.nak(delay=delay) for m in w.triggers))
                continue
            try:
                failures = await self.events.count_failure(
                    w.user_id, w.events[0][0] if w.events else 0
                )
            except Exception as count_exc:  # the log itself is down: not these events' fault
                log.warning("failure not counted (%s); retry in %.1fs", count_exc, OUTAGE_BACKOFF_S)
                await asyncio.gather(*(m.nak(delay=OUTAGE_BACKOFF_S) for m in w.triggers))
                continue
            if failures >= self.settings.worker_max_deliveries:
                reason = f"gave up after {failures} failed applies: {exc}"
                for seq, event in w.events:
                    await self._dead(w.user_id, seq, event.SerializeToString(), reason)
                with contextlib.suppress(Exception):  # expires anyway; a new backlog restarts
                    await self.events.clear_failures(w.user_id)
                await asyncio.gather(*(m.ack() for m in w.triggers))
            else:
                delay = min(BACKOFF_S[1], BACKOFF_S[0] * 2 ** (failures - 1))
                log.warning("apply failed (%s); retry %d in %.1fs", exc, failures, delay)
                await asyncio.gather(*(m.nak(delay=delay) for m in w.triggers))
