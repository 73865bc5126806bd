"""The request context: deadlines with a reserve, and stages timing themselves."""

from __future__ import annotations

import time

import pytest

from services.deadline import Deadline, DeadlineExceeded
from services.recommend.context import RESERVE, Context, Filters, Stage


def test_deadline() -> None:
    d = Deadline.from_remaining(None, 0.5)
    assert 0.4 < d.left() <= 0.5
    assert d.reserve(0.5).at < d.at
    gone = Deadline(time.monotonic() - 1)
    assert gone.expired()
    with pytest.raises(DeadlineExceeded):
        gone.left()


def test_dependency_calls_keep_a_reserve_for_answering() -> None:
    ctx = Context.begin("u", 5, Filters(), Deadline.after(1.0))
    left = ctx.answer_by.left()
    assert ctx.deadline.left() == pytest.approx((1 - RESERVE) * left, abs=0.01)


class Sleepy(Stage):
    name = "sleepy"

    def __init__(self, seconds: float, fail: bool = False) -> None:
        self.seconds, self.fail = seconds, fail

    def run(self, ctx: Context) -> None:
        time.sleep(self.seconds)
        if self.fail:
            raise RuntimeError("stage failed")


def test_a_stage_observes_its_own_latency_as_it_ends() -> None:
    seen: list[tuple[str, float]] = []
    ctx = Context.begin(
        "u", 5, Filters(), Deadline.after(5), on_stage=lambda s, t: seen.append((s, t))
    )
    with pytest.raises(RuntimeError):
        Sleepy(0.05, fail=True)(ctx)
    assert seen == [] and ctx.timings == {}  # a failed stage records nothing ...
    Sleepy(0.01)(ctx)
    assert [s for s, _ in seen] == ["sleepy"]
    assert seen[0][1] >= 0.06  # ... its time counts toward the stage that answers instead
    assert ctx.timings == {"sleepy": seen[0][1]}
