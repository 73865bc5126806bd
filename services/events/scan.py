"""Whole-stream reads for batch jobs: every message of a stream, and the tombstone bucket.

The A/B report reads the exposures stream and the training export reads the events stream
with :func:`scan_stream`: an ephemeral, unacknowledged pull consumer (nothing is consumed for
anyone else; the server drops it after ``INACTIVE_S``) bounded by the stream's last sequence
when the scan starts, so a busy stream still gives a finite, consistent snapshot.

:class:`Tombstones` is the set of deleted users (token -> stream sequence at deletion) that
the indexing and segment jobs and the export honour, so a deleted user never comes back.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import nats.errors
import nats.js.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from core.config import Settings
from services.events.log import MSG_ID, EventLog, _guard, user_token

INACTIVE_S = 30.0  # the server deletes an abandoned scan's consumer after this long
FETCH_WAIT_S = 1.0
CONNECT_TIMEOUT_S = 10.0
T = TypeVar("T")


@dataclass(frozen=True)
class StreamMessage:
    """One stored message: its sequence, subject, message id (``""`` when none) and data."""

    seq: int
    subject: str
    msg_id: str
    data: bytes


async def scan_stream(
    log: EventLog, stream: str, subjects: str, batch: int = 1000
) -> AsyncIterator[list[StreamMessage]]:
    """Batches of the stream's messages on ``subjects``, oldest first, up to the last
    sequence stored when the scan began."""
    try:
        info = await log.js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        return  # never created: nothing was ever written
    last = int(info.state.last_seq)
    if not info.state.messages:
        return
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.NONE,
        inactive_threshold=INACTIVE_S,
        max_ack_pending=-1,
    )
    sub = await log.js.pull_subscribe(subjects, stream=stream, config=config)
    try:
        done = False
        while not done:
            try:
                msgs = await sub.fetch(batch, timeout=FETCH_WAIT_S)
            except (nats.errors.TimeoutError, TimeoutError):
                break  # nothing more on these subjects (the rest was purged or expired)
            out = []
            for m in msgs:
                seq = int(m.metadata.sequence.stream)
                if seq > last:
                    done = True
                    break
                headers = m.headers or {}
                out.append(StreamMessage(seq, m.subject, headers.get(MSG_ID, ""), m.data or b""))
                done = seq >= last or int(m.metadata.num_pending or 0) == 0
            if out:
                yield out
    finally:
        await sub.unsubscribe()


def subject_token(subject: str) -> str:
    """The user token of a ``<prefix>.<token>`` subject."""
    return subject.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class Tombstones:
    """Deleted users: user token -> the events stream's last sequence when they were deleted.

    An event at or below that sequence belongs to the deleted user and never comes back;
    a later one is the user's again (the worker applies it as a new profile)."""

    seqs: Mapping[str, int] = field(default_factory=dict)
    key: bytes = b""

    def token(self, user_id: str) -> str:
        return user_token(user_id, self.key)

    def deleted(self, user_id: str) -> bool:
        """The user was deleted (at any time): offline data about them must not be used."""
        return self.token(user_id) in self.seqs

    def covers(self, token: str, seq: int) -> bool:
        """The event ``seq`` on the user ``token``'s subject predates their deletion."""
        return seq <= self.seqs.get(token, 0)

    def __len__(self) -> int:
        return len(self.seqs)

    @classmethod
    async def read(cls, log: EventLog) -> Tombstones:
        try:
            kv = await log.bucket(log.settings.tombstone_bucket)
            keys = await kv.keys()
        except (nats.js.errors.BucketNotFoundError, nats.js.errors.NoKeysError):
            keys = []  # no bucket yet: nobody was deleted
        seqs: dict[str, int] = {}
        for key in keys:
            try:
                entry = await kv.get(key)
            except nats.js.errors.KeyNotFoundError:
                continue
            seqs[key] = int(entry.value or b"0")
        return cls(seqs, log.settings.pseudonym_key.get_secret_value().encode())

    @classmethod
    def load(cls, settings: Settings) -> Tombstones:
        """The tombstone bucket now (a blocking call for the batch jobs); raises
        :class:`services.events.log.EventLogUnavailable` when the log cannot be reached:
        a job must not run blind to deletions."""
        return asyncio.run(with_log(settings, cls.read))


async def with_log(
    settings: Settings, work: Callable[[EventLog], Awaitable[T]], name: str = "recsys-batch"
) -> T:
    """``work`` on a fresh connection to the log, closed afterwards; NATS failures raise
    :class:`services.events.log.EventLogUnavailable`. The streams are not ensured: a batch
    job must not reconfigure them with its own settings."""
    log = EventLog(settings, name)
    try:
        # a batch job fails fast when NATS is down (the client itself retries forever)
        await _guard(asyncio.wait_for(log.connect(), CONNECT_TIMEOUT_S))
        return await _guard(work(log))
    finally:
        await log.close()
