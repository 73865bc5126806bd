"""A request's deadline, carried from the gRPC call down to every Triton and Milvus call."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

#: Remaining times at or beyond this mean "the client set no deadline". gRPC Python does not
#: report that as ``None``: ``time_remaining()`` returns the distance to its infinite future
#: (about 9.2e18 s), which as a timeout makes Milvus fail at once and ``threading`` waits
#: overflow. No real client waits a year for a recommendation.
NO_DEADLINE_S = 365 * 24 * 3600.0


class DeadlineExceeded(TimeoutError):
    """The call's deadline passed before the work was done."""


@dataclass(frozen=True)
class Deadline:
    """An absolute point on the monotonic clock."""

    at: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds)

    @classmethod
    def from_remaining(
        cls, remaining: float | None, default_s: float, max_s: float | None = None
    ) -> Deadline:
        """The client's remaining time, bounded so no server-side wait is unbounded.

        ``None``, NaN or anything from :data:`NO_DEADLINE_S` up is "no deadline" and gets
        ``default_s``; a real deadline longer than ``max_s`` is cut to ``max_s`` (a client may
        give up later than that, the server does not work longer). ``default_s`` itself is
        capped by ``max_s`` too.
        """
        cap = math.inf if max_s is None else max_s
        if remaining is None or math.isnan(remaining) or remaining >= NO_DEADLINE_S:
            return cls.after(min(default_s, cap))
        return cls.after(min(remaining, cap))

    def left(self) -> float:
        """Seconds left; raises :class:`DeadlineExceeded` when none are."""
        remaining = self.at - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded("deadline exceeded")
        return remaining

    def reserve(self, share: float) -> Deadline:
        """An earlier deadline that keeps ``share`` of the time left for answering anyway."""
        return Deadline(self.at - share * max(self.at - time.monotonic(), 0.0))

    def expired(self) -> bool:
        return time.monotonic() >= self.at
