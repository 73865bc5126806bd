"""A request's deadline, carried from the gRPC call down to every Triton and Milvus call."""

from __future__ import annotations

import time
from dataclasses import dataclass


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
    def from_remaining(cls, remaining: float | None, default_s: float) -> Deadline:
        """The client's remaining time, or ``default_s`` when the client sent no deadline."""
        return cls.after(default_s if remaining is None else remaining)

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
