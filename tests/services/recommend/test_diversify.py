"""Stage ``diversify``: MMR over the candidates' vectors (core.fusion.mmr)."""

from __future__ import annotations

import numpy as np

from services.recommend.context import Candidate
from services.recommend.diversify import mmr


def test_mmr_zero_is_relevance_order_and_diversity_spreads() -> None:
    vecs = {"a": [1, 0], "a2": [0.99, 0.14], "b": [0, 1]}
    cands = []
    for item_id, rel in (("a", 1.0), ("a2", 0.9), ("b", 0.5)):
        c = Candidate(item_id, {"vector": np.array(vecs[item_id], dtype=np.float32)})
        c.relevance = rel
        cands.append(c)
    assert [c.item_id for c in mmr(cands, 3, 0.0)] == ["a", "a2", "b"]
    assert [c.item_id for c in mmr(cands, 2, 0.7)] == ["a", "b"]
    assert mmr([], 3, 0.5) == []
