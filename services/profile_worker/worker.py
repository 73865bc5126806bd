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
3. folds those events in (one ``Profiles.apply`` for all users of the batch, so Triton
   encodes them in one request) and upserts each row with its new ``version``;
4. records the applied sequence (``applied_bucket``, what the gateway waits for), releases
   the lease and acknowledges the triggers.

Why no update is lost although Milvus has no compare-and-set: a row is only written under
its user's lease, from a Strong read taken under that lease, and every Milvus call of the
apply has a deadline well inside the lease (``worker_lease_s`` / 3), so a lease cannot expire
while its write may still land. A crash after the upsert and before the acknowledgement is
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
from services.deadline import Deadline
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
BACKOFF_S = (0.5, 30.0)  # first and largest redelivery delay
OUTAGE_BACKOFF_S = 5.0  # largest delay while Triton or Milvus is down: apply soon after
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
        await self.events.close()

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
        """Lease, apply and release a few users (one Triton request, one deadline)."""
        wait = self.settings.worker_lease_s / 3
        leases = await asyncio.gather(
            *(self.events.acquire_lease(w.user_id, self.owner, wait) for w in work)
        )
        ready: list[UserWork] = []
        for w, lease in zip(work, leases, strict=True):
            if lease is None:  # another worker is on this user for long: try again later
                await asyncio.gather(*(m.nak(delay=1.0) for m in w.triggers))
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
        deadline = Deadline.after(self.settings.worker_lease_s / 3)
        rows = await asyncio.gather(
            *(asyncio.to_thread(self.profiles.get, w.user_id, deadline.left(), False) for w in work)
        )

        async def backlog(w: UserWork, row: dict[str, object] | None) -> None:
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
        try:
            await self._write(todo, deadline)
        except Exception as exc:
            await self._retry_or_dead(todo, exc)
            return
        for w in todo:
            if w.events:
                await self.events.mark_applied(w.user_id, w.events[-1][0])
                APPLIED.inc(len(w.events))
            await asyncio.gather(*(m.ack() for m in w.triggers))

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
        events = [e for w in work for _, e in w.events]
        versions = {w.user_id: w.events[-1][0] for w in work}
        await asyncio.to_thread(self.profiles.apply, events, deadline, versions)

    async def _retry_or_dead(self, work: list[UserWork], exc: Exception) -> None:
        outage = isinstance(exc, InferenceUnavailable | StoreUnavailable)
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
