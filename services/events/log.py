"""Ingested events on NATS JetStream, the log every gateway replica and profile worker share.

Layout (names from :class:`core.config.Settings`):

* stream ``events_stream``: subject ``<events_subject>.<user token>``, one per user, so one
  user's events keep their order and can be purged alone. File storage, ``stream_replicas``
  replicas, duplicate detection over ``duplicate_window_s``: an event's message id is its
  user token plus the client's ``idempotency_key``, so a retry through any replica is
  acknowledged as a duplicate and stored once.
* stream ``dead_letter_stream``: events that cannot be applied, with a ``Recsys-Reason``.
* key-value buckets: ``tombstone_bucket`` (deleted users: the stream sequence at deletion;
  older events of theirs are never applied), ``profile_lease_bucket`` (one applier per user
  at a time; entries expire after ``worker_lease_s``), ``applied_bucket`` (each user's last
  applied sequence, which the gateway waits for to keep read-your-writes),
  ``apply_failures_bucket`` (a user's failed applies of one backlog, entries expire
  ``worker_failure_ttl_s`` after the last failure: what dead-letters, not the deliveries) and
  ``reencode_bucket`` (users whose vector lags their history, until a worker re-encodes it).

The user token is a keyed hash of the user id (``RECSYS_PSEUDONYM_KEY``; a fixed key when it
is empty, so that every process agrees): subjects never carry raw user ids.

:class:`EventLog` is asyncio (the worker uses it as is); :class:`BlockingEventLog` runs one
on a background event-loop thread for the synchronous gRPC servicer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.kv import KeyValue

from core.config import Settings
from services.api import pb

log = logging.getLogger(__name__)
T = TypeVar("T")
MSG_ID = "Nats-Msg-Id"
MULTI_LAST = 256  # keys per batched direct get, well inside the server's limit
TAIL = 2000  # events in one batched read of the stream's tail (``users_events``)
TAIL_READS = 4  # such reads at most, then per user
UNAPPLIED = 256  # pending events a profile read folds in at most (``unapplied``)
RELEASED_KEPT = 100_000  # lease release markers remembered (``acquire_lease``)
REASON = "Recsys-Reason"
ORIGINAL_SEQ = "Recsys-Original-Seq"
_DEFAULT_TOKEN_KEY = b"recsys-events-v1"


class EventLogUnavailable(RuntimeError):
    """The log did not acknowledge in time (NATS down, no JetStream quorum): retry later."""


@dataclass(frozen=True)
class PublishResult:
    """What one publish stored: new events, retries recognised, and each user's newest seq."""

    accepted: int
    duplicates: int
    last_seq: dict[str, int] = field(default_factory=dict)
    stored: list[int] = field(default_factory=list)  # indices of the events stored anew


@dataclass(frozen=True)
class PendingVector:
    """A user whose row ``version`` was applied without a new vector (``reencode_bucket``)."""

    user_id: str
    version: int
    owner: str  # the worker that applied it
    at: float  # wall time of that apply
    revision: int  # of the bucket entry: deleted only if still this one


def user_token(user_id: str, key: bytes = b"") -> str:
    """The user's subject token: 128 bits of HMAC-SHA256, stable for one key."""
    digest = hmac.new(key or _DEFAULT_TOKEN_KEY, user_id.encode("utf-8", "replace"), "sha256")
    return "u" + digest.hexdigest()[:32]


def message_id(token: str, idempotency_key: str) -> str:
    """A client's idempotency key scoped to its user (two users may reuse a key)."""
    return f"{token}.{hashlib.blake2b(idempotency_key.encode(), digest_size=16).hexdigest()}"


def stamped(event: pb.Event, now_ms: int) -> pb.Event:
    """The event with the server's clock as event_time when the client sent none, so that a
    redelivery applies exactly the same event."""
    if event.HasField("event_time"):
        return event
    copy = pb.Event()
    copy.CopyFrom(event)
    copy.event_time.FromMilliseconds(now_ms)
    return copy


