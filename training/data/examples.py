"""Training and evaluation examples built from a cleaned, time-split :class:`Dataset`.

No leakage by construction:

* a retrieval/ranker training example for a positive event at time ``t`` uses as behaviour
  text only the user's positives *strictly before* ``t`` (most recent first), all taken from
  the training split;
* an evaluation user's behaviour text comes from the training split only, and the relevant
  items are the user's positives in the test split that were not already seen in training.

Examples are plain dicts of strings (picklable, torch-free) so Ray can ship them to workers.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from core.text import history_from_ids, item_lookup, item_texts, user_text


def _positive_sequences(events: pd.DataFrame, known: set[str]) -> dict[str, list[tuple[Any, str]]]:
    pos = events.loc[events["weight"] > 0, ["user_id", "item_id", "timestamp"]]
    pos = pos[pos["item_id"].isin(known)].reset_index(drop=True)
    pos = pos.assign(_o=range(len(pos))).sort_values(["user_id", "timestamp", "_o"])
    out: dict[str, list[tuple[Any, str]]] = {}
    for uid, ts, iid in zip(pos["user_id"], pos["timestamp"], pos["item_id"], strict=True):
        out.setdefault(str(uid), []).append((ts, str(iid)))
    return out


def _recent_unique(ids_oldest_first: Sequence[str], limit: int, exclude: str = "") -> list[str]:
    out: list[str] = []
    seen = {exclude}
    for iid in reversed(ids_oldest_first):
        if iid in seen:
            continue
        seen.add(iid)
        out.append(iid)
        if len(out) >= limit:
            break
    return out


class TextBuilder:
    """Caches item text and ``(title, categories)`` lookups for one items table."""

    def __init__(self, items: pd.DataFrame, *, history_len: int = 20, max_chars: int = 1000):
        self.lookup = item_lookup(items)
        self.texts = item_texts(items)
        self.item_ids = list(self.texts)
        self.history_len = history_len
        self.max_chars = max_chars

    def user(self, history_most_recent_first: Sequence[str]) -> str:
        ids = list(history_most_recent_first)[: self.history_len]
        return user_text(history_from_ids(ids, self.lookup), self.max_chars)

    def item(self, item_id: str) -> str:
        return self.texts[item_id]


def retrieval_examples(
    train_events: pd.DataFrame,
    builder: TextBuilder,
    *,
    max_examples: int | None,
    seed: int = 0,
    min_history: int = 1,
) -> list[dict[str, str]]:
    """``{"user_id", "item_id", "user_text", "item_text"}`` for positive training events that
    have at least ``min_history`` earlier positives; a seeded uniform sample of
    ``max_examples`` (all when ``None``), returned in time order."""
    seqs = _positive_sequences(train_events, set(builder.texts))
    eligible: list[tuple[str, int, int]] = []  # (user, position, n_earlier)
    for uid, seq in seqs.items():
        times = [t for t, _ in seq]
        for p in range(len(seq)):
            n_earlier = bisect.bisect_left(times, times[p])
            if n_earlier >= min_history:
                eligible.append((uid, p, n_earlier))
    rng = random.Random(seed)
    if max_examples is not None and len(eligible) > max_examples:
        eligible = rng.sample(eligible, max_examples)
    out = []
    for uid, p, n_earlier in eligible:
        seq = seqs[uid]
        target = seq[p][1]
        hist = _recent_unique([i for _, i in seq[:n_earlier]], builder.history_len, target)
        if not hist:
            continue
        out.append(
            {
                "user_id": uid,
                "item_id": target,
                "user_text": builder.user(hist),
                "item_text": builder.item(target),
                "_t": seq[p][0],
            }
        )
    out.sort(key=lambda e: (e["_t"], e["user_id"], e["item_id"]))
    for e in out:
        del e["_t"]
    return out  # type: ignore[return-value]


def eval_users(
    train_events: pd.DataFrame,
    test_events: pd.DataFrame,
    builder: TextBuilder,
    *,
    max_users: int | None,
    max_relevant: int | None = 10,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Validation users: ``{"user_id", "user_text", "relevant": [...], "seen": [...]}``.

    ``relevant`` = the user's first ``max_relevant`` positives in the test split (in time
    order; all when ``None``) that were not already positives in training - "the next items
    the user liked"; ``seen`` = training positives (excluded from the ranking). Users need
    both a training history and at least one relevant item."""
    known = set(builder.texts)
    train_seqs = _positive_sequences(train_events, known)
    test_seqs = _positive_sequences(test_events, known)
    out: list[dict[str, Any]] = []
    for uid in sorted(set(train_seqs) & set(test_seqs)):
        seen_order = [i for _, i in train_seqs[uid]]
        seen = set(seen_order)
        relevant = [i for i in dict.fromkeys(i for _, i in test_seqs[uid]) if i not in seen]
        relevant = relevant[:max_relevant] if max_relevant is not None else relevant
        if not relevant:
            continue
        hist = _recent_unique(seen_order, builder.history_len)
        out.append(
            {
                "user_id": uid,
                "user_text": builder.user(hist),
                "relevant": relevant,
                "seen": sorted(seen),
            }
        )
    rng = random.Random(seed)
    if max_users is not None and len(out) > max_users:
        out = sorted(rng.sample(out, max_users), key=lambda u: str(u["user_id"]))
    return out


