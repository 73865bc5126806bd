from __future__ import annotations

import pandas as pd

from core.text import ITEM_SEPARATOR, USER_PREFIX, user_text
from training.data import Dataset
from training.data.examples import (
    TextBuilder,
    candidate_pool,
    eval_users,
    ranker_examples,
    retrieval_examples,
    user_positive_sets,
)
from training.data.split import time_split


def test_examples_use_only_the_past(movielens: Dataset) -> None:
    train, _ = time_split(movielens.events, quantile=0.8)
    b = TextBuilder(movielens.items, history_len=5, max_chars=10_000)
    ex = retrieval_examples(train, b, max_examples=200, seed=1)
    assert 150 <= len(ex) <= 200
    pos = train[train["weight"] > 0]
    when = {(u, i): t for u, i, t in zip(pos.user_id, pos.item_id, pos.timestamp, strict=True)}
    for e in ex:
        t = when[(e["user_id"], e["item_id"])]
        earlier = pos[(pos.user_id == e["user_id"]) & (pos.timestamp < t)]
        allowed = {user_text([b.lookup[i]])[len(USER_PREFIX) :] for i in earlier.item_id}
        pieces = e["user_text"][len(USER_PREFIX) :].split(ITEM_SEPARATOR)
        assert e["user_text"].startswith(USER_PREFIX)
        assert 1 <= len(pieces) <= 5
        assert set(pieces) <= allowed, "history holds an item from the target's time or later"
        assert e["item_text"] == b.item(e["item_id"])


def test_eval_users_and_pools(movielens: Dataset) -> None:
    ds = movielens
    train, test = time_split(ds.events, quantile=0.8)
    b = TextBuilder(ds.items)
    users = eval_users(train, test, b, max_users=30, max_relevant=10, seed=0)
    assert 0 < len(users) <= 30
    for u in users:
        assert 1 <= len(u["relevant"]) <= 10
        assert not set(u["relevant"]) & set(u["seen"])
    rel = [i for u in users for i in u["relevant"]]
    pool = candidate_pool(b.item_ids, rel, 500, seed=0)
    assert set(rel) <= set(pool) and len(pool) == max(500, len(set(rel)))
    assert candidate_pool(b.item_ids, rel, None) == b.item_ids


def test_ranker_examples_negatives_are_not_positives(movielens: Dataset) -> None:
    ds = movielens
    train, _ = time_split(ds.events, quantile=0.8)
    b = TextBuilder(ds.items)
    ex = retrieval_examples(train, b, max_examples=50, seed=0)
    positives = user_positive_sets(train)
    hard = {k: b.item_ids[:20] for k in range(len(ex))}
    pairs = ranker_examples(
        ex,
        b,
        user_positives=positives,
        hard_candidates=hard,
        random_negatives=2,
        hard_negatives=1,
        seed=0,
    )
    kinds = pd.Series([p["kind"] for p in pairs]).value_counts().to_dict()
    assert kinds["pos"] == len(ex) and kinds["random"] == 2 * len(ex)
    assert kinds["hard"] <= len(ex)
    text_to_id = {v: k for k, v in b.texts.items()}
    by_user = {e["user_text"]: e["user_id"] for e in ex}
    for p in pairs:
        if p["label"] == 0:
            assert text_to_id[p["item_text"]] not in positives[by_user[p["user_text"]]]