class EventLog:
    """Async handles on the platform's streams and buckets (one NATS connection)."""

    def __init__(self, settings: Settings, name: str = "recsys") -> None:
        self.settings = settings
        self.name = name
        self._key = settings.pseudonym_key.get_secret_value().encode()
        self.nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._kv: dict[str, KeyValue] = {}
        self._direct: dict[str, bool] = {}  # bucket streams that allow direct gets
        self._released: dict[str, int] = {}  # lease key -> revision of our release's marker

    # --- connection and set-up ------------------------------------------------------------
    async def connect(self) -> None:
        servers = [s.strip() for s in self.settings.nats_urls.split(",") if s.strip()]
        self.nc = await nats.connect(
            servers,
            name=self.name,
            connect_timeout=2,
            reconnect_time_wait=0.5,
            max_reconnect_attempts=-1,  # keep trying: the log comes back, the process stays
            allow_reconnect=True,
        )
        self._js = self.nc.jetstream(timeout=self.settings.nats_timeout_s)

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise EventLogUnavailable("not connected to NATS")
        return self._js

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    async def close(self) -> None:
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()

    async def ensure(self) -> None:
        """Create or update the streams and buckets to this configuration (idempotent)."""
        s = self.settings
        await self._ensure_stream(
            StreamConfig(
                name=s.events_stream,
                subjects=[f"{s.events_subject}.*"],
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                num_replicas=s.stream_replicas,
                duplicate_window=s.duplicate_window_s,
                max_age=s.events_max_age_s,
                discard=DiscardPolicy.OLD,
                allow_direct=True,
            )
        )
        await self._ensure_stream(
            StreamConfig(
                name=s.dead_letter_stream,
                subjects=[f"{s.dead_letter_subject}.*"],
                storage=StorageType.FILE,
                num_replicas=s.stream_replicas,
                allow_direct=True,
            )
        )
        await self._ensure_stream(
            StreamConfig(
                name=s.exposures_stream,
                subjects=[f"{s.exposures_subject}.*"],
                storage=StorageType.FILE,
                num_replicas=s.stream_replicas,
                duplicate_window=s.duplicate_window_s,
                max_age=s.exposures_max_age_s,
                discard=DiscardPolicy.OLD,
                allow_direct=True,
            )
        )
        for bucket, ttl in (
            (s.tombstone_bucket, None),
            (s.profile_lease_bucket, s.worker_lease_s),
            (s.applied_bucket, None),
            (s.apply_failures_bucket, s.worker_failure_ttl_s),
            (s.reencode_bucket, None),
        ):
            await self.bucket(bucket, ttl, create=True)
            await self._allow_direct(bucket)

    async def _ensure_stream(self, config: StreamConfig) -> None:
        assert config.name is not None
        try:
            await self.js.stream_info(config.name)
        except nats.js.errors.NotFoundError:
            await self.js.add_stream(config)
            log.info("created JetStream stream %s", config.name)
            return
        await self.js.update_stream(config)

    async def bucket(self, name: str, ttl: float | None = None, create: bool = False) -> KeyValue:
        """The bucket's handle. Its streams allow direct gets, for batched reads of many keys
        (:meth:`_user_seqs`); single reads stay on the stream leader (``_direct`` off): on
        replicated streams a follower may answer a direct get with a value a write behind,
        and the gateway's read-your-writes reads must not."""
        if name not in self._kv:
            try:
                kv = await self.js.key_value(name)
            except nats.js.errors.BucketNotFoundError:
                if not create:
                    raise
                kv = await self.js.create_key_value(
                    bucket=name,
                    history=1,
                    ttl=ttl,
                    replicas=self.settings.stream_replicas,
                    storage=StorageType.FILE,
                    direct=True,
                )
            self._direct[name] = bool(kv._direct)
            kv._direct = False
            self._kv[name] = kv
        return self._kv[name]

    async def _allow_direct(self, name: str) -> None:
        """Switch direct gets on for a bucket created without them (an update in place)."""
        await self.bucket(name)
        if self._direct[name]:
            return
        info = await self.js.stream_info(f"KV_{name}")
        info.config.allow_direct = True
        await self.js.update_stream(info.config)
        self._direct[name] = True

    async def healthy(self) -> bool:
        """Connected and the events stream answers (JetStream has a leader for it)."""
        if not self.connected:
            return False
        try:
            await self.js.stream_info(self.settings.events_stream)
            return True
        except Exception:  # any failure means "not ready"; the reason is logged by the caller
            return False

    # --- subjects -------------------------------------------------------------------------
    def token(self, user_id: str) -> str:
        return user_token(user_id, self._key)

    def subject(self, user_id: str) -> str:
        return f"{self.settings.events_subject}.{self.token(user_id)}"

    def dead_subject(self, user_id: str) -> str:
        return f"{self.settings.dead_letter_subject}.{self.token(user_id)}"

    def exposure_subject(self, user_id: str) -> str:
        return f"{self.settings.exposures_subject}.{self.token(user_id)}"

    # --- ingestion ------------------------------------------------------------------------
    async def publish(self, events: Sequence[pb.Event]) -> PublishResult:
        """Publish every event and wait for all acknowledgements (concurrently)."""
        now_ms = int(time.time() * 1000)
        timeout = self.settings.nats_timeout_s

        async def one(event: pb.Event) -> Any:
            token = self.token(event.user_id)
            headers = {MSG_ID: message_id(token, event.idempotency_key)}
            return await self.js.publish(
                f"{self.settings.events_subject}.{token}",
                stamped(event, now_ms).SerializeToString(),
                timeout=timeout,
                stream=self.settings.events_stream,
                headers=headers if event.idempotency_key else None,
            )

        acks = await _guard(asyncio.gather(*(one(e) for e in events)))
        last: dict[str, int] = {}
        stored = [i for i, ack in enumerate(acks) if not ack.duplicate]
        for event, ack in zip(events, acks, strict=True):
            last[event.user_id] = max(last.get(event.user_id, 0), int(ack.seq))
        return PublishResult(len(stored), len(events) - len(stored), last, stored)

    async def applied_seq(self, user_id: str) -> int:
        return await self._user_seq(self.settings.applied_bucket, user_id)

    async def applied_seqs(self, user_ids: Sequence[str]) -> dict[str, int]:
        return await self._user_seqs(self.settings.applied_bucket, user_ids)

    async def tombstone_seqs(self, user_ids: Sequence[str]) -> dict[str, int]:
        return await self._user_seqs(self.settings.tombstone_bucket, user_ids)

    async def _user_seqs(self, bucket: str, user_ids: Sequence[str]) -> dict[str, int]:
        """:meth:`_user_seq` of many users: one batched direct get of the keys' last values
        (``multi_last``) per ``MULTI_LAST`` users instead of a request per user (the profile
        worker reads two buckets for every user of a batch). With replicated streams a
        follower may answer, a write behind: for callers to whom an older value is only
        more work (see :meth:`bucket`). A bucket without direct gets (not ``ensure``d since
        they were switched on) is read key by key."""
        await self.bucket(bucket)
        users = list(dict.fromkeys(user_ids))
        if not self._direct[bucket]:
            seqs = await asyncio.gather(*(self._user_seq(bucket, u) for u in users))
            return dict(zip(users, seqs, strict=True))
        prefix = f"$KV.{bucket}."
        of = {prefix + self.token(u): u for u in users}
        subjects = list(of)
        found = await asyncio.gather(
            *(
                self._direct_batch(f"KV_{bucket}", {"multi_last": subjects[i : i + MULTI_LAST]})
                for i in range(0, len(subjects), MULTI_LAST)
            )
        )
        out = dict.fromkeys(users, 0)
        for headers, data in (item for batch in found for item in batch):
            if headers.get("KV-Operation") in ("DEL", "PURGE") or not data:
                continue  # deleted: none
            out[of[headers["Nats-Subject"]]] = int(data)
        return out

    async def _user_seq(self, bucket: str, user_id: str) -> int:
        """The log sequence ``bucket`` holds for the user (applied, tombstoned); 0: none."""
        kv = await self.bucket(bucket)
        try:
            entry = await kv.get(self.token(user_id))
        except nats.js.errors.KeyNotFoundError:
            return 0
        return int(entry.value or b"0")

    async def wait_applied(self, last_seq: dict[str, int], timeout: float) -> bool:
        """True once every user's applied sequence reached ``last_seq`` (within ``timeout``)."""
        deadline = time.monotonic() + timeout
        pending = dict(last_seq)

        async def done(user_id: str, seq: int) -> bool:
            if await self.applied_seq(user_id) >= seq:
                return True
            return await self.tombstone_seq(user_id) >= seq  # deleted: nothing will apply

        while pending:
            finished = await asyncio.gather(*(done(u, s) for u, s in pending.items()))
            pending = {u: s for (u, s), f in zip(pending.items(), finished, strict=True) if not f}
            if not pending:
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(min(0.02, max(0.0, deadline - time.monotonic())))
        return True

    # --- per-user reading, leases, tombstones ----------------------------------------------
    async def user_events(
        self, user_id: str, after_seq: int, limit: int
    ) -> list[tuple[int, bytes]]:
        """The user's events with a sequence above ``after_seq``, oldest first: one batched
        direct get, not one round trip per event."""
        request = {"seq": after_seq + 1, "next_by_subj": self.subject(user_id), "batch": limit}
        found = await self._direct_batch(self.settings.events_stream, request)
        return [(int(headers["Nats-Sequence"]), data) for headers, data in found]

    async def unapplied(
        self, user_id: str, version: int, limit: int = UNAPPLIED
    ) -> tuple[int, int, list[tuple[int, bytes]]]:
        """For a reader of the user's Milvus row at ``version``: the user's tombstone (a row
        older than it is deleted), the sequence the profile workers have applied (past
        ``version``: Milvus has a newer row than this one) and the events after the row and
        the tombstone, oldest first, at most ``limit`` (folded in, a prefix of what is
        pending, never a gap). Three requests at once: the two keys from their buckets'
        leaders, the events in one batched direct get (answered by any replica of the
        stream: on a replicated stream, possibly a write behind)."""
        tombstone, applied, events = await asyncio.gather(
            self.tombstone_seq(user_id),
            self.applied_seq(user_id),
            self.user_events(user_id, version, limit),
        )
        return tombstone, applied, [(seq, data) for seq, data in events if seq > tombstone]

    async def users_events(
        self, after: Mapping[str, int], tail: int = TAIL
    ) -> dict[str, list[tuple[int, bytes]]]:
        """:meth:`user_events` of many users (user id -> the sequence to read after): the
        recent ones from reads of the stream's tail (every user's subject from the lowest of
        their sequences, ``tail`` events a read, at most ``TAIL_READS`` reads, filtered
        here); a user further behind, or the rest of a longer tail, per user. A profile
        worker's batch is mostly recent users: 200 users' 500 new events took 43 ms in one
        read against 123 ms in 200 reads (nats-server 2.15, loopback)."""
        out: dict[str, list[tuple[int, bytes]]] = {u: [] for u in after}
        if not after:
            return out
        newest = max(after.values())
        recent = {u: seq for u, seq in after.items() if seq >= newest - tail * TAIL_READS}
        of = {self.subject(u): u for u in recent}
        start, complete = min(recent.values()) + 1, False
        for _ in range(TAIL_READS):
            subjects = f"{self.settings.events_subject}.*"
            request = {"seq": start, "next_by_subj": subjects, "batch": tail}
            found = await self._direct_batch(self.settings.events_stream, request)
            for headers, data in found:
                user = of.get(headers["Nats-Subject"])
                seq = int(headers["Nats-Sequence"])
                if user is not None and seq > recent[user]:
                    out[user].append((seq, data))
            if not found or int(found[-1][0].get("Nats-Num-Pending") or 0) == 0:
                complete = True
                break
            start = int(found[-1][0]["Nats-Sequence"]) + 1
        rest = {u: seq for u, seq in after.items() if u not in recent}
        if not complete:  # the tail was longer: each user's rest on its own
            rest.update({u: max(seq, start - 1) for u, seq in recent.items()})
        more = await asyncio.gather(*(self.user_events(u, seq, 10_000) for u, seq in rest.items()))
        for u, events in zip(rest, more, strict=True):
            out[u].extend(events)
        return out

    async def _direct_batch(
        self, stream: str, request: dict[str, object]
    ) -> list[tuple[dict[str, str], bytes]]:
        """One batched direct get (ADR-31): the server answers with the messages, then an
        end-of-batch status. Collected by a subscription callback: ``next_msg`` per message
        made a uuid and a task each in nats-py, a visible share of a worker's time."""
        assert self.nc is not None
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        out: list[tuple[dict[str, str], bytes]] = []

        async def collect(msg: Msg) -> None:
            if done.done():
                return
            headers = msg.headers or {}
            status = headers.get("Status")
            if status == "404" or status == "204":  # none at all / end of the batch
                done.set_result(None)
            elif status:
                problem = f"direct get: {status} {headers.get('Description')}"
                done.set_exception(EventLogUnavailable(problem))
            else:
                out.append((headers, msg.data or b""))

        sub = await self.nc.subscribe(self.nc.new_inbox(), cb=collect)
        try:
            await self.nc.publish(
                f"$JS.API.DIRECT.GET.{stream}", json.dumps(request).encode(), reply=sub.subject
            )
            await asyncio.wait_for(done, self.settings.nats_timeout_s)
        finally:
            await sub.unsubscribe()
        return out

    async def acquire_lease(self, user_id: str, owner: str, wait_s: float) -> int | None:
        """The user's apply lease (its revision), waiting up to ``wait_s``; None if busy.

        Taken over the delete marker this process's release left, when it is still the
        key's last message: one round trip (``KeyValue.create`` on a released key costs
        three: the failed create, a read of the marker, the update)."""
        kv = await self.bucket(self.settings.profile_lease_bucket)
        key = self.token(user_id)
        deadline = time.monotonic() + wait_s
        while True:
            marker = self._released.pop(key, None)
            try:
                if marker is not None:
                    with contextlib.suppress(nats.js.errors.KeyWrongLastSequenceError):
                        return int(await kv.update(key, owner.encode(), last=marker))
                return int(await kv.create(key, owner.encode()))
            except nats.js.errors.KeyWrongLastSequenceError:
                if time.monotonic() >= deadline:
                    return None
                await asyncio.sleep(0.02)

    async def release_lease(self, user_id: str, revision: int) -> None:
        """Delete the lease if it is still ours (``revision``), remembering the marker."""
        key = self.token(user_id)
        subject = f"$KV.{self.settings.profile_lease_bucket}.{key}"
        headers = {"KV-Operation": "DEL", "Nats-Expected-Last-Subject-Sequence": str(revision)}
        try:
            ack = await self.js.publish(subject, b"", headers=headers)
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code == 10071:  # expired, and someone else's now
                return
            raise
        if len(self._released) >= RELEASED_KEPT:
            self._released.clear()
        self._released[key] = int(ack.seq)

    async def tombstone_seq(self, user_id: str) -> int:
        return await self._user_seq(self.settings.tombstone_bucket, user_id)

    async def mark_applied(self, user_id: str, seq: int) -> None:
        kv = await self.bucket(self.settings.applied_bucket)
        await kv.put(self.token(user_id), str(seq).encode())

    # --- failed applies and pending vectors -------------------------------------------------
    async def count_failure(self, user_id: str, first_seq: int) -> int:
        """Count one more failed apply of the user's backlog that starts at ``first_seq``;
        returns the count so far. A count kept for another backlog (its events applied or
        dead-lettered since) starts again at 1, so a successful apply needs no write here.
        Called under the user's lease: no two increments of one user race."""
        kv = await self.bucket(self.settings.apply_failures_bucket)
        key = self.token(user_id)
        count = 0
        try:
            entry = await kv.get(key)
            kept = json.loads(entry.value or b"{}")
            if int(kept.get("seq", -1)) == first_seq:
                count = int(kept.get("n", 0))
        except nats.js.errors.KeyNotFoundError:
            pass
        await kv.put(key, json.dumps({"seq": first_seq, "n": count + 1}).encode())
        return count + 1

    async def clear_failures(self, user_id: str) -> None:
        kv = await self.bucket(self.settings.apply_failures_bucket)
        await kv.delete(self.token(user_id))

    async def mark_stale(self, user_id: str, version: int, owner: str) -> PendingVector:
        """Record durably that the user's row ``version`` still needs its vector."""
        kv = await self.bucket(self.settings.reencode_bucket)
        at = time.time()
        value = {"user": user_id, "version": version, "owner": owner, "at": at}
        revision = await kv.put(self.token(user_id), json.dumps(value).encode())
        return PendingVector(user_id, version, owner, at, int(revision))

    async def pending_vectors(self) -> list[PendingVector]:
        """Every user whose vector is still pending, from all workers (one ordered consumer
        over the bucket's last values, stopped at its end)."""
        kv = await self.bucket(self.settings.reencode_bucket)
        # An ordered consumer outlives its unsubscribe by its inactive threshold (5 min by
        # default): short, as a worker looks every half lease.
        watcher = await kv.watchall(
            ignore_deletes=True, inactive_threshold=2 * self.settings.nats_timeout_s
        )
        out: list[PendingVector] = []
        try:
            while (entry := await watcher.updates(self.settings.nats_timeout_s)) is not None:
                if entry.operation is not None or not entry.value:  # deleted or purged
                    continue
                v = json.loads(entry.value)
                out.append(
                    PendingVector(
                        str(v["user"]),
                        int(v["version"]),
                        str(v["owner"]),
                        float(v["at"]),
                        int(entry.revision or 0),
                    )
                )
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()
        return out

    async def vector_written(self, pending: PendingVector) -> bool:
        """Remove the entry if it is still ``pending`` (an apply since re-marked it: kept)."""
        kv = await self.bucket(self.settings.reencode_bucket)
        return await _delete_if_last(kv, self.token(pending.user_id), pending.revision)

    async def dead_letter(self, user_id: str, seq: int, payload: bytes, reason: str) -> None:
        """Move one event to the dead-letter stream (with its reason), then out of the log."""
        await self.js.publish(
            self.dead_subject(user_id),
            payload,
            stream=self.settings.dead_letter_stream,
            headers={REASON: reason[:1000], ORIGINAL_SEQ: str(seq), MSG_ID: f"dead-{seq}"},
        )
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self.js.delete_msg(self.settings.events_stream, seq)

    async def forget_user(
        self, user_id: str, lease_wait_s: float, while_leased: Callable[[], object] | None = None
    ) -> int:
        """Purge the user's events (log, dead letters, exposures) and what the workers keep
        of them (a pending vector, which names the user; a failure count), tombstone them and run
        ``while_leased`` (in a thread: deleting the row), all under the user's lease, so that
        no worker applies an event meanwhile, nor a newer one onto the row about to go;
        returns the events purged."""
        revision = await self.acquire_lease(user_id, "delete-user", lease_wait_s)
        if revision is None:
            raise EventLogUnavailable("a profile worker holds the user's lease; retry")
        try:
            before = await self.js.stream_info(
                self.settings.events_stream, subjects_filter=self.subject(user_id)
            )
            purged = int((before.state.subjects or {}).get(self.subject(user_id), 0))
            await self.js.purge_stream(self.settings.events_stream, subject=self.subject(user_id))
            await self.js.purge_stream(
                self.settings.dead_letter_stream, subject=self.dead_subject(user_id)
            )
            await self.js.purge_stream(
                self.settings.exposures_stream, subject=self.exposure_subject(user_id)
            )
            last = (await self.js.stream_info(self.settings.events_stream)).state.last_seq
            tombstones = await self.bucket(self.settings.tombstone_bucket)
            await tombstones.put(self.token(user_id), str(last).encode())
            applied = await self.bucket(self.settings.applied_bucket)
            await applied.put(self.token(user_id), str(last).encode())
            for bucket in (self.settings.reencode_bucket, self.settings.apply_failures_bucket):
                await (await self.bucket(bucket, create=True)).delete(self.token(user_id))
            if while_leased is not None:
                await asyncio.to_thread(while_leased)
            return purged
        finally:
            await self.release_lease(user_id, revision)


