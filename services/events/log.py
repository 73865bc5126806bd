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
  applied sequence, which the gateway waits for to keep read-your-writes).

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
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.kv import KeyValue

from core.config import Settings
from services.api import pb

log = logging.getLogger(__name__)
T = TypeVar("T")
MSG_ID = "Nats-Msg-Id"
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
        ):
            await self.bucket(bucket, ttl, create=True)

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
        if name not in self._kv:
            try:
                self._kv[name] = await self.js.key_value(name)
            except nats.js.errors.BucketNotFoundError:
                if not create:
                    raise
                self._kv[name] = await self.js.create_key_value(
                    bucket=name,
                    history=1,
                    ttl=ttl,
                    replicas=self.settings.stream_replicas,
                    storage=StorageType.FILE,
                )
        return self._kv[name]

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

    async def visible_version(self, user_id: str) -> int | None:
        """The ``version`` the user's Milvus row has at least, now that the workers applied
        its events: 0 when none ever went through the log (a row, if any, is an indexing
        job's); None when the user was deleted and no event was applied since."""
        applied, tombstone = await asyncio.gather(
            self.applied_seq(user_id), self.tombstone_seq(user_id)
        )
        if applied > tombstone:
            return applied
        return None if tombstone else 0

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
        direct get (the server answers with the messages, then an end-of-batch status), not
        one round trip per event."""
        assert self.nc is not None
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        request = {"seq": after_seq + 1, "next_by_subj": self.subject(user_id), "batch": limit}
        out: list[tuple[int, bytes]] = []
        try:
            await self.nc.publish(
                f"$JS.API.DIRECT.GET.{self.settings.events_stream}",
                json.dumps(request).encode(),
                reply=inbox,
            )
            while True:
                msg = await sub.next_msg(timeout=self.settings.nats_timeout_s)
                headers = msg.headers or {}
                status = headers.get("Status")
                if status == "404" or status == "204":  # none at all / end of the batch
                    return out
                if status:
                    raise EventLogUnavailable(f"direct get: {status} {headers.get('Description')}")
                out.append((int(headers["Nats-Sequence"]), msg.data or b""))
        finally:
            await sub.unsubscribe()

    async def acquire_lease(self, user_id: str, owner: str, wait_s: float) -> int | None:
        """The user's apply lease (its revision), waiting up to ``wait_s``; None if busy."""
        kv = await self.bucket(self.settings.profile_lease_bucket)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return int(await kv.create(self.token(user_id), owner.encode()))
            except nats.js.errors.KeyWrongLastSequenceError:
                if time.monotonic() >= deadline:
                    return None
                await asyncio.sleep(0.02)

    async def release_lease(self, user_id: str, revision: int) -> None:
        kv = await self.bucket(self.settings.profile_lease_bucket)
        with contextlib.suppress(nats.js.errors.KeyWrongLastSequenceError):
            await kv.delete(self.token(user_id), last=revision)  # only if still ours

    async def tombstone_seq(self, user_id: str) -> int:
        return await self._user_seq(self.settings.tombstone_bucket, user_id)

    async def mark_applied(self, user_id: str, seq: int) -> None:
        kv = await self.bucket(self.settings.applied_bucket)
        await kv.put(self.token(user_id), str(seq).encode())

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
        """Purge the user's events (log, dead letters, exposures), tombstone them and run
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
            if while_leased is not None:
                await asyncio.to_thread(while_leased)
            return purged
        finally:
            await self.release_lease(user_id, revision)


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
        if not self._ready.is_set():
            raise EventLogUnavailable("event log: not connected to NATS yet")
        future = asyncio.run_coroutine_threadsafe(_guard(make(self.log)), self.loop)
        try:
            return future.result(timeout=max(0.001, timeout))
        except TimeoutError as exc:
            future.cancel()
            raise EventLogUnavailable("event log: no acknowledgement in time") from exc

    def ready(self) -> bool:
        if not self._ready.is_set():
            return False
        try:
            return self.call(lambda el: el.healthy(), 2.0)
        except EventLogUnavailable:
            return False

    def close(self) -> None:
        self._connecting.cancel()
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self.log.close(), self.loop).result(timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
