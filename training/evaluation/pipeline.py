"""The offline reference composition of the full pipeline: retrieval mix -> ranker -> MMR.

This is what the gateway's composition should reproduce (the served one is evaluated through
:class:`~.systems.CallableRecommender`, see ``ops/served_eval.py``). Stages:

1. **Retrieval mix** - every source (popularity, trending popularity, ItemKNN, ALS, BPR,
   pretrained content, two-tower) ranks the whole catalogue for the user; the ranks are fused
   with weighted reciprocal-rank fusion, ``sum_s w_s / (rrf_k + rank_s)``. Ranks rather than
   raw scores because the sources' scores live on unrelated scales (counts, cosines, dot
   products). Cold-start users (``<= cold_max_events`` known events) may get their own
   weights: with a handful of events, popularity priors matter more than factor models.
2. **Ranker** - when a checkpoint has ``ranker/``, the cross-encoder scores the top
   ``ranker_top`` fused candidates and its rank enters the fusion with ``ranker_weight``.
3. **MMR** - greedy maximal marginal relevance over the shortlist: pick
   ``argmax (1 - lambda) rel(i) - lambda max_{j picked} cos(i, j)`` with ``rel`` the fused
   score min-max scaled to [0, 1] and cosines of the pretrained item vectors; ``lambda = 0``
   is pure relevance (the ``mmr_lambda`` of an experiment variant).

Weights, ``ranker_weight`` and ``mmr_lambda`` are chosen on a *validation* split carved from
the training period (:func:`tune`), never on the test split.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from core.fusion import mmr, rrf
from core.text import history_from_ids, item_lookup, item_texts, user_text
from training.data.schema import Dataset
from training.evaluation.metrics import ndcg_at_k
from training.evaluation.reference import OFFLINE_REFERENCE
from training.evaluation.systems import (
    SCORE_BATCH,
    CatalogueRecommender,
    EmbeddingRecommender,
    find_train_config,
)

log = logging.getLogger(__name__)


@dataclass
class PipelineConfig:
    """Knobs of :class:`HybridPipeline` (``weights``: source name -> fusion weight)."""

    weights: dict[str, float]
    cold_weights: dict[str, float] | None = None
    cold_max_events: int = 3
    rrf_k: float = 60.0
    shortlist: int = 100
    ranker_weight: float = 0.0
    ranker_top: int = 20
    mmr_lambda: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Candidates:
    """A user's shortlist: catalogue indices, best first, and their fused scores."""

    items: np.ndarray
    scores: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)


def rank_terms(scores: np.ndarray, rrf_k: float) -> np.ndarray:
    """``1 / (rrf_k + rank)`` per entry, rank 1 = best; tied scores share the best rank of
    their run (so ties are broken later, consistently, by popularity then item order);
    ``-inf`` scores get 0."""
    out = np.zeros(scores.shape, dtype=np.float32)
    for r, row in enumerate(scores):
        desc = -np.sort(-row)
        ranks = np.searchsorted(-desc, -row, side="left")  # items strictly better
        out[r] = rrf(ranks + 1.0, rrf_k)
    out[~np.isfinite(scores)] = 0.0
    return out


def _weighted(
    terms: dict[str, np.ndarray], weights: dict[str, float], n_users: int, n_items: int
) -> np.ndarray:
    out = np.zeros((n_users, n_items), dtype=np.float32)
    for name, t in terms.items():
        if weights.get(name, 0.0):
            out += weights[name] * t
    return out


