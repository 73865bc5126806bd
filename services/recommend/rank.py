"""Stage ``ranking``: the CTR cross-encoder on Triton, one batched request, as a vote.

Until the ranker votes, candidates keep retrieval order; a ranker that is deployed but not
ready, or that fails or would miss the deadline, leaves that order and says so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from core import fusion
from core.config import Settings
from core.text import item_text, user_text
from services.deadline import Deadline
from services.inference.triton_client import InferenceUnavailable, TritonClient
from services.recommend.context import RESERVE, Candidate, Context, Stage


@dataclass
class RankerStatus:
    """Whether the release has a ranker, and whether Triton can serve it right now."""

    deployed: bool = False
    ready: bool = False


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


class Rank(Stage):
    """Sets every candidate's ``relevance`` (fused score, plus the ranker's vote when it
    ran) and ``ranked``; the variant's ``model_version`` picks the ranker release."""

    name = "ranking"

    def __init__(
        self, settings: Settings, triton: TritonClient, ranker: Callable[[], RankerStatus]
    ) -> None:
        self.settings = settings
        self.triton = triton
        self.ranker = ranker

    def run(self, ctx: Context) -> None:
        candidates, history = ctx.candidates, ctx.history
        for cand in candidates:  # retrieval order until the ranker votes
            cand.relevance = cand.fused
        status = self.ranker()
        weight = self.settings.ranker_weight
        if not (history and candidates and status.deployed and weight > 0):
            return
        if not status.ready:
            ctx.degraded.append("ranker unavailable: triton not ready")
            return
        budget = ctx.answer_by.reserve(RESERVE)  # of what is left now, not at the start
        try:
            text = user_text([(h["title"], h["categories"]) for h in history])
            score_ctr(self.triton, text, candidates, budget, ctx.variant.model_version)
            fuse_ranker(candidates, weight)
            ctx.ranked = True
        except InferenceUnavailable as exc:
            ctx.degraded.append(f"ranker unavailable: {exc}")
