"""Recommenders compared by the offline evaluation, behind one small protocol.

Every system is fitted on the training split only and then asked for top-K lists. Between
``fit`` and ``recommend`` the harness may call ``observe(events)`` with events that happened
after the cut-off but before the recommendation (the fold-in events of the protocol, see
:mod:`training.evaluation.protocol`): they extend user *histories* (as ``IngestEvents`` does
online) but never retrain model parameters.

Catalogue systems share :class:`CatalogueRecommender`: a full score vector per user over the
catalogue, already-seen items removed, ties broken by training popularity then item order
(deterministic), and users without any usable history served the popularity ranking - the
same cold-start fallback the gateway uses, so every system is compared on every user.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd
from scipy import sparse
from threadpoolctl import threadpool_limits

from core.behaviour import choose_half_life, item_popularity
from core.text import history_from_ids, item_lookup, item_texts, user_text
from training.data.schema import Dataset

log = logging.getLogger(__name__)

#: Users scored per matrix multiplication (bounds memory at ~batch x catalogue floats).
SCORE_BATCH = 256


@runtime_checkable
class Recommender(Protocol):
    """What the evaluation needs from a system."""

    name: str

    def fit(self, train: Dataset) -> None: ...

    def recommend(
        self, user_ids: Sequence[str], k: int, exclude_seen: bool = True
    ) -> dict[str, list[str]]: ...


class CatalogueRecommender:
    """Base class: histories, seen sets, popularity fallback and deterministic top-K.

    Subclasses implement :meth:`_fit` and :meth:`scores` (``(len(users), n_items)``, higher is
    better, ``-inf`` = cannot recommend); rows of users without history are replaced by
    popularity when ``cold_fallback``.
    """

    name = "base"
    cold_fallback = True

    def __init__(self) -> None:
        self.train: Dataset | None = None
        self.item_ids: list[str] = []
        self.index: dict[str, int] = {}
        self.popularity = np.zeros(0)
        self.histories: dict[str, list[str]] = {}
        self.seen: dict[str, set[str]] = {}
        self.weights: dict[str, dict[str, float]] = {}
        self.event_counts: dict[str, int] = {}
        self._known = pd.DataFrame()

    # --- fitting and histories -----------------------------------------------------------
    def fit(self, train: Dataset) -> None:
        if self.train is train:
            return  # shared component already fitted on this very split
        self.train = train
        self.item_ids = [str(i) for i in train.items["item_id"]]
        self.index = {i: n for n, i in enumerate(self.item_ids)}
        pos = train.positives
        counts = pos.drop_duplicates(["user_id", "item_id"])["item_id"].value_counts()
        self.popularity = np.array([counts.get(i, 0) for i in self.item_ids], dtype=np.float64)
        self._known = train.events.iloc[0:0]
        self.histories, self.seen, self.weights, self.event_counts = {}, {}, {}, {}
        self.observe(train.events)
        self._fit(train)

    def _fit(self, train: Dataset) -> None:
        """Model-specific training (parameters); histories are already set."""

    def observe(self, events: pd.DataFrame) -> None:
        """Add events to user histories (fold-in); model parameters stay as fitted."""
        frames = [f for f in (self._known, events) if len(f)]
        if len(frames) > 1:
            # idempotent: a shared component may be shown the same fold-in events twice
            known = pd.concat(frames, ignore_index=True).drop_duplicates(
                ["user_id", "item_id", "event_type", "timestamp"]
            )
        else:
            known = frames[0] if frames else events
        self._known = known
        known = known[known["item_id"].isin(self.index)]
        self.event_counts = known.groupby("user_id").size().astype(int).to_dict()
        self.seen = {str(u): set(g) for u, g in known.groupby("user_id")["item_id"]}
        pos = known[known["weight"] > 0]
        w = pos.groupby(["user_id", "item_id"])["weight"].max()
        self.weights = {}
        for (u, i), v in w.items():
            self.weights.setdefault(str(u), {})[str(i)] = float(v)
        self.histories = _histories(known)

    def history(self, user_id: str) -> list[str]:
        """Positive items, most recent first (all of them)."""
        return self.histories.get(user_id, [])

    # --- scoring -------------------------------------------------------------------------
    def scores(self, user_ids: Sequence[str]) -> np.ndarray:
        """Score matrix; the base is popularity."""
        return np.tile(self.popularity, (len(user_ids), 1))

    def full_scores(self, user_ids: Sequence[str], exclude_seen: bool = True) -> np.ndarray:
        """:meth:`scores` with the cold-start fallback applied and seen items at ``-inf``."""
        s = np.asarray(self.scores(user_ids), dtype=np.float64).copy()
        for r, u in enumerate(user_ids):
            if self.cold_fallback and not self.histories.get(u):
                s[r] = self.popularity
            if exclude_seen:
                idx = [self.index[i] for i in self.seen.get(u, ()) if i in self.index]
                s[r, idx] = -np.inf
        return s

    def recommend(
        self, user_ids: Sequence[str], k: int, exclude_seen: bool = True
    ) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        order_idx = np.arange(len(self.item_ids))
        for start in range(0, len(user_ids), SCORE_BATCH):
            batch = list(user_ids[start : start + SCORE_BATCH])
            s = self.full_scores(batch, exclude_seen)
            for r, u in enumerate(batch):
                out[u] = self._top(s[r], k, order_idx)
        return out

    def _top(self, row: np.ndarray, k: int, order_idx: np.ndarray) -> list[str]:
        finite = np.isfinite(row)
        if not finite.any():
            return []
        # only sort a shortlist: everything at or above the k-th best score (ties included)
        n = min(k, int(finite.sum()))
        kth = np.partition(np.where(finite, row, -np.inf), len(row) - n)[len(row) - n]
        cand = np.flatnonzero(finite & (row >= kth))
        order = np.lexsort((order_idx[cand], -self.popularity[cand], -row[cand]))
        return [self.item_ids[i] for i in cand[order[:k]]]

    def _history_matrix(
        self, user_ids: Sequence[str], *, weighted: bool = False, window: int | None = None
    ) -> sparse.csr_matrix:
        rows, cols, vals = [], [], []
        for r, u in enumerate(user_ids):
            hist = self.histories.get(u, [])
            if window is not None:
                hist = hist[:window]
            w = self.weights.get(u, {})
            for i in hist:
                rows.append(r)
                cols.append(self.index[i])
                vals.append(w.get(i, 1.0) if weighted else 1.0)
        return sparse.csr_matrix(
            (np.asarray(vals, dtype=np.float32), (rows, cols)),
            shape=(len(user_ids), len(self.item_ids)),
        )


def _histories(events: pd.DataFrame) -> dict[str, list[str]]:
    """``user -> positive item ids``, most recent first, each item once (its latest time)."""
    pos = events.loc[events["weight"] > 0, ["user_id", "item_id", "timestamp"]].reset_index(
        drop=True
    )
    pos["_order"] = np.arange(len(pos))
    pos = pos.sort_values(["user_id", "timestamp", "_order"], ascending=[True, False, False])
    pos = pos.drop_duplicates(["user_id", "item_id"], keep="first")
    out: dict[str, list[str]] = {}
    for uid, iid in zip(pos["user_id"], pos["item_id"], strict=True):
        out.setdefault(str(uid), []).append(str(iid))
    return out


class Popularity(CatalogueRecommender):
    """Most-interacted items in training (distinct users with a positive event)."""

    name = "popularity"


class TrendingPopularity(CatalogueRecommender):
    """Time-decayed popularity: each training user-item positive counts
    ``0.5 ** (age_days / half_life_days)``, age measured from the last training event.
    All-time popularity over-ranks old favourites; with a global time split the test period
    favours what was rising at the cut-off (on ml-latest-small this is the strongest
    single baseline, so it is reported as one). ``half_life_days=None``: chosen on the
    training events as the index chooses it (:func:`core.behaviour.choose_half_life`), so
    the baseline is as strong on a catalogue that fades in days as on one that lasts years."""

    name = "popularity_trending"

    def __init__(self, half_life_days: float | None = None) -> None:
        super().__init__()
        self.half_life_days = half_life_days
        self.chosen_days = half_life_days
        self.trending = np.zeros(0)

    def _fit(self, train: Dataset) -> None:
        days = self.half_life_days
        self.chosen_days = choose_half_life(train.events) if days is None else days
        sums = item_popularity(train.positives, self.chosen_days)  # what the gateway serves
        self.trending = np.array([sums.get(i, 0.0) for i in self.item_ids], dtype=np.float64)

    def scores(self, user_ids: Sequence[str]) -> np.ndarray:
        return np.tile(self.trending, (len(user_ids), 1))

    def full_scores(self, user_ids: Sequence[str], exclude_seen: bool = True) -> np.ndarray:
        s = np.tile(self.trending, (len(user_ids), 1))
        if exclude_seen:
            for r, u in enumerate(user_ids):
                s[r, [self.index[i] for i in self.seen.get(u, ()) if i in self.index]] = -np.inf
        return s


class ItemKNN(CatalogueRecommender):
    """Item-item co-occurrence cosine over training positives; a user's score for an item is
    the summed similarity to the items in their history (``neighbours`` kept per item)."""

    name = "itemknn"

    def __init__(self, neighbours: int = 100) -> None:
        super().__init__()
        self.neighbours = neighbours
        self.sim = sparse.csr_matrix((0, 0))

    def _fit(self, train: Dataset) -> None:
        x = _user_item_matrix(train, self.index, binary=True)
        co = (x.T @ x).tocsc().astype(np.float64)
        norms = np.sqrt(np.asarray(co.diagonal()))
        norms[norms == 0] = 1.0
        co.setdiag(0.0)
        co.eliminate_zeros()
        co = sparse.diags(1.0 / norms) @ co @ sparse.diags(1.0 / norms)
        self.sim = _top_per_column(sparse.csc_matrix(co), self.neighbours).tocsr()

    def scores(self, user_ids: Sequence[str]) -> np.ndarray:
        h = self._history_matrix(user_ids)
        return np.asarray((h @ self.sim).todense())


def _user_item_matrix(train: Dataset, index: dict[str, int], *, binary: bool) -> sparse.csr_matrix:
    pos = train.positives
    pos = pos[pos["item_id"].isin(index)]
    users = sorted(pos["user_id"].unique())
    uidx = {u: n for n, u in enumerate(users)}
    agg = pos.groupby(["user_id", "item_id"])["weight"].max().reset_index()
    rows = agg["user_id"].map(uidx).to_numpy()
    cols = agg["item_id"].map(index).to_numpy()
    vals = np.ones(len(agg)) if binary else agg["weight"].to_numpy()
    m = sparse.csr_matrix((vals.astype(np.float32), (rows, cols)), shape=(len(users), len(index)))
    m.user_ids = users  # type: ignore[attr-defined]
    return m


def _top_per_column(m: sparse.csc_matrix, k: int) -> sparse.csc_matrix:
    """Keep the ``k`` largest entries of each column (each item's nearest neighbours)."""
    m = m.tocsc()
    data, indices, indptr = [], [], [0]
    for c in range(m.shape[1]):
        lo, hi = m.indptr[c], m.indptr[c + 1]
        d, ix = m.data[lo:hi], m.indices[lo:hi]
        if len(d) > k:
            keep = np.argpartition(-d, k - 1)[:k]
            d, ix = d[keep], ix[keep]
        data.append(d)
        indices.append(ix)
        indptr.append(indptr[-1] + len(d))
    return sparse.csc_matrix(
        (np.concatenate(data), np.concatenate(indices), np.asarray(indptr)), shape=m.shape
    )


class ALS(CatalogueRecommender):
    """``implicit`` weighted-matrix-factorisation ALS (Hu, Koren & Volinsky). Users are
    re-solved against the fixed item factors from their whole known history, which is the
    exact ALS fold-in (``recalculate_user``)."""

    name = "als"

    def __init__(
        self,
        factors: int = 64,
        regularization: float = 0.05,
        alpha: float = 10.0,
        iterations: int = 20,
        seed: int = 0,
        threads: int = 2,
    ) -> None:
        super().__init__()
        self.params = dict(
            factors=factors, regularization=regularization, alpha=alpha, iterations=iterations
        )
        self.seed, self.threads = seed, threads
        self.model: Any = None

    def _fit(self, train: Dataset) -> None:
        from implicit.cpu.als import AlternatingLeastSquares

        # implicit parallelises itself; a multi-threaded BLAS underneath only oversubscribes
        with threadpool_limits(1, "blas"):
            self.model = AlternatingLeastSquares(
                **self.params, random_state=self.seed, num_threads=self.threads
            )
            self.model.fit(_user_item_matrix(train, self.index, binary=False), show_progress=False)

    def scores(self, user_ids: Sequence[str]) -> np.ndarray:
        h = self._history_matrix(user_ids, weighted=True)
        with threadpool_limits(1, "blas"):
            u = self.model.recalculate_user(np.arange(len(user_ids)), h)
        return np.asarray(u @ self.model.item_factors.T)


class BPR(CatalogueRecommender):
    """``implicit`` Bayesian Personalised Ranking. Training users keep their learned
    factors; users unseen in training get the mean factor of their history items (BPR has no
    closed-form fold-in). Its SGD is lock-free ("hogwild"): with ``threads > 1`` the lists
    change from run to run, so the evaluation uses one thread."""

    name = "bpr"

    def __init__(
        self,
        factors: int = 64,
        learning_rate: float = 0.05,
        regularization: float = 0.01,
        iterations: int = 100,
        seed: int = 0,
        threads: int = 2,
    ) -> None:
        super().__init__()
        self.params = dict(
            factors=factors,
            learning_rate=learning_rate,
            regularization=regularization,
            iterations=iterations,
        )
        self.seed, self.threads = seed, threads
        self.model: Any = None
        self.user_index: dict[str, int] = {}

    def _fit(self, train: Dataset) -> None:
        from implicit.cpu.bpr import BayesianPersonalizedRanking

        m = _user_item_matrix(train, self.index, binary=True)
        self.user_index = {u: n for n, u in enumerate(m.user_ids)}  # type: ignore[attr-defined]
        self.model = BayesianPersonalizedRanking(
            **self.params, random_state=self.seed, num_threads=self.threads
        )
        self.model.fit(m, show_progress=False)

    def scores(self, user_ids: Sequence[str]) -> np.ndarray:
        items = np.asarray(self.model.item_factors)
        users = np.zeros((len(user_ids), items.shape[1]), dtype=np.float32)
        for r, u in enumerate(user_ids):
            if u in self.user_index:
                users[r] = self.model.user_factors[self.user_index[u]]
            elif self.histories.get(u):
                users[r] = items[[self.index[i] for i in self.histories[u]]].mean(axis=0)
                users[r, -1] = 1.0  # the last column carries the item bias
        return users @ items.T


class EmbeddingRecommender(CatalogueRecommender):
    """Cosine between a user vector and unit item vectors (subclasses embed)."""

    item_vectors = np.zeros((0, 0), dtype=np.float32)

    def user_vectors(self, user_ids: Sequence[str]) -> np.ndarray:
        raise NotImplementedError

    def scores(self, user_ids: Sequence[str]) -> np.ndarray:
        return self.user_vectors(user_ids) @ self.item_vectors.T


class PretrainedContent(EmbeddingRecommender):
    """Pretrained MiniLM (no fine-tuning) over item text; user = normalised mean of the
    vectors of their ``window`` most recent positive items."""

    name = "content_pretrained"

    def __init__(
        self, model_dir: str = "", *, window: int = 50, encoder: Any = None, max_seq_len: int = 128
    ) -> None:
        super().__init__()
        self.model_dir = model_dir
        self.window = window
        self.encoder = encoder
        self.max_seq_len = max_seq_len

    def _fit(self, train: Dataset) -> None:
        if self.encoder is None:
            from training.models.text_encoder import TowerEncoder
            from training.pretrained import resolve_pretrained

            self.encoder = TowerEncoder(
                resolve_pretrained(self.model_dir), max_seq_len=self.max_seq_len
            )
        texts = item_texts(train.items)
        self.item_vectors = self.encoder.encode([texts[i] for i in self.item_ids])

    def user_vectors(self, user_ids: Sequence[str]) -> np.ndarray:
        h = self._history_matrix(user_ids, window=self.window)
        u = np.asarray(h @ self.item_vectors)
        norms = np.linalg.norm(u, axis=1, keepdims=True)
        return u / np.where(norms == 0, 1.0, norms)


class FineTunedContent(PretrainedContent):
    """The fine-tuned item tower used as a content model: the user is the mean vector of
    their recent positives. This is what the gateway's ANN searches (``ann_query=history``),
    so its tuned fusion weight is the one the gateway's ``ann`` source should get."""

    name = "content_finetuned"


class FreshContent(CatalogueRecommender):
    """Pipeline source for the item cold start: the content similarity of a wrapped
    :class:`EmbeddingRecommender`, restricted to items with at most ``max_interactions``
    training users (collaborative sources cannot rank those at all)."""

    name = "content_fresh"
    cold_fallback = False

    def __init__(self, content: EmbeddingRecommender, max_interactions: int = 0) -> None:
        super().__init__()
        self.content = content
        self.max_interactions = max_interactions
        self.fresh = np.zeros(0, dtype=bool)

    def fit(self, train: Dataset) -> None:
        self.content.fit(train)
        super().fit(train)

    def _fit(self, train: Dataset) -> None:
        self.fresh = self.popularity <= self.max_interactions

    def observe(self, events: pd.DataFrame) -> None:
        super().observe(events)
        self.content.observe(events)

    def scores(self, user_ids: Sequence[str]) -> np.ndarray:
        s = self.content.scores(user_ids)
        s[:, ~self.fresh] = -np.inf
        for r, u in enumerate(user_ids):
            if not self.histories.get(u):
                s[r] = -np.inf
        return s


def find_train_config(checkpoint_dir: str | Path) -> dict[str, Any]:
    """``train_config.yaml`` of a training output (in the directory or its parent), or {}."""
    import yaml

    for d in (Path(checkpoint_dir), Path(checkpoint_dir).parent):
        p = d / "train_config.yaml"
        if p.exists():
            data = yaml.safe_load(p.read_text())
            return data if isinstance(data, dict) else {}
    return {}


class TwoTower(EmbeddingRecommender):
    """The fine-tuned towers of a training output: ``<dir>/item_tower`` over item text,
    ``<dir>/user_tower`` over the behaviour text built exactly as in training
    (``history_len`` / ``max_chars`` from ``train_config.yaml`` when present)."""

    name = "two_tower"

    def __init__(self, checkpoint_dir: str | Path, *, history_len: int | None = None) -> None:
        super().__init__()
        self.checkpoint_dir = Path(checkpoint_dir)
        for sub in ("user_tower", "item_tower"):
            if not (self.checkpoint_dir / sub / "config.json").exists():
                raise FileNotFoundError(f"{self.checkpoint_dir / sub}: no tower checkpoint")
        cfg = find_train_config(self.checkpoint_dir)
        self.history_len = int(history_len or cfg.get("history_len", 20))
        self.max_chars = int(cfg.get("max_chars", 1000))
        meta_path = self.checkpoint_dir / "user_tower" / "tower_config.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        self.max_seq_len = int(meta.get("max_seq_len", 128))
        self.user_encoder: Any = None
        self.item_encoder: Any = None
        self.lookup: dict[str, tuple[str, list[str]]] = {}

    def _fit(self, train: Dataset) -> None:
        from training.models.text_encoder import TowerEncoder

        self.item_encoder = TowerEncoder(
            self.checkpoint_dir / "item_tower", max_seq_len=self.max_seq_len
        )
        self.user_encoder = TowerEncoder(
            self.checkpoint_dir / "user_tower", max_seq_len=self.max_seq_len
        )
        texts = item_texts(train.items)
        self.item_vectors = self.item_encoder.encode([texts[i] for i in self.item_ids])
        self.lookup = item_lookup(train.items)

    def user_texts(self, user_ids: Sequence[str]) -> list[str]:
        return [
            user_text(
                history_from_ids(self.history(u)[: self.history_len], self.lookup), self.max_chars
            )
            for u in user_ids
        ]

    def user_vectors(self, user_ids: Sequence[str]) -> np.ndarray:
        texts = self.user_texts(user_ids)
        vecs = self.user_encoder.encode(texts, cache=False)
        vecs[[not t for t in texts]] = 0.0  # no history: fallback row
        return vecs


class CallableRecommender:
    """Any callable ``(user_id, k) -> item ids`` (e.g. a gateway client serving the composed
    pipeline) as an evaluation system, with optional ``fit_fn(train)`` and
    ``observe_fn(events)`` so the same protocol (fit, fold-in, recommend) applies.
    The callable is responsible for excluding items the user has already seen."""

    def __init__(
        self,
        recommend_fn: Callable[[str, int], list[str]],
        *,
        name: str,
        fit_fn: Callable[[Dataset], None] | None = None,
        observe_fn: Callable[[pd.DataFrame], None] | None = None,
    ) -> None:
        self.name = name
        self.recommend_fn = recommend_fn
        self.fit_fn = fit_fn
        self.observe_fn = observe_fn

    def fit(self, train: Dataset) -> None:
        if self.fit_fn is not None:
            self.fit_fn(train)

    def observe(self, events: pd.DataFrame) -> None:
        if self.observe_fn is not None:
            self.observe_fn(events)

    def recommend(
        self, user_ids: Sequence[str], k: int, exclude_seen: bool = True
    ) -> dict[str, list[str]]:
        return {u: list(self.recommend_fn(u, k))[:k] for u in user_ids}
