"""Anonymous sessions: a visitor without a user id, remembered for a while, never profiled.

A session's recent item ids live in a JetStream key-value bucket (``RECSYS_SESSIONS_BUCKET``)
whose entries expire ``RECSYS_SESSION_TTL_S`` after the session's last event (each write is
a new entry), so every gateway replica sees the same session and nothing of it outlives the
TTL: no Milvus user row, no event in the events stream, no profile worker. Keys are a hash of
the session id (bucket keys allow fewer characters than ids, and the bucket then holds no
client identifier). Concurrent writes to one session are compare-and-set on the entry's
revision, retried.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import nats.js.errors

from core.config import Settings
from services.events.log import BlockingEventLog, EventLog, EventLogUnavailable

MAX_ITEMS = 50  # newest first; the pipeline reads its history window of them
CAS_ATTEMPTS = 5


def session_key(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()[:40]


class Sessions:
    """Read and extend anonymous sessions' recent items through the event log's NATS."""

    def __init__(self, settings: Settings, events: BlockingEventLog) -> None:
        self.settings = settings
        self.events = events

    def recent(self, session_id: str, timeout: float) -> list[str]:
        """The session's item ids, newest first (empty for a new or expired session)."""

        async def read(log: EventLog) -> list[str]:
            kv = await log.bucket(self.settings.sessions_bucket, self.settings.session_ttl_s, True)
            try:
                entry = await kv.get(session_key(session_id))
            except nats.js.errors.KeyNotFoundError:
                return []
            return [str(i) for i in json.loads(entry.value or b"[]")]

        return self.events.call(read, timeout)

    def add(self, session_id: str, item_ids: Sequence[str], timeout: float) -> None:
        """Put ``item_ids`` (oldest first) at the front of the session's items."""

        async def write(log: EventLog) -> None:
            kv = await log.bucket(self.settings.sessions_bucket, self.settings.session_ttl_s, True)
            key = session_key(session_id)
            for _ in range(CAS_ATTEMPTS):
                try:
                    entry = await kv.get(key)
                    items, revision = json.loads(entry.value or b"[]"), entry.revision
                except nats.js.errors.KeyNotFoundError:
                    items, revision = [], None
                for item in item_ids:
                    items = [item, *(i for i in items if i != item)]
                value = json.dumps(items[:MAX_ITEMS]).encode()
                try:
                    if revision is None:
                        await kv.create(key, value)
                    else:
                        await kv.update(key, value, last=revision)
                    return
                except nats.js.errors.KeyWrongLastSequenceError:
                    continue  # another replica wrote meanwhile: read again
            raise EventLogUnavailable(f"session {key}: {CAS_ATTEMPTS} concurrent writes in a row")

        self.events.call(write, timeout)