class HybridPipeline(CatalogueRecommender):
    """Offline full pipeline over fitted source systems (see module docstring)."""

    name = OFFLINE_REFERENCE

    def __init__(
        self,
        sources: dict[str, CatalogueRecommender],
        config: PipelineConfig,
        *,
        ranker: Any = None,
        ranker_dir: str | None = None,
        mmr_source: EmbeddingRecommender | None = None,
    ) -> None:
        super().__init__()
        self.sources = sources
        self.config = config
        self.ranker = ranker
        self.mmr_source = mmr_source
        cfg = find_train_config(ranker_dir) if ranker_dir else {}
        self.history_len = int(cfg.get("history_len", 20))
        self.max_chars = int(cfg.get("max_chars", 1000))
        self._texts: dict[str, str] = {}
        self._lookup: dict[str, tuple[str, list[str]]] = {}

    def fit(self, train: Dataset) -> None:
        for s in self.sources.values():
            s.fit(train)
        super().fit(train)
        if self.ranker is not None:
            self._texts = item_texts(train.items)
            self._lookup = item_lookup(train.items)

    def observe(self, events: pd.DataFrame) -> None:
        super().observe(events)
        for s in self.sources.values():
            s.observe(events)

    # --- stages --------------------------------------------------------------------------
    def terms(self, user_ids: Sequence[str]) -> dict[str, np.ndarray]:
        """Each source's reciprocal-rank matrix (seen items excluded, cold fallback on)."""
        return {
            name: rank_terms(src.full_scores(user_ids, True), self.config.rrf_k)
            for name, src in self.sources.items()
        }

    def is_cold(self, user_id: str) -> bool:
        return self.event_counts.get(user_id, 0) <= self.config.cold_max_events

    def fuse(
        self,
        user_ids: Sequence[str],
        terms: dict[str, np.ndarray],
        weights: dict[str, float] | None = None,
        cold_weights: dict[str, float] | None = None,
        *,
        uniform: bool = False,
    ) -> np.ndarray:
        """Weighted sum of rank terms, seen items ``-inf``. Cold users get ``cold_weights``
        (default: the configured ones, if any) unless ``uniform``."""
        w = self.config.weights if weights is None else weights
        cw = None if uniform else (cold_weights or self.config.cold_weights)
        out = _weighted(terms, w, len(user_ids), len(self.item_ids))
        if cw is not None:
            cold_rows = [r for r, u in enumerate(user_ids) if self.is_cold(u)]
            if cold_rows:
                sub = {n: t[cold_rows] for n, t in terms.items()}
                out[cold_rows] = _weighted(sub, cw, len(cold_rows), len(self.item_ids))
        out = out.astype(np.float64)
        for r, u in enumerate(user_ids):
            idx = [self.index[i] for i in self.seen.get(u, ()) if i in self.index]
            out[r, idx] = -np.inf
        return out

    def shortlist(self, fused: np.ndarray, size: int) -> list[Candidates]:
        out = []
        for row in fused:
            finite = int(np.isfinite(row).sum())
            n = min(size, finite)
            if n == 0:
                out.append(Candidates(np.zeros(0, dtype=np.int64), np.zeros(0)))
                continue
            part = np.argpartition(-row, n - 1)[:n]
            # deterministic order: fused score, then training popularity, then item order
            order = np.lexsort((part, -self.popularity[part], -row[part]))
            out.append(Candidates(part[order], row[part[order]]))
        return out

    def user_texts(self, user_ids: Sequence[str]) -> list[str]:
        return [
            user_text(
                history_from_ids(self.history(u)[: self.history_len], self._lookup),
                self.max_chars,
            )
            for u in user_ids
        ]

    def rerank(
        self, user_ids: Sequence[str], cands: list[Candidates], weight: float | None = None
    ) -> list[Candidates]:
        """Add the ranker's rank term to the top ``ranker_top`` candidates (when present)."""
        w = self.config.ranker_weight if weight is None else weight
        if self.ranker is None or w <= 0:
            return cands
        logits = self.ranker_logits(user_ids, cands)
        out = []
        for c, lg in zip(cands, logits, strict=True):
            top = min(self.config.ranker_top, len(c.items))
            if top == 0:
                out.append(c)
                continue
            s = c.scores.copy()
            order = np.argsort(-lg, kind="stable")
            ranks = np.empty(top)
            ranks[order] = np.arange(top)
            s[:top] += w * rrf(ranks + 1.0, self.config.rrf_k)
            o = np.argsort(-s, kind="stable")
            out.append(Candidates(c.items[o], s[o], c.extra))
        return out

    def ranker_logits(self, user_ids: Sequence[str], cands: list[Candidates]) -> list[np.ndarray]:
        """Cross-encoder logits of each user's top ``ranker_top`` (cached on the candidates)."""
        need = [r for r, c in enumerate(cands) if "logits" not in c.extra and len(c.items)]
        if need:
            texts = self.user_texts([user_ids[r] for r in need])
            us, its, owners = [], [], []
            for r, ut in zip(need, texts, strict=True):
                top = cands[r].items[: self.config.ranker_top]
                for i in top:
                    us.append(ut)
                    its.append(self._texts[self.item_ids[i]])
                owners.append((r, len(top)))
            logits = self.ranker.score(us, its)
            pos = 0
            for r, n in owners:
                cands[r].extra["logits"] = logits[pos : pos + n]
                cands[r].extra["logit_items"] = cands[r].items[:n].copy()
                pos += n
        out = []
        for c in cands:
            if "logits" not in c.extra:
                out.append(np.zeros(0))
                continue
            by_item = dict(zip(c.extra["logit_items"].tolist(), c.extra["logits"], strict=True))
            top = c.items[: self.config.ranker_top]
            out.append(np.array([by_item.get(int(i), -np.inf) for i in top]))
        return out

    def select(self, cands: list[Candidates], k: int, lam: float | None = None) -> list[list[str]]:
        """Final top ``k`` per user, with MMR when ``lambda > 0`` and vectors exist."""
        lam = self.config.mmr_lambda if lam is None else lam
        vecs = self.mmr_source.item_vectors if self.mmr_source is not None else None
        out = []
        for c in cands:
            if lam > 0 and vecs is not None and len(c.items) > 1:
                idx = c.items[mmr(c.scores, vecs[c.items], k, lam)]
            else:
                idx = c.items[:k]
            out.append([self.item_ids[i] for i in idx])
        return out

    def candidates(self, user_ids: Sequence[str]) -> list[Candidates]:
        """Stages 1-2 for a batch of users."""
        fused = self.fuse(user_ids, self.terms(user_ids))
        return self.rerank(user_ids, self.shortlist(fused, self.config.shortlist))

    def recommend(
        self, user_ids: Sequence[str], k: int, exclude_seen: bool = True
    ) -> dict[str, list[str]]:
        if not exclude_seen:
            raise ValueError("the pipeline always excludes seen items, as served")
        out: dict[str, list[str]] = {}
        for start in range(0, len(user_ids), SCORE_BATCH):
            batch = list(user_ids[start : start + SCORE_BATCH])
            for u, items in zip(batch, self.select(self.candidates(batch), k), strict=True):
                out[u] = items
        return out


