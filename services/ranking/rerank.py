"""Ranking: CTR scores from the cross-encoder on Triton, then an MMR diversity re-rank."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from core import fusion
from core.text import item_text
from services.deadline import Deadline
from services.inference.triton_client import TritonClient
from services.retrieval.candidates import Candidate


def score_ctr(
    triton: TritonClient,
    user_text: str,
    candidates: Sequence[Candidate],
    deadline: Deadline,
    version: str | None = None,
) -> None:
    """Set each candidate's click probability (``ctr``), in one batched request."""
    documents = [
        item_text(c.row["title"], c.row["categories"], c.row.get("text", "")) for c in candidates
    ]
    probabilities = triton.score(user_text, documents, deadline.left(), version)
    for cand, p in zip(candidates, probabilities, strict=True):
        cand.ctr = float(p)


def fuse_ranker(candidates: Sequence[Candidate], weight: float) -> None:
    """The ranker's order joins the retrieval fusion as one more list:
    ``relevance = fused + weight · rrf(rank by click probability)``.

    A vote rather than a replacement: the cross-encoder sees one (user text, item text) pair
    at a time and none of the collaborative or recency evidence behind the candidates, so on
    its own it re-orders them worse than retrieval did (``make eval``); as one more list its
    vote helps (offline: +0.006 NDCG@10 at weight 1, tuned on validation windows).
    """
    order = sorted(
        (c for c in candidates if c.ctr is not None), key=lambda c: (-(c.ctr or 0.0), c.item_id)
    )
    for rank, cand in enumerate(order):
        cand.relevance = cand.fused + weight * fusion.rrf(rank + 1)


def mmr(candidates: Sequence[Candidate], k: int, diversity: float) -> list[Candidate]:
    """The final ``k`` by maximal marginal relevance (:func:`core.fusion.mmr`) over the item
    vectors; with λ = 0 this is plain relevance order."""
    if not candidates:
        return []
    pool = list(candidates)
    relevance = np.array([c.relevance for c in pool], dtype=np.float64)
    vectors = (
        np.stack([np.asarray(c.row["vector"], dtype=np.float32) for c in pool])
        if diversity > 0
        else None
    )
    return [pool[i] for i in fusion.mmr(relevance, vectors, k, diversity)]
