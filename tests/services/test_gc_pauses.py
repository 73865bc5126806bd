"""``freeze_long_lived``: what is alive goes out of the collector's reach, garbage does not."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from services.gc_pauses import freeze_long_lived


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    """The test process's own objects back under the collector afterwards."""
    yield
    gc.unfreeze()


def test_live_objects_are_frozen_and_cycle_garbage_is_collected_first() -> None:
    a, b = Node(), Node()
    a.other, b.other = b, a  # a reference cycle: only the cyclic collector frees it
    garbage = weakref.ref(a)
    del a, b
    kept = {"catalogue": [1, 2, 3]}
    gc.unfreeze()
    freeze_long_lived()
    assert garbage() is None  # collected before the freeze, not kept for good
    assert gc.get_freeze_count() > 0
    tracked = {id(o) for g in range(3) for o in gc.get_objects(generation=g)}
    assert id(kept) not in tracked  # frozen: no collection walks it any more
