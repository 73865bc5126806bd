"""What the sequence model (:mod:`training.models.sequence`) reads, without the model: the
item space (vocabulary, frozen content vectors, request-time popularity and age snapshots of
the training period) and each user's interactions in time order, as training rows, model
inputs and batches (same-second ties reshuffled every time a batch is built)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from core.behaviour import SECONDS_PER_DAY
from core.sequence_inputs import (
    INPUTS,
    PAD,
    event_tokens,
    fill_inputs,
    gap_buckets,
    rank_buckets,
)
from core.text import item_texts
from training.models.text_encoder import TowerEncoder
from training.pretrained import resolve_pretrained

#: age buckets: 0 = no interaction before the snapshot, 1 + floor(log2(1 + days since))
AGE_BUCKETS = 1 + 18
HALF_LIVES_DAYS = (1.0, 7.0, 30.0, 365.0)  # plus all-time counts: learned weights choose
N_POP_FEATURES = len(HALF_LIVES_DAYS) + 1


# --------------------------------------------------------------------------------------------
# the item space: vocabulary, content vectors and request-time snapshots (numpy)


@dataclass
class ItemSpace:
    """Everything the model knows about the catalogue besides its weights; saved with it.

    Model index of ``item_ids[n]`` is ``n + 1`` (0 is padding)."""

    item_ids: list[str]
    #: ``[N]`` bool: the item has a training event (else the "new item" vector is its id part)
    known: np.ndarray
    #: ``[P + 1]`` int64 unix seconds; snapshot ``k`` counts events before ``boundaries[k]``,
    #: snapshot ``P`` (all training events) is the one recommendations use
    boundaries: np.ndarray
    #: ``[P + 1, N, N_POP_FEATURES]`` float16: log1p of decayed positive-user counts
    popularity: np.ndarray
    #: ``[P + 1, N]`` int8 age bucket (module docstring)
    age: np.ndarray
    #: ``[N, C]`` float32 frozen content vectors (``C = 0``: none)
    content: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float32))
    _index: dict[str, int] | None = field(default=None, repr=False, compare=False)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def now(self) -> int:
        """The snapshot recommendations are scored with (after the whole training period)."""
        return len(self.boundaries) - 1

    def index(self) -> dict[str, int]:
        """``item_id -> model index`` (from 1)."""
        if self._index is None:
            self._index = {i: n + 1 for n, i in enumerate(self.item_ids)}
        return self._index

    def period(self, seconds: np.ndarray) -> np.ndarray:
        """The training snapshot of events at ``seconds`` (the period they fall in)."""
        k = np.searchsorted(self.boundaries, seconds, side="right") - 1
        return np.clip(k, 0, max(0, self.now - 1)).astype(np.int64)

    def with_content(self, content: np.ndarray) -> ItemSpace:
        if len(content) != self.n_items:
            raise ValueError(f"{len(content)} content vectors for {self.n_items} items")
        return dataclasses.replace(self, content=np.asarray(content, dtype=np.float32))


def to_seconds(ts: pd.Series) -> np.ndarray:
    """Unix seconds (int64) of a datetime column."""
    t = pd.to_datetime(ts, utc=True).dt.tz_localize(None)  # any resolution (ns, us, s)
    return np.asarray(t.to_numpy(dtype="datetime64[s]").astype(np.int64))


def build_item_space(
    events: pd.DataFrame,
    item_ids: Sequence[str],
    *,
    periods: int = 128,
    content: np.ndarray | None = None,
) -> ItemSpace:
    """The :class:`ItemSpace` of a catalogue from its training events (see module docs)."""
    ids = [str(i) for i in item_ids]
    col = {i: n for n, i in enumerate(ids)}
    ev = events[events["item_id"].astype(str).isin(col)]
    n = len(ids)
    ts = to_seconds(ev["timestamp"]) if len(ev) else np.zeros(0, dtype=np.int64)
    items = ev["item_id"].astype(str).map(col).to_numpy(dtype=np.int64)
    if len(ts):
        qs = np.floor(np.quantile(ts, np.linspace(0.0, 1.0, max(1, periods) + 1)[:-1]))
        bounds = np.unique(np.append(qs.astype(np.int64), ts.max() + 1))
    else:
        bounds = np.array([0, 1], dtype=np.int64)
    n_snap = len(bounds)  # P + 1
    first = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, items, ts)
    known = first < np.iinfo(np.int64).max

    # popularity: each user's first positive on an item counts once, from its time on
    pos = ev.loc[ev["weight"] > 0, ["user_id", "item_id", "timestamp"]].copy()
    pos["_s"] = to_seconds(pos["timestamp"]) if len(pos) else np.zeros(0, dtype=np.int64)
    pos = pos.sort_values("_s", kind="stable").drop_duplicates(["user_id", "item_id"])
    p_ts = pos["_s"].to_numpy(dtype=np.int64)
    p_items = pos["item_id"].astype(str).map(col).to_numpy(dtype=np.int64)
    p_snap = np.searchsorted(bounds, p_ts, side="right")  # first snapshot that counts it
    pop = np.zeros((n_snap, n, N_POP_FEATURES), dtype=np.float32)
    inside = p_snap < n_snap
    for f, half_life in enumerate((*HALF_LIVES_DAYS, math.inf)):
        decay = 0.0 if math.isinf(half_life) else math.log(2.0) / (half_life * SECONDS_PER_DAY)
        add = np.zeros((n_snap, n), dtype=np.float64)
        age = (bounds[p_snap[inside]] - p_ts[inside]).astype(np.float64)
        np.add.at(add, (p_snap[inside], p_items[inside]), np.exp(-decay * age))
        run = np.zeros(n, dtype=np.float64)
        for k in range(n_snap):
            if k:
                run *= math.exp(-decay * float(bounds[k] - bounds[k - 1]))
            run += add[k]
            pop[k, :, f] = np.log1p(run)

    ages = np.zeros((n_snap, n), dtype=np.int8)
    for k in range(n_snap):
        seen = first < bounds[k]  # only what happened before the snapshot: no leakage
        days = np.maximum(bounds[k] - first, 0).astype(np.float64) / SECONDS_PER_DAY
        bucket = 1 + np.minimum(np.floor(np.log2(1.0 + days)), AGE_BUCKETS - 2)
        ages[k] = np.where(seen, bucket, 0).astype(np.int8)
    space = ItemSpace(
        item_ids=ids,
        known=known,
        boundaries=bounds,
        popularity=pop.astype(np.float16),
        age=ages,
    )
    return space if content is None else space.with_content(content)


def content_vectors(
    items: pd.DataFrame,
    item_ids: Sequence[str],
    *,
    model_dir: str = "",
    max_seq_len: int = 128,
    encoder: Any = None,
    cache: bool = True,
) -> np.ndarray:
    """Frozen BERT vectors of the item texts, from the encoder the content baseline uses
    (``PretrainedContent``: mean-pooled, normalised, cached under ``var/cache/eval/``)."""
    if encoder is None:
        encoder = TowerEncoder(resolve_pretrained(model_dir), max_seq_len=max_seq_len)
    texts = item_texts(items)
    return np.asarray(encoder.encode([texts[i] for i in item_ids], cache=cache), np.float32)


# --------------------------------------------------------------------------------------------
# sequences (numpy): training rows, user inputs, same-second shuffling


def shuffle_ties(seconds: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A permutation of time-ordered events that reorders only events sharing a second."""
    return np.lexsort((rng.random(len(seconds)), seconds))


