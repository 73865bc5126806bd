"""Stage ``explain``: a popular item the user's history also led to is explained by that."""

from __future__ import annotations

from services.recommend.context import Candidate
from services.recommend.explain import reason
from tests.services.recommend.fakes import row


def test_personal_evidence_explains_a_popular_pick_and_popularity_stays_last() -> None:
    history = [{**row("Heat"), "vector": [1.0, 0.0]}, {**row("Up"), "vector": [0.0, 1.0]}]
    item = {**row("x", pop=9.0), "vector": [0.1, 0.9]}
    both = Candidate("x", item, {"popular": 0, "co_occurrence": 5}, {"co_occurrence": "Heat"})
    assert reason(both, history) == "people who liked Heat also liked this"
    ann = Candidate("x", item, {"popular": 0, "ann": 7})
    assert reason(ann, history) == "similar to Up you liked"
    sequence = Candidate("x", item, {"popular": 0, "sequence": 2})
    assert reason(sequence, history) == "for your recent interest in Up"
    assert reason(Candidate("x", item, {"sequence": 0}), history) == (
        "for your recent interest in Up"
    )
    only = Candidate("x", item, {"popular": 0})
    assert reason(only, history) == "popular overall"
    segment = Candidate("x", item, {"segment": 0, "co_occurrence": 3}, {"co_occurrence": "Up"})
    assert reason(segment, history) == "popular in your segment"  # its best source speaks
