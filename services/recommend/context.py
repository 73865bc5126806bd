"""What one ``Recommend`` call carries from stage to stage, and how a stage is timed.

Every stage reads the :class:`Context` that earlier stages filled and adds its own part, so
no stage needs another's locals; each stage observes its own latency the moment it ends.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from services.deadline import Deadline
from services.experiments.assignment import Variant
from services.vectors.store import Row

# Share of the time left kept back at each dependency call, so a dependency that is down or
# slow still leaves time to answer from what the gateway has (popularity, retrieval order).
RESERVE = 0.25

#: Called with ``(stage, seconds)`` as each stage ends (the gateway's stage histogram).
StageObserver = Callable[[str, float], None]


def no_metrics(stage: str, seconds: float) -> None:
    """No metrics (benchmarks and tests that run the pipeline in-process)."""


@dataclass(frozen=True)
class Filters:
    """The request's category filter, excluded ids and attribute conditions (categories to
    leave out, a minimum creation time in epoch seconds; 0 = none)."""

    categories: tuple[str, ...] = ()
    exclude: frozenset[str] = frozenset()
    exclude_categories: frozenset[str] = frozenset()
    min_created_at: int = 0

    @property
    def by_attributes(self) -> bool:
        """True when :meth:`admits` may refuse a row for more than its id."""
        return bool(self.categories or self.exclude_categories or self.min_created_at)

    def admits(self, row: Row) -> bool:
        if row["item_id"] in self.exclude:
            return False
        if self.exclude_categories & set(row["categories"]):
            return False
        if self.min_created_at and int(row.get("created_at") or 0) < self.min_created_at:
            return False
        return not self.categories or bool(set(self.categories) & set(row["categories"]))

    def admitted(self, rows: Iterable[Row]) -> list[Row]:
        """The rows :meth:`admits`, in order; by id alone when there are no attribute
        conditions (a Recommend filters some 500 rows)."""
        if self.by_attributes:
            return [row for row in rows if self.admits(row)]
        exclude = self.exclude
        return [row for row in rows if row["item_id"] not in exclude]


@dataclass(frozen=True)
class Rules:
    """The request's repeat policy (items seen before that may come back: all, or those in
    ``allow_seen_categories``) and business rules (boosted, buried and pinned item ids)."""

    allow_seen: bool = False
    allow_seen_categories: frozenset[str] = frozenset()
    boost: frozenset[str] = frozenset()
    bury: frozenset[str] = frozenset()
    pin: tuple[str, ...] = ()

    @property
    def repeats(self) -> bool:
        """True when some seen item may come back (retrieval then keeps seen items and the
        rules stage decides, per item, with :meth:`may_repeat`)."""
        return self.allow_seen or bool(self.allow_seen_categories)

    def may_repeat(self, row: Row) -> bool:
        return self.allow_seen or bool(self.allow_seen_categories & set(row["categories"]))


@dataclass(frozen=True)
class RequestContext:
    """Where, on what and for which visitor the items will be shown (``RequestContext``):
    ``surface`` picked the configured rules and, with ``device``, is recorded with the
    exposure; ``current_item_id`` anchors the candidates on that item; a ``session_id`` (with
    no user id) is an anonymous visitor whose history is ``session_items``, newest first."""

    surface: str = ""
    device: str = ""
    current_item_id: str = ""
    session_id: str = ""
    session_items: tuple[str, ...] = ()

    @property
    def anonymous(self) -> bool:
        return bool(self.session_id)


@dataclass
class Candidate:
    """An item with the evidence for it from each source."""

    item_id: str
    row: Row
    ranks: dict[str, int] = field(default_factory=dict)  # source -> 0-based rank there
    because_of: dict[str, str] = field(default_factory=dict)  # source -> history title
    fused: float = 0.0
    relevance: float = 0.0  # what the final order uses: fused score (+ the ranker's vote)
    ctr: float | None = None  # the CTR ranker's click probability, when it scored the item

    @property
    def best_source(self) -> str:
        return min(self.ranks, key=lambda s: self.ranks[s])


@dataclass
class Recommendation:
    """The pipeline's answer with what a client and the metrics need to know about it."""

    items: list[Candidate]
    reasons: list[str]
    cold_start: bool = False
    degraded: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    candidates: int = 0
    ranked: bool = False
    left_out: list[str] = field(default_factory=list)  # RankItems: candidates kept out
    release: str = ""  # the release whose models answered (:attr:`Context.release`)


