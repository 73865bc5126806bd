"""Fill Milvus from a dataset: item vectors from the item tower, user vectors from history.

Vectors are computed by the models Triton serves (the same ones the gateway uses at request
time), so what is indexed and what is searched with always come from one release.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from services.inference.triton_client import TritonClient
from services.vectors.schema import (
    CO_ITEMS,
    MAX_CATEGORIES,
    RECENT_ITEMS,
    SEEN_ITEMS,
    TEXT_MAX_LENGTH,
    TITLE_MAX_LENGTH,
)
from services.vectors.store import VectorStore
from training.data import Dataset
from training.features.behaviour import co_occurrence, interests, item_popularity, seen_items
from training.features.text import history_from_ids, item_lookup, item_texts, user_histories
from training.features.text import user_text as build_user_text

log = logging.getLogger(__name__)
INDEX_TIMEOUT_S = 120.0


def _batches(seq: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(seq), size):
        yield seq[start : start + size]


def item_rows(dataset: Dataset) -> list[dict[str, Any]]:
    """Milvus item rows without vectors, each with ``embed_text`` for the item tower."""
    items = dataset.items
    texts = item_texts(items)
    popularity = item_popularity(dataset.events)
    neighbours = co_occurrence(dataset.events, top=CO_ITEMS)
    created = items["created_at"] if "created_at" in items else pd.Series(pd.NaT, index=items.index)
    return [
        {
            "item_id": str(iid),
            "title": str(title)[:TITLE_MAX_LENGTH],
            "categories": [c[:64] for c in list(cats)[:MAX_CATEGORIES]],
            "text": str(text)[:TEXT_MAX_LENGTH],
            "popularity": popularity.get(str(iid), 0.0),
            "created_at": 0 if pd.isna(ts) else int(pd.Timestamp(ts).timestamp()),
            "co_items": neighbours.get(str(iid), []),
            "embed_text": texts[str(iid)],
        }
        for iid, title, cats, text, ts in zip(
            items["item_id"],
            items["title"],
            items["categories"],
            items["text"],
            created,
            strict=True,
        )
    ]


def embed_and_upsert(
    rows: Sequence[dict[str, Any]], triton: TritonClient, store: VectorStore
) -> int:
    """One batch: item-tower vectors from Triton, then one Milvus upsert."""
    vectors = triton.embed_items([r["embed_text"] for r in rows], INDEX_TIMEOUT_S)
    return store.upsert_items(
        [
            {**{k: v for k, v in r.items() if k != "embed_text"}, "vector": vec.tolist()}
            for r, vec in zip(rows, vectors, strict=True)
        ]
    )


def index_items(dataset: Dataset, triton: TritonClient, store: VectorStore, batch: int = 64) -> int:
    """Embed every item through Triton's item tower; store it with popularity and neighbours."""
    rows = item_rows(dataset)
    done = 0
    with tqdm(total=len(rows), desc="index items", unit="item") as bar:
        for chunk in _batches(rows, batch):
            done += embed_and_upsert(chunk, triton, store)
            bar.update(len(chunk))
    return done


def user_rows(dataset: Dataset, max_items: int = 50) -> list[tuple[dict[str, Any], str]]:
    """(user row without vector, behaviour text) for every user with positive history."""
    lookup = item_lookup(dataset.items)
    histories = user_histories(dataset.events, dataset.items, max_items=RECENT_ITEMS)
    sizes = dataset.events.groupby("user_id").size()
    seen = seen_items(dataset.events, SEEN_ITEMS)
    now_ms = int(time.time() * 1000)
    out = []
    for uid, item_ids in histories.items():
        history = history_from_ids(item_ids[:max_items], lookup)
        row = {
            "user_id": uid,
            "segment": "",
            "interests": interests(history),
            "recent_items": item_ids[:RECENT_ITEMS],
            "seen_items": seen.get(uid, item_ids)[:SEEN_ITEMS],
            "history_size": int(sizes.get(uid, 0)),
            "updated_at": now_ms,
        }
        out.append((row, build_user_text(history)))
    return out


def index_users(
    dataset: Dataset,
    triton: TritonClient,
    store: VectorStore,
    batch: int = 64,
    max_items: int = 50,
) -> int:
    """Encode each user's recent positive history with the user tower and upsert it."""
    pending = user_rows(dataset, max_items)
    done = 0
    with tqdm(total=len(pending), desc="index users", unit="user") as bar:
        for chunk in _batches(pending, batch):
            vectors = triton.embed_users([text for _, text in chunk], INDEX_TIMEOUT_S)
            store.upsert_users(
                [
                    {**row, "vector": np.asarray(v, dtype=np.float32).tolist()}
                    for (row, _), v in zip(chunk, vectors, strict=True)
                ]
            )
            done += len(chunk)
            bar.update(len(chunk))
    return done