@dataclass(frozen=True)
class UserSequence:
    """One user's interactions in time order (ties in file order), as model inputs."""

    items: np.ndarray  # model indices
    tokens: np.ndarray
    seconds: np.ndarray
    positive: np.ndarray  # bool

    def __len__(self) -> int:
        return len(self.items)


def user_sequences(events: pd.DataFrame, space: ItemSpace) -> dict[str, UserSequence]:
    """``user_id -> UserSequence`` of every event on a catalogue item (negatives too: what a
    user disliked or only viewed is context; only positives are targets)."""
    idx = space.index()
    ev = events[events["item_id"].astype(str).isin(idx)].reset_index(drop=True)
    if ev.empty:
        return {}
    ev = ev.assign(_s=to_seconds(ev["timestamp"]), _o=np.arange(len(ev)))
    ev = ev.sort_values(["user_id", "_s", "_o"], kind="stable")
    items = ev["item_id"].astype(str).map(idx).to_numpy(dtype=np.int64)
    tokens = event_tokens(ev["event_type"], ev["weight"].to_numpy() > 0)
    secs = ev["_s"].to_numpy(dtype=np.int64)
    positive = ev["weight"].to_numpy() > 0
    users = ev["user_id"].astype(str).to_numpy()
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    ends = np.r_[starts[1:], len(users)]
    return {
        users[a]: UserSequence(items[a:b], tokens[a:b], secs[a:b], positive[a:b])
        for a, b in zip(starts, ends, strict=True)
    }