async def _delete_if_last(kv: KeyValue, key: str, revision: int) -> bool:
    """Delete ``key`` only while ``revision`` is its last; False when it moved on.

    nats-py maps the server's "wrong last sequence" (10071) to ``KeyWrongLastSequenceError``
    for ``update`` only: ``delete`` raises a plain ``BadRequestError`` with that code."""
    try:
        await kv.delete(key, last=revision)
        return True
    except nats.js.errors.KeyWrongLastSequenceError:
        return False
    except nats.js.errors.BadRequestError as exc:
        if exc.err_code == 10071:
            return False
        raise


async def _guard(awaitable: Awaitable[T]) -> T:
    """NATS failures as :class:`EventLogUnavailable` (UNAVAILABLE, retry), never INTERNAL."""
    try:
        return await awaitable
    except (TimeoutError, nats.errors.Error, OSError) as exc:
        raise EventLogUnavailable(f"event log: {type(exc).__name__}: {exc}") from exc


class BlockingEventLog:
    """An :class:`EventLog` on its own event-loop thread, for synchronous callers.

    Connecting is retried in the background until NATS answers (the gateway starts before
    the log is reachable and reports NOT_SERVING meanwhile).
    """

    def __init__(self, settings: Settings, name: str = "recsys-gateway") -> None:
        self.settings = settings
        self.log = EventLog(settings, name)
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self.loop.run_forever, name="event-log", daemon=True)
        self._thread.start()
        self._connecting = asyncio.run_coroutine_threadsafe(self._connect(), self.loop)
        self._closed = False

    async def _connect(self) -> None:
        while True:
            try:
                await self.log.connect()
                await self.log.ensure()
                self._ready.set()
                log.info("event log: connected to %s", self.settings.nats_urls)
                return
            except Exception as exc:  # retried until it works; the log says why not
                log.debug("event log not reachable yet: %s", exc)
                await self.log.close()
                await asyncio.sleep(0.5)

    def call(self, make: Callable[[EventLog], Coroutine[Any, Any, T]], timeout: float) -> T:
        """Run ``make(log)`` on the loop and wait at most ``timeout`` seconds for it."""
        if self._closed:
            raise EventLogUnavailable("event log: closed")
        if not self._ready.is_set():
            raise EventLogUnavailable("event log: not connected to NATS yet")
        future = asyncio.run_coroutine_threadsafe(_guard(make(self.log)), self.loop)
        try:
            return future.result(timeout=max(0.001, timeout))
        except TimeoutError as exc:
            future.cancel()
            raise EventLogUnavailable("event log: no acknowledgement in time") from exc

    def wait_connected(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the first connection (streams and buckets
        ensured); whether it came."""
        return self._ready.wait(timeout)

    def ready(self) -> bool:
        if not self._ready.is_set():
            return False
        try:
            return self.call(lambda el: el.healthy(), 2.0)
        except EventLogUnavailable:
            return False

    def close(self) -> None:
        """Close the connection, stop the loop's thread and close the loop. Once: a second
        call (a gateway stopped twice) used to schedule the close on the stopped loop, wait
        five seconds for it, and leave the coroutine to be dropped, never awaited, whenever
        the loop was collected."""
        if self._closed:
            return
        self._closed = True
        self._connecting.cancel()
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self.log.close(), self.loop).result(timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()
