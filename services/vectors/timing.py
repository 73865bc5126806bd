"""The wall time one request spends in Milvus calls, summed over its ``VectorStore`` calls.

A stage's latency mixes Milvus with the Python around it; the target "Milvus time inside
``Recommend``" needs the calls alone. The pipeline opens a :func:`milvus_clock` per request;
every store method marked :func:`timed` adds its wall time to the innermost open clock of
its context (a ``ContextVar``: concurrent requests on other threads keep their own sums).
A timed method called from another one counts once, with the outer call. The sum is also
kept per method (what a request's Milvus time is made of).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


class MilvusClock:
    """The summed wall time of a request's timed store calls, in total and per method."""

    __slots__ = ("by_method", "depth", "seconds")

    def __init__(self) -> None:
        self.seconds = 0.0
        self.by_method: dict[str, float] = {}
        self.depth = 0


_current: ContextVar[MilvusClock | None] = ContextVar("milvus_clock", default=None)


@contextmanager
def milvus_clock() -> Iterator[MilvusClock]:
    """Sum the timed store calls made inside the block (read the clock as it goes)."""
    clock = MilvusClock()
    token = _current.set(clock)
    try:
        yield clock
    finally:
        _current.reset(token)


def timed(method: Callable[P, R]) -> Callable[P, R]:
    """Count ``method``'s wall time (failures too) toward the open clock, if any."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        clock = _current.get()
        if clock is None or clock.depth:
            return method(*args, **kwargs)
        clock.depth += 1
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            spent = time.perf_counter() - start
            clock.seconds += spent
            name = method.__name__
            clock.by_method[name] = clock.by_method.get(name, 0.0) + spent
            clock.depth -= 1

    return wrapper