def training_rows(
    events: pd.DataFrame,
    space: ItemSpace,
    *,
    max_len: int,
    max_rows: int | None = None,
    seed: int = 0,
) -> list[dict[str, np.ndarray]]:
    """Training sequences: every user's events cut into chunks of ``max_len + 1`` from the
    end (consecutive chunks share one event, so every transition is a target exactly once).
    A row holds ``items``, ``tokens``, ``seconds``, ``positive``, ``gaps``, ``ranks``,
    ``periods`` (the snapshot of each event's time) and ``user_positives`` (the user's
    positive events in all rows, for ``user_balance``); rows without a positive target are
    dropped."""
    rows: list[dict[str, np.ndarray]] = []
    for seq in user_sequences(events, space).values():
        gaps = gap_buckets(seq.seconds)
        ranks = rank_buckets(len(seq))
        periods = space.period(seq.seconds)
        n_pos = np.array(max(1, int(seq.positive.sum())))
        for end in range(len(seq), 1, -max_len):
            s = slice(max(0, end - max_len - 1), end)
            if not seq.positive[s][1:].any():
                continue
            rows.append(
                {
                    "items": seq.items[s],
                    "tokens": seq.tokens[s],
                    "seconds": seq.seconds[s],
                    "positive": seq.positive[s],
                    "gaps": gaps[s],
                    "ranks": ranks[s],
                    "periods": periods[s],
                    "user_positives": n_pos,
                }
            )
    if max_rows is not None and len(rows) > max_rows:
        keep = np.random.default_rng(seed).choice(len(rows), size=max_rows, replace=False)
        rows = [rows[i] for i in sorted(keep)]
    return rows


def user_inputs(seqs: Sequence[UserSequence | None], max_len: int) -> dict[str, torch.Tensor]:
    """Left-padded :data:`INPUTS` of each user's last ``max_len`` events (an empty row for
    ``None``), as :meth:`SASRec.encode_user` reads them."""
    out = {k: np.zeros((len(seqs), max_len), dtype=np.int64) for k in INPUTS}
    for r, seq in enumerate(seqs):
        if seq is not None:
            fill_inputs(out, r, seq.items, seq.tokens, seq.seconds)
    return {k: torch.from_numpy(v) for k, v in out.items()}


class SequenceCollator:
    """Training rows -> a left-padded batch: :data:`INPUTS` of events ``0..n-1``, targets the
    next event's item where that event is positive (0 = no loss there), ``target_periods``
    the snapshot of each target's time, ``user_positives`` the row's user's positive count.
    Same-second events are reshuffled on every call."""

    def __init__(self, max_len: int, *, seed: int | None = None, shuffle: bool = True) -> None:
        self.max_len = max_len
        self.shuffle = shuffle
        self.rng = np.random.default_rng(seed)

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        # padded to the longest sequence of the batch, not to max_len: less wasted work
        b = len(rows)
        n = max(1, min(self.max_len, max(len(r["items"]) for r in rows) - 1)) if rows else 1
        keys = (*INPUTS, "targets", "target_periods")
        out: dict[str, np.ndarray] = {k: np.zeros((b, n), dtype=np.int64) for k in keys}
        out["user_positives"] = np.ones(b, dtype=np.int64)
        for r, row in enumerate(rows):
            order = (
                shuffle_ties(row["seconds"], self.rng)
                if self.shuffle
                else np.arange(len(row["items"]))
            )
            items, tokens = row["items"][order], row["tokens"][order]
            positive = row["positive"][order]
            # gaps, ranks and periods depend on the (unchanged) sorted times only
            gaps, ranks, periods = row["gaps"], row["ranks"], row["periods"]
            m = min(n, len(items) - 1)
            if m <= 0:
                continue
            sl = slice(len(items) - 1 - m, len(items) - 1)
            nx = slice(len(items) - m, len(items))
            out["items"][r, n - m :] = items[sl]
            out["tokens"][r, n - m :] = tokens[sl]
            out["gaps"][r, n - m :] = gaps[sl]
            out["ranks"][r, n - m :] = ranks[sl]
            out["user_positives"][r] = int(row["user_positives"])
            out["targets"][r, n - m :] = np.where(positive[nx], items[nx], PAD)
            out["target_periods"][r, n - m :] = periods[nx]
        return {k: torch.from_numpy(v) for k, v in out.items()}