# --------------------------------------------------------------------------------------------
# tuning on validation folds


@dataclass
class Fold:
    """One validation window: a pipeline fitted on the data before it, its users/targets."""

    pipe: HybridPipeline
    users: list[str]
    targets: dict[str, set[str]]
    terms: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.terms:
            self.terms = self.pipe.terms(self.users)

    def subset(self, rows: Sequence[int]) -> Fold:
        return Fold(
            self.pipe,
            [self.users[r] for r in rows],
            self.targets,
            {n: t[list(rows)] for n, t in self.terms.items()},
        )

    def rows(self, cold: bool) -> list[int]:
        return [r for r, u in enumerate(self.users) if self.pipe.is_cold(u) == cold]


def _mean_ndcg(lists: list[list[str]], users: Sequence[str], targets: dict[str, set[str]]) -> float:
    vals = [ndcg_at_k(r, targets[u], 10) for r, u in zip(lists, users, strict=True)]
    return float(np.mean(vals)) if vals else 0.0


def _top_lists(pipe: HybridPipeline, fused: np.ndarray, k: int = 10) -> list[list[str]]:
    return pipe.select(pipe.shortlist(fused, k), k, lam=0.0)


def fold_ndcg(folds: Sequence[Fold], weights: dict[str, float]) -> float:
    """User-weighted mean NDCG@10 over folds of the fused top 10 (one weight set)."""
    total, n = 0.0, 0
    for f in folds:
        if not f.users:
            continue
        fused = f.pipe.fuse(f.users, f.terms, weights, uniform=True)
        total += _mean_ndcg(_top_lists(f.pipe, fused), f.users, f.targets) * len(f.users)
        n += len(f.users)
    return total / n if n else 0.0


def coordinate_ascent(
    folds: Sequence[Fold],
    *,
    grid: Sequence[float] = (0.0, 0.5, 1.0, 2.0, 4.0),
    passes: int = 3,
    start: dict[str, float] | None = None,
    trace: list[dict[str, Any]] | None = None,
    label: str = "",
) -> tuple[dict[str, float], float]:
    """Maximise validation NDCG@10 one fusion weight at a time (a few passes)."""
    names = list(folds[0].terms)
    w = dict(start or dict.fromkeys(names, 1.0))

    def score(weights: dict[str, float]) -> float:
        return fold_ndcg(folds, weights) if any(weights.values()) else -1.0

    best = score(w)
    if trace is not None:
        trace.append({"cohort": label, "weights": dict(w), "ndcg@10": best})
    for _ in range(passes):
        improved = False
        for name in names:
            for g in grid:
                if g == w[name]:
                    continue
                cand = {**w, name: g}
                s = score(cand)
                if s > best + 1e-9:
                    w, best, improved = cand, s, True
                    if trace is not None:
                        trace.append({"cohort": label, "weights": dict(w), "ndcg@10": s})
        if not improved:
            break
    return w, best


