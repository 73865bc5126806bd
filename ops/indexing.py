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

from core.behaviour import co_occurrence, first_seen, interests, item_popularity, seen_items
from core.milvus_schema import CO_ITEMS, RECENT_ITEMS, SEEN_ITEMS
from core.rows import ItemRow, UserRow, item_row, user_row
from core.text import history_from_ids, item_lookup, item_texts, user_histories
from core.text import user_text as build_user_text
from services.inference.triton_client import TritonClient
from services.vectors.store import VectorStore
from training.data import Dataset

log = logging.getLogger(__name__)
INDEX_TIMEOUT_S = 120.0


def _batches(seq: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(seq), size):
        yield seq[start : start + size]


def item_rows(dataset: Dataset) -> list[tuple[ItemRow, str]]:
    """(Milvus item row without vector, the text the item tower embeds) for every item."""
    items = dataset.items
    texts = item_texts(items)
    popularity = item_popularity(dataset.events)
    neighbours = co_occurrence(dataset.events, top=CO_ITEMS)
    created = items["created_at"] if "created_at" in items else pd.Series(pd.NaT, index=items.index)
    return [
        (
            item_row(
                str(iid),
                title,
                cats,
                text,
                popularity=popularity.get(str(iid), 0.0),
                created_at=(
                    int(seen_at.get(str(iid), 0))
                    if pd.isna(ts)
                    else int(pd.Timestamp(ts).timestamp())
                ),
                co_items=neighbours.get(str(iid), []),
            ),
            texts[str(iid)],
        )
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
    rows: Sequence[tuple[ItemRow, str]], triton: TritonClient, store: VectorStore
) -> int:
    """One batch: item-tower vectors from Triton, then one Milvus upsert."""
    vectors = triton.embed_items([text for _, text in rows], INDEX_TIMEOUT_S)
    for (row, _), vector in zip(rows, vectors, strict=True):
        row["vector"] = vector.tolist()
    return store.upsert_items([row for row, _ in rows])


def index_items(dataset: Dataset, triton: TritonClient, store: VectorStore, batch: int = 64) -> int:
    """Embed every item through Triton's item tower; store it with popularity and neighbours."""
    rows = item_rows(dataset)
    done = 0
    with tqdm(total=len(rows), desc="index items", unit="item") as bar:
        for chunk in _batches(rows, batch):
            done += embed_and_upsert(chunk, triton, store)
            bar.update(len(chunk))
    return done


def user_rows(dataset: Dataset, max_items: int = 50) -> list[tuple[UserRow, str]]:
    """(user row without vector, behaviour text) for every user with positive history."""
    lookup = item_lookup(dataset.items)
    histories = user_histories(dataset.events, dataset.items, max_items=RECENT_ITEMS)
    sizes = dataset.events.groupby("user_id").size()
    seen = seen_items(dataset.events, SEEN_ITEMS)
    now_ms = int(time.time() * 1000)
    out = []
    for uid, item_ids in histories.items():
        history = history_from_ids(item_ids[:max_items], lookup)
        row = user_row(
            uid,
            segment="",
            interests=interests(history),
            recent_items=item_ids,
            seen_items=seen.get(uid, item_ids),
            history_size=int(sizes.get(uid, 0)),
            updated_at=now_ms,
        )
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
            for (row, _), vector in zip(chunk, vectors, strict=True):
                row["vector"] = np.asarray(vector, dtype=np.float32).tolist()
            store.upsert_users([row for row, _ in chunk])
            done += len(chunk)
            bar.update(len(chunk))
    return done
    seen_at = first_seen(dataset.events)  # the age of items without a creation time
