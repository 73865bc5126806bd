"""The recommendation pipeline the gateway runs for ``Recommend``, as its list of stages.

profile (Milvus user row and history) -> retrieval (ANN, co-occurrence, segment, global
popularity and the sequence model's best items on Triton, fused; a hundred candidates) ->
ranking (the feature ranker on Triton, one batched request, with the sequence model's scores
among its features; optionally the BERT cross-encoder's vote on the top few) -> diversify
(MMR) -> explain. It degrades instead of failing: without Milvus (or when its reads used up
their share of the deadline) it answers from the cached popularity, without Triton (or when
Triton would miss the deadline) in retrieval order; either way the answer says so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from core.config import Settings
from services.deadline import Deadline, DeadlineExceeded
from services.experiments.assignment import Variant
from services.inference.triton_client import TritonClient
from services.recommend.anchor import Anchor
from services.recommend.context import (
    Candidate,
    Context,
    Filters,
    Recommendation,
    RequestContext,
    Rules,
    StageObserver,
    no_metrics,
)
from services.recommend.diversify import Diversify
from services.recommend.explain import Explain
from services.recommend.profile import LoadProfile, ProfileRead
from services.recommend.rank import Rank, Rankers, Supplied
from services.recommend.retrieve import (
    PopularItems,
    PopularOnly,
    Retrieve,
    Retriever,
    SequenceSource,
)
from services.recommend.rules import ApplyRules
from services.vectors.store import StoreUnavailable, VectorStore
from services.vectors.timing import milvus_clock

#: Not a stage: the wall time of a request's Milvus calls, observed once it is answered, in
#: total and per store method (``milvus.get_user``, ...).
MILVUS = "milvus"


class Pipeline:
    """Composes the stages under one deadline; ``on_stage`` observes each stage's latency.
    ``served()``: the release the gateway serves (a request's models come from it unless its
    variant pins another); ``rankers(release)``: what that release deploys."""

    def __init__(
        self,
        settings: Settings,
        store: VectorStore,
        triton: TritonClient,
        popular: PopularItems,
        rankers: Callable[[str], Rankers],
        on_stage: StageObserver = no_metrics,
        read_profile: ProfileRead | None = None,
        served: Callable[[], str] = lambda: "",
    ) -> None:
        retriever = Retriever(store, popular, settings.popular_refresh_s)
        self.profile = LoadProfile(settings, store, read_profile)
        self.popular_only = PopularOnly(retriever)
        sequence = SequenceSource(triton, lambda release: rankers(release).sequence.ready)
        self.retrieve = Retrieve(settings, store, retriever, sequence)
        self.anchor = Anchor(settings, store, retriever)
        self.rules = ApplyRules(store)
        self.rank = Rank(settings, triton, rankers, popular)
        self.diversify = Diversify(settings, popular)
        self.explain = Explain()
        self.supplied = Supplied(settings, sequence)
        self.store = store
        self.on_stage = on_stage
        self.served = served

    def recommend(
        self,
        user_id: str,
        k: int,
        filters: Filters,
        deadline: Deadline,
        diversity: float | None = None,
        variant: Variant | None = None,
        request: RequestContext | None = None,
        rules: Rules | None = None,
    ) -> Recommendation:
        """The answer within ``deadline``; the request's ``diversity`` beats the variant's λ;
        ``request`` may anchor the candidates on the current item, or be an anonymous
        session (then ``user_id`` is empty); ``rules`` are its repeat policy and business
        rules."""
        ctx = Context.begin(
            user_id,
            k,
            filters,
            deadline,
            diversity,
            variant,
            self.on_stage,
            request,
            rules,
            self.served(),
        )
        with milvus_clock() as in_milvus:
            try:
                self._run(ctx)
            finally:
                spent = {MILVUS: in_milvus.seconds}
                spent.update({f"{MILVUS}.{m}": s for m, s in in_milvus.by_method.items()})
                for name, seconds in spent.items():
                    ctx.timings[name] = seconds
                    self.on_stage(name, seconds)
        return ctx.answer()

    def _run(self, ctx: Context) -> None:
        try:
            self.profile(ctx)
        except (StoreUnavailable, DeadlineExceeded) as exc:  # no profile: cached popularity
            self._popular_instead(ctx, exc)
            return
        try:
            (self.anchor if ctx.request.current_item_id else self.retrieve)(ctx)
            self.rules.admit(ctx)
            self.rank(ctx)
            self.rules.adjust(ctx)
            self.diversify(ctx)
            self.rules.pin(ctx)
        except DeadlineExceeded as exc:
            self._popular_instead(ctx, exc)
            return
        self.explain(ctx)

    def _popular_instead(self, ctx: Context, exc: StoreUnavailable | DeadlineExceeded) -> None:
        """The cached popularity, answered in the share of the deadline the context keeps
        for answering (``RESERVE``). Reads that succeed but slowly (a loaded Milvus, or one
        loading its collections after a restart) can use up the dependencies' share: the
        next read's ``left()`` raises, and the caller still gets an answer in time, not
        ``DEADLINE_EXCEEDED``."""
        if isinstance(exc, DeadlineExceeded):
            why = "too slow, its reads used the request's time for dependencies"
        else:
            why = str(exc)
        ctx.degraded.append(f"milvus unavailable: {why}")
        ctx.ranked = False
        self.popular_only(ctx)

    def rank_items(
        self,
        user_id: str,
        item_ids: Sequence[str],
        deadline: Deadline,
        variant: Variant | None = None,
        filters: Filters | None = None,
        rules: Rules | None = None,
        request: RequestContext | None = None,
    ) -> tuple[Recommendation, list[str]]:
        """``RankItems``: the client's candidates in the order the ranker of ``recommend``
        gives them for this user (no diversity re-rank), and the ids not in the catalogue.
        ``filters`` and ``rules`` apply as in ``recommend`` (admitted, boosted or buried,
        pinned first); the candidates they keep out are the answer's ``left_out``. Seen
        candidates stay unless the repeat policy names categories (the caller chose them).
        Without Milvus there are no candidate rows: StoreUnavailable."""
        rules = rules or Rules()
        if not rules.repeats:
            rules = replace(rules, allow_seen=True)
        k = len(item_ids) + len(rules.pin)  # pins come on top: no candidate is cut
        ctx = Context.begin(
            user_id,
            k,
            filters or Filters(),
            deadline,
            0.0,
            variant,
            self.on_stage,
            request,
            rules,
            self.served(),
        )
        self.profile(ctx)
        rows = self.store.get_items(item_ids, ctx.deadline.left(), with_vectors=True)
        known = [i for i in item_ids if i in rows]
        ctx.candidates = [Candidate(i, rows[i]) for i in known]
        self.rules.admit(ctx)
        kept = {c.item_id for c in ctx.candidates}
        if ctx.candidates:
            self.supplied(ctx)
            self.rank(ctx)
            self.rules.adjust(ctx)
        ctx.items = sorted(ctx.candidates, key=lambda c: (-c.relevance, c.item_id))
        self.rules.pin(ctx)
        self.explain(ctx)
        answer = ctx.answer()
        answer.left_out = [i for i in known if i not in kept]
        return answer, [i for i in item_ids if i not in rows]