def tune(
    folds: Sequence[Fold],
    *,
    min_cohort: int = 50,
    mmr_grid: Sequence[float] = (0.0, 0.05, 0.1, 0.2, 0.3),
    mmr_tolerance: float = 0.01,
    ranker_grid: Sequence[float] = (0.0, 0.5, 1.0, 2.0, 4.0),
) -> dict[str, Any]:
    """Choose, on validation folds only: fusion weights for all users, then separate
    cold-start weights when both cohorts have ``>= min_cohort`` validation users; the
    ranker weight; and the largest MMR lambda costing at most ``mmr_tolerance`` (relative)
    NDCG@10. Each fold's pipeline must be fitted on the data before its window, with its
    fold-in events observed. The chosen config is written into every fold's pipeline."""
    trace: list[dict[str, Any]] = []
    weights, best_all = coordinate_ascent(folds, trace=trace, label="all")
    log.info("fusion weights (all users): %s -> NDCG@10 %.4f", weights, best_all)
    cold = [f.subset(f.rows(True)) for f in folds]
    warm = [f.subset(f.rows(False)) for f in folds]
    n_cold, n_warm = sum(len(f.users) for f in cold), sum(len(f.users) for f in warm)
    cold_weights = None
    if n_cold >= min_cohort and n_warm >= min_cohort:
        cold_weights, _ = coordinate_ascent(cold, start=weights, trace=trace, label="cold")
        weights, _ = coordinate_ascent(warm, start=weights, trace=trace, label="warm")
        log.info("cohort weights: cold %s, warm %s", cold_weights, weights)
    for f in folds:
        f.pipe.config.weights = dict(weights)
        f.pipe.config.cold_weights = None if cold_weights is None else dict(cold_weights)
    cands = [
        f.pipe.shortlist(f.pipe.fuse(f.users, f.terms), f.pipe.config.shortlist) for f in folds
    ]
    n_users = sum(len(f.users) for f in folds)

    def mean_over_folds(ranker_w: float, lam: float, last_only: bool = False) -> float:
        total, n = 0.0, 0
        pairs = list(zip(folds, cands, strict=True))
        for f, c in pairs[-1:] if last_only else pairs:
            lists = f.pipe.select(f.pipe.rerank(f.users, c, ranker_w), 10, lam)
            total += _mean_ndcg(lists, f.users, f.targets) * len(f.users)
            n += len(f.users)
        return total / n if n else 0.0

    ranker_curve: dict[float, float] = {}
    ranker_w = 0.0
    if all(f.pipe.ranker is not None for f in folds):
        # the cross-encoder is the slow part on CPU: its weight is chosen on the most
        # recent validation window only
        log.info("scoring the ranker on %d validation users", len(folds[-1].users))
        ranker_curve = {g: mean_over_folds(g, 0.0, last_only=True) for g in ranker_grid}
        ranker_w = max(ranker_curve, key=lambda g: (ranker_curve[g], -g))
    mmr_curve = {lam: mean_over_folds(ranker_w, lam, last_only=ranker_w > 0) for lam in mmr_grid}
    base = mmr_curve.get(0.0, max(mmr_curve.values()))
    ok = [lam for lam, v in mmr_curve.items() if v >= base * (1 - mmr_tolerance)]
    has_vectors = all(f.pipe.mmr_source is not None for f in folds)
    lam = max(ok) if has_vectors and ok else 0.0
    for f in folds:
        f.pipe.config.ranker_weight = ranker_w
        f.pipe.config.mmr_lambda = lam
    return {
        "config": folds[0].pipe.config.as_dict(),
        "validation_users": n_users,
        "validation_cold_users": n_cold,
        "ndcg@10_fusion_all_users": best_all,
        "ranker_curve": ranker_curve,
        "ranker_tuned_on": "most recent validation window" if ranker_curve else None,
        "mmr_curve": mmr_curve,
        "trace": trace,
    }
