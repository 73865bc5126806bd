"""Deadlines from gRPC's remaining time: "no deadline" and overlong ones stay bounded."""

from __future__ import annotations

import math

import pytest

from services.deadline import NO_DEADLINE_S, Deadline

GRPC_NO_DEADLINE = 9.2e18  # what grpc's context.time_remaining() returns without a deadline


@pytest.mark.parametrize("remaining", [None, GRPC_NO_DEADLINE, NO_DEADLINE_S, math.nan])
def test_no_deadline_gets_the_default(remaining: float | None) -> None:
    left = Deadline.from_remaining(remaining, 2.0, 30.0).left()
    assert 1.9 < left <= 2.0


def test_a_normal_deadline_is_kept() -> None:
    assert 4.9 < Deadline.from_remaining(5.0, 2.0, 30.0).left() <= 5.0
    assert 0.4 < Deadline.from_remaining(0.5, 2.0, 30.0).left() <= 0.5


def test_a_deadline_above_the_maximum_is_cut_to_it() -> None:
    assert 29.9 < Deadline.from_remaining(3600.0, 2.0, 30.0).left() <= 30.0
    assert 29.9 < Deadline.from_remaining(NO_DEADLINE_S - 1, 2.0, 30.0).left() <= 30.0


def test_the_default_never_exceeds_the_maximum() -> None:
    assert 0.9 < Deadline.from_remaining(GRPC_NO_DEADLINE, 60.0, 1.0).left() <= 1.0


def test_without_a_maximum_the_old_behaviour_holds() -> None:
    assert 99 < Deadline.from_remaining(100.0, 2.0).left() <= 100.0
    assert 1.9 < Deadline.from_remaining(GRPC_NO_DEADLINE, 2.0).left() <= 2.0
