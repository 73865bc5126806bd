"""Stage ``ranking``: the CTR ranker's order is one more vote in the fusion."""

from __future__ import annotations

import pytest

from services.recommend.rank import fuse_ranker
from services.recommend.retrieve import Retriever
from tests.services.recommend.fakes import row


def test_ranker_votes_in_the_fusion_instead_of_replacing_it() -> None:
    lists = {"ann": [row("a"), row("b"), row("c")], "popular": [row("a"), row("c")]}
    cands = Retriever.fuse(lists, {"ann": 1.0, "popular": 1.0}, n=10)  # a, c, b
    for cand, ctr in zip(cands, (0.1, 0.2, 0.9), strict=True):  # the ranker likes b best
        cand.ctr = ctr
    fused = {c.item_id: c.fused for c in cands}
    fuse_ranker(cands, weight=1.0)
    relevance = {c.item_id: c.relevance for c in cands}
    # the standard RRF term 1 / (60 + rank), rank 1-based (core.fusion.rrf, also offline)
    assert relevance["b"] == pytest.approx(fused["b"] + 1 / 61)  # first by probability
    assert relevance["a"] == pytest.approx(fused["a"] + 1 / 63)
    assert relevance["a"] > relevance["b"]  # two sources' agreement outweighs one vote
    fuse_ranker(cands, weight=0.0)
    assert {c.item_id: c.relevance for c in cands} == fused
