"""List and replay dead letters (events the profile worker could not apply).

A replay publishes the event again onto the events stream (a new sequence, after the
user's newer events) and removes it from the dead-letter stream, so fix the cause first.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import nats.js.errors
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import DecodeError

from core.config import Settings
from services.api import pb
from services.events.log import ORIGINAL_SEQ, REASON, EventLog


@dataclass(frozen=True)
class DeadLetter:
    seq: int
    original_seq: int
    reason: str
    event: dict[str, object]
    payload: bytes


async def list_dead(settings: Settings, limit: int = 100) -> list[DeadLetter]:
    events = EventLog(settings, name="dead-letters")
    await events.connect()
    try:
        await events.ensure()
        out: list[DeadLetter] = []
        seq = 0
        while len(out) < limit:
            try:
                msg = await events.js.get_msg(
                    settings.dead_letter_stream,
                    seq=seq + 1,
                    subject=f"{settings.dead_letter_subject}.*",
                    next=True,
                )
            except nats.js.errors.NotFoundError:
                break
            assert msg.seq is not None
            seq = msg.seq
            headers = msg.headers or {}
            payload = msg.data or b""
            try:
                event = MessageToDict(pb.Event.FromString(payload))
            except DecodeError:
                event = {"undecodable": payload[:64].hex()}
            out.append(
                DeadLetter(
                    seq,
                    int(headers.get(ORIGINAL_SEQ, 0)),
                    str(headers.get(REASON, "")),
                    event,
                    payload,
                )
            )
        return out
    finally:
        await events.close()


async def replay(settings: Settings, seqs: list[int]) -> int:
    """Publish the named dead letters again (all when ``seqs`` is empty); returns how many."""
    letters = await list_dead(settings, limit=1_000_000)
    chosen = [d for d in letters if not seqs or d.seq in seqs]
    events = EventLog(settings, name="dead-letters")
    await events.connect()
    try:
        for letter in chosen:
            event = pb.Event.FromString(letter.payload)  # undecodable ones cannot be replayed
            await events.js.publish(
                events.subject(event.user_id), letter.payload, stream=settings.events_stream
            )
            await events.js.delete_msg(settings.dead_letter_stream, letter.seq)
        return len(chosen)
    finally:
        await events.close()


def main(settings: Settings, argv: list[str]) -> int:
    if argv[:1] == ["list"]:
        for d in asyncio.run(list_dead(settings)):
            print(
                json.dumps(
                    {
                        "seq": d.seq,
                        "original_seq": d.original_seq,
                        "reason": d.reason,
                        "event": d.event,
                    }
                )
            )
        return 0
    if argv[:1] == ["replay"]:
        count = asyncio.run(replay(settings, [int(a) for a in argv[1:]]))
        print(f"replayed {count} dead letter(s)")
        return 0
    print("usage: python -m services.profile_worker dead-letters list | replay [SEQ ...]")
    return 2
