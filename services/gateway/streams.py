"""A client stream's messages, each awaited for a bounded time without holding a work slot.

gRPC Python hands a stream-unary handler a blocking iterator with no timeout: a client that
opens a stream and sends nothing would hold its worker and its concurrency slot until the
call's deadline. :func:`client_messages` reads the stream on a helper thread and waits for
each message at most ``idle_s`` (and never past the call's deadline), with the call's
concurrency slot given back while it waits (:func:`~services.reliability.concurrency.
slot_released`). The helper thread ends with the call: gRPC ends the request iterator of a
finished call.
"""

from __future__ import annotations

import contextvars
import queue
import threading
from collections.abc import Iterator
from typing import TypeVar, cast

from services.deadline import Deadline, DeadlineExceeded
from services.reliability.concurrency import slot_released

T = TypeVar("T")
_PUT_POLL_S = 0.1  # how often a blocked reader checks whether the handler gave up


class StreamIdle(TimeoutError):
    """The client sent no message within the idle timeout."""


def client_messages(requests: Iterator[T], idle_s: float, deadline: Deadline) -> Iterator[T]:
    """The messages of ``requests``, each awaited at most ``idle_s`` (:class:`StreamIdle`)
    and within ``deadline`` (:class:`DeadlineExceeded`); a read error is raised here."""
    box: queue.Queue[tuple[str, object]] = queue.Queue(maxsize=1)  # one ahead: back-pressure
    done = threading.Event()

    def put(kind: str, value: object) -> bool:
        while not done.is_set():
            try:
                box.put((kind, value), timeout=_PUT_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for message in requests:
                if not put("message", message):
                    return
            put("end", None)
        except Exception as exc:  # the call was cancelled or ended: tell the handler
            put("error", exc)

    # the reader runs in the handler's context: the interceptors' context variables (the
    # authenticated client, which the user-binding check reads per message) must reach it
    context = contextvars.copy_context()
    threading.Thread(target=context.run, args=(read,), name="stream-reader", daemon=True).start()
    try:
        while True:
            wait = min(idle_s, deadline.left())
            try:
                with slot_released():
                    kind, value = box.get(timeout=max(wait, 0.0))
            except queue.Empty:
                if deadline.expired():
                    raise DeadlineExceeded(
                        "stream: deadline passed waiting for a message"
                    ) from None
                raise StreamIdle(f"no message within {idle_s:g} s") from None
            if kind == "end":
                return
            if kind == "error":
                assert isinstance(value, BaseException)
                raise value
            yield cast(T, value)
    finally:
        done.set()