@dataclass
class Context:
    """One ``Recommend`` call: the request, its budget, and what the stages produced."""

    user_id: str
    k: int
    filters: Filters
    answer_by: Deadline  # the caller's deadline
    deadline: Deadline  # what dependency calls may use: ``answer_by`` less ``RESERVE``
    diversity: float | None = None  # the request's MMR λ, over the variant's and the default
    variant: Variant = field(default_factory=Variant)
    # the release on Triton whose models answer this call: the variant's, else the one the
    # gateway serves ("" before it knows one: then each model's newest, or the client's pin)
    release: str = ""
    on_stage: StageObserver = no_metrics
    request: RequestContext = field(default_factory=RequestContext)
    rules: Rules = field(default_factory=Rules)
    anchor: Row | None = None  # the current item's row ("more like this"), set by retrieval
    degraded: list[str] = field(default_factory=list)  # reasons, in the order they happened
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    # profile
    profile: Row | None = None
    history_ids: list[str] = field(default_factory=list)  # newest first, all of them
    history: list[Row] = field(default_factory=list)  # rows of the window, with vectors
    cold: bool = False
    # the sequence model's inputs (core.sequence_inputs.model_inputs) and its score of every
    # item its one request named or was asked about (the ranker's feature), set by retrieve
    sequence_inputs: dict[str, np.ndarray] | None = None
    sequence_scores: dict[str, float] = field(default_factory=dict)
    # the history's co-occurrence scores from the indexed neighbours alone (the ranker's
    # feature, as in training), set by retrieve when its own scores are exactly those
    co_scores: dict[str, float] | None = None
    # retrieve, rank
    candidates: list[Candidate] = field(default_factory=list)
    ann_rows: list[Row] = field(default_factory=list)  # the ANN's hits, before fusion
    ranked: bool = False
    # diversify (or the popularity fallback), explain
    items: list[Candidate] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    _lap: float = field(default_factory=time.perf_counter, repr=False)

    @classmethod
    def begin(
        cls,
        user_id: str,
        k: int,
        filters: Filters,
        deadline: Deadline,
        diversity: float | None = None,
        variant: Variant | None = None,
        on_stage: StageObserver = no_metrics,
        request: RequestContext | None = None,
        rules: Rules | None = None,
        served: str = "",
    ) -> Context:
        """A context whose dependency calls keep ``RESERVE`` of ``deadline`` for answering;
        ``served``: the release the gateway serves, unless the variant pins one."""
        variant = variant or Variant()
        return cls(
            user_id,
            k,
            filters,
            answer_by=deadline,
            deadline=deadline.reserve(RESERVE),
            diversity=diversity,
            variant=variant,
            release=variant.model_version or served,
            on_stage=on_stage,
            request=request or RequestContext(),
            rules=rules or Rules(),
        )

    def interacted_ids(self) -> set[str]:
        """Everything the user interacted with: the history and the profile's seen items."""
        seen = self.profile["seen_items"] if self.profile else ()
        return {*self.history_ids, *seen}

    def seen_ids(self) -> set[str]:
        """What is never recommended: everything the user interacted with, unless the repeat
        policy lets some of it come back (then empty here, and the rules stage filters per
        item)."""
        return set() if self.rules.repeats else self.interacted_ids()

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Time a stage from the end of the previous one and observe it as it ends.

        A stage that raises records nothing: its time counts toward the stage that answers
        instead (the popularity fallback after a failed profile read is timed from the start).
        """
        yield
        now = time.perf_counter()
        self.timings[stage] = seconds = now - self._lap
        self._lap = now
        self.on_stage(stage, seconds)

    def answer(self) -> Recommendation:
        return Recommendation(
            items=self.items,
            reasons=self.reasons,
            cold_start=self.cold,
            degraded=self.degraded,
            timings=self.timings,
            candidates=len(self.candidates),
            ranked=self.ranked,
            release=self.release,
        )


class Stage(ABC):
    """A named step of ``Recommend``; calling it runs it and times it under ``name``."""

    name: ClassVar[str]  # the ``stage`` label of the stage-latency histogram

    def __call__(self, ctx: Context) -> None:
        with ctx.timed(self.name):
            self.run(ctx)

    @abstractmethod
    def run(self, ctx: Context) -> None:
        """Read what earlier stages left in ``ctx`` and add this stage's part."""