def candidate_pool(
    all_items: Sequence[str], must_include: Sequence[str], size: int | None, seed: int = 0
) -> list[str]:
    """Items to rank at evaluation: everything when ``size`` is ``None``, else
    ``must_include`` plus a seeded random sample of the others up to ``size``."""
    if size is None or size >= len(all_items):
        return list(all_items)
    must = list(dict.fromkeys(must_include))
    must_set = set(must)
    rest = [i for i in all_items if i not in must_set]
    rng = random.Random(seed)
    k = max(0, size - len(must))
    return must + rng.sample(rest, min(k, len(rest)))


def user_positive_sets(events: pd.DataFrame) -> dict[str, set[str]]:
    """``user_id -> items with a positive event``."""
    pos = events.loc[events["weight"] > 0, ["user_id", "item_id"]]
    out: dict[str, set[str]] = {}
    for u, i in zip(pos["user_id"], pos["item_id"], strict=True):
        out.setdefault(str(u), set()).add(str(i))
    return out


def ranker_examples(
    positives: Sequence[Mapping[str, str]],
    builder: TextBuilder,
    *,
    user_positives: Mapping[str, set[str]],
    hard_candidates: Mapping[int, Sequence[str]] | None,
    random_negatives: int,
    hard_negatives: int,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Labelled pairs ``{"user_text", "item_text", "label", "kind"}``: each positive
    (``kind="pos"``, label 1) plus ``random_negatives`` items drawn uniformly from the catalogue
    and ``hard_negatives`` drawn from ``hard_candidates[index]`` (the retrieval model's top
    items for that example), never one of the user's known positives (label 0)."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    catalogue = builder.item_ids
    for k, ex in enumerate(positives):
        uid, target, utext = ex["user_id"], ex["item_id"], ex["user_text"]
        banned = set(user_positives.get(uid, set())) | {target}
        out.append({"user_text": utext, "item_text": ex["item_text"], "label": 1.0, "kind": "pos"})
        chosen: set[str] = set()
        hard = [i for i in (hard_candidates or {}).get(k, []) if i not in banned]
        for iid in rng.sample(hard, min(hard_negatives, len(hard))):
            chosen.add(iid)
            out.append(
                {"user_text": utext, "item_text": builder.item(iid), "label": 0.0, "kind": "hard"}
            )
        tries = 0
        n_random = 0
        while n_random < random_negatives and tries < 100 * max(1, random_negatives):
            tries += 1
            iid = catalogue[rng.randrange(len(catalogue))]
            if iid in banned or iid in chosen:
                continue
            chosen.add(iid)
            n_random += 1
            out.append(
                {"user_text": utext, "item_text": builder.item(iid), "label": 0.0, "kind": "random"}
            )
    return out
