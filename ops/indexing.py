"""Fill Milvus from a dataset: item vectors from the item tower, user vectors from history.

Vectors are computed by the models Triton serves (the same ones the gateway uses at request
time), so what is indexed and what is searched with always come from one release.

Items are sent to Triton in length buckets: sorted by their (approximate or exact) token
count and cut into batches from that order. Triton's tokenizer pads every request to its
longest text (rounded up to ``pad_to_multiple_of`` only for requests too small to fill a batch
on their own), so a batch of similar lengths pads little,
while a batch in file order pads every short text to the longest one that happens to be in
it. Each row keeps its own vector: a batch's vectors are zipped with that batch's rows, and
:func:`embed_bucketed` puts vectors back in input order.

Deleted users never come back from here: given the event log's tombstones
(:class:`services.events.scan.Tombstones`), :func:`without_deleted` drops their events before
anything is computed (no user row, no share in popularity or co-occurrence);
``python -m ops.indexing`` reads them from the log and refuses to run blind to them.

Popularity decays with the catalogue's own half-life (:func:`index_half_life`: the setting,
else chosen on the events indexed), which the job records in the event log's aggregates
bucket with the time that popularity is decayed to, so the online popularity the profile
workers add decays alike and the gateways add both at the same time. Once the items are
indexed, it chooses the share of each list's slots that exploration gives new items on the
vectors just written (:func:`index_exploration`) and records it there too.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
from tqdm import tqdm

from core.behaviour import (
    co_occurrence,
    first_seen,
    interests,
    item_popularity,
    next_item_windows,
    popularity_half_life,
    popularity_reference,
    seen_items,
)
from core.config import Settings, get_settings
from core.exploration import (
    SLOT_CHOICES,
    choose_exploration_share,
    exploration_gains,
    exploration_items,
)
from core.milvus_schema import CO_ITEMS, RECENT_ITEMS, SEEN_ITEMS
from core.rows import ItemRow, UserRow, item_row, user_row
from core.sequence_inputs import user_event_sequences
from core.text import history_from_ids, item_lookup, item_texts, user_histories
from core.text import user_text as build_user_text
from services.events import aggregates
from services.events.scan import Tombstones, with_log
from services.inference.triton_client import TritonClient
from services.vectors.store import VectorStore
from training.data import Dataset, load_dataset

log = logging.getLogger(__name__)
INDEX_TIMEOUT_S = 120.0
VECTOR_READ_BATCH = 1000  # item ids per query when the exploration choice reads vectors


Row = TypeVar("Row", ItemRow, UserRow)
Lengths = Callable[[Sequence[str]], Sequence[int]]
"""Token counts (or an estimate) of texts, one per text, in their order."""

# BERT's pre-tokenizer splits on whitespace and around every punctuation mark; WordPiece then
# splits words further. The count of such pieces follows the token count closely.
_PRE_TOKEN = re.compile(r"\w+|[^\w\s]")


def _batches(seq: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(seq), size):
        yield seq[start : start + size]


def estimated_lengths(texts: Sequence[str]) -> list[int]:
    """Pre-token count of each text (words and punctuation marks), a tokenizer-free estimate
    of its token count. Any text works; it only orders texts, it never cuts one."""
    return [len(_PRE_TOKEN.findall(text)) for text in texts]


def release_lengths(repository: Path) -> Lengths | None:
    """Exact token counts from the ``tokenizer.json`` of the newest ``tokenizer`` version in
    ``repository``, or ``None`` when the repository has none here (e.g. Triton is remote).

    Only the order of the batches depends on it: another release's tokenizer, or none, costs
    padding, never a wrong vector."""
    model = repository / "tokenizer"
    versions = sorted(
        (int(p.name) for p in model.iterdir() if p.name.isdigit()) if model.is_dir() else ()
    )
    if not versions:
        return None
    path = model / str(versions[-1]) / "tokenizer" / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()
    tokenizer.no_truncation()

    def lengths(texts: Sequence[str]) -> list[int]:
        return [len(e.ids) for e in tokenizer.encode_batch(list(texts))]

    return lengths


def length_order(texts: Sequence[str], lengths: Lengths | None = None) -> list[int]:
    """Indices of ``texts`` from shortest to longest (ties: fewer characters, then input
    order), so that consecutive slices are length buckets."""
    counts = list((lengths or estimated_lengths)(texts))
    if len(counts) != len(texts):
        raise ValueError(f"{len(counts)} lengths for {len(texts)} texts")
    return sorted(range(len(texts)), key=lambda i: (counts[i], len(texts[i]), i))


def length_buckets(
    texts: Sequence[str], size: int, lengths: Lengths | None = None
) -> list[list[int]]:
    """Batches of at most ``size`` indices into ``texts``, each of similar length; every
    index exactly once."""
    if size < 1:
        raise ValueError("batch size must be >= 1")
    return [list(chunk) for chunk in _batches(length_order(texts, lengths), size)]


def item_batches(
    texts: Sequence[str], size: int, *, bucketed: bool = True, lengths: Lengths | None = None
) -> list[list[int]]:
    """The batches :func:`index_rows` sends, as indices into ``texts``: length buckets, or
    consecutive slices in input order when not ``bucketed``."""
    if not bucketed:
        return [list(chunk) for chunk in _batches(range(len(texts)), size)]
    return length_buckets(texts, size, lengths)


def embed_bucketed(
    texts: Sequence[str],
    embed: Callable[[Sequence[str]], np.ndarray],
    batch: int = 64,
    lengths: Lengths | None = None,
) -> np.ndarray:
    """``embed`` over length buckets of ``texts``; row ``i`` of the result is text ``i``'s."""
    out: np.ndarray | None = None
    for bucket in length_buckets(texts, batch, lengths):
        vectors = np.asarray(embed([texts[i] for i in bucket]))
        if vectors.ndim != 2 or vectors.shape[0] != len(bucket):
            raise ValueError(f"{vectors.shape[0]} vectors for a batch of {len(bucket)} texts")
        if out is None:
            out = np.empty((len(texts), vectors.shape[1]), dtype=vectors.dtype)
        out[bucket] = vectors
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


def without_deleted(dataset: Dataset, tombstones: Tombstones | None) -> Dataset:
    """``dataset`` without the events of users the log has tombstoned (deleted users)."""
    if not tombstones:
        return dataset
    deleted = dataset.events["user_id"].astype(str).map(tombstones.deleted).astype(bool)
    if not deleted.any():
        return dataset
    log.info(
        "left out %d events of %d deleted users",
        int(deleted.sum()),
        dataset.events.loc[deleted, "user_id"].nunique(),
    )
    return dataclasses.replace(dataset, events=dataset.events[~deleted.to_numpy()])


def index_half_life(dataset: Dataset, settings: Settings) -> float:
    """The popularity half-life (days) of this index: ``popularity_half_life_days`` when
    set, else chosen on ``dataset``'s events; recorded in the aggregates bucket, with the
    time the indexed popularity is decayed to, for the gateways and profile workers
    (:func:`services.events.aggregates.record_index`)."""
    days = popularity_half_life(dataset.events, settings.popularity_half_life_days)
    at = popularity_reference(dataset.events)
    asyncio.run(with_log(settings, lambda events: aggregates.record_index(events, days, at)))
    log.info("popularity half-life: %g days, decayed to %s", days, at)
    return days


def index_exploration(
    dataset: Dataset, store: VectorStore, settings: Settings, half_life_days: float
) -> float | None:
    """The catalogue's exploration share, chosen on ``dataset``'s events and the item
    vectors ``store`` holds (:func:`core.exploration.choose_exploration_share`, with the
    popularity half-life of this index), recorded in the aggregates bucket for the gateways
    (:func:`services.events.aggregates.record_exploration`). Only the vectors the choice
    reads are fetched (:func:`core.exploration.exploration_items`), not the catalogue's.
    None, and nothing recorded, where the ``exploration_share`` setting fixes it."""
    if settings.exploration_share is not None:
        return None
    rows = store.all_items(("item_id", "created_at"))
    created = {str(r["item_id"]): float(r.get("created_at") or 0) for r in rows}
    windows = next_item_windows(dataset.events)  # cut once: the choice's items and gains
    ids = exploration_items(windows, list(created), np.fromiter(created.values(), float))
    vectors: dict[str, Any] = {}
    for start in range(0, len(ids), VECTOR_READ_BATCH):
        batch = ids[start : start + VECTOR_READ_BATCH]
        found = store.get_items(batch, INDEX_TIMEOUT_S, with_vectors=True, consistency="Strong")
        vectors.update((i, found[i]["vector"]) for i in batch if i in found)
    ids = [i for i in ids if i in vectors]
    matrix = np.asarray([vectors[i] for i in ids], dtype=np.float32)
    gains = exploration_gains(
        windows,
        ids,
        matrix if ids else np.zeros((0, 1), dtype=np.float32),  # nothing to replay
        np.asarray([created[i] for i in ids]),
        half_life_days=half_life_days,
        pool=settings.exploration_pool,
    )
    share = choose_exploration_share(gains)
    asyncio.run(with_log(settings, lambda events: aggregates.record_exploration(events, share)))
    log.info(
        "exploration share: %g of each list; NDCG@10 with %s new-item slots: %s over %d "
        "validation users (%d item vectors read)",
        share,
        SLOT_CHOICES,
        np.round(gains.mean(axis=0), 4).tolist() if len(gains) else "-",
        len(gains),
        len(ids),
    )
    return share


def item_rows(dataset: Dataset, half_life_days: float) -> list[tuple[ItemRow, str]]:
    """(Milvus item row without vector, the text the item tower embeds) for every item,
    popularity decayed with ``half_life_days`` (:func:`index_half_life`)."""
    items = dataset.items
    texts = item_texts(items)
    popularity = item_popularity(dataset.events, half_life_days)
    neighbours = co_occurrence(dataset.events, top=CO_ITEMS)
    seen_at = first_seen(dataset.events)  # the age of items without a creation time
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


def with_vectors(
    rows: Sequence[tuple[Row, str]], encode: Callable[[Sequence[str], float], np.ndarray]
) -> list[Row]:
    """One chunk's rows with their vectors from one Triton request to ``encode`` (the item
    or the user tower), each row given its own text's vector."""
    vectors = encode([text for _, text in rows], INDEX_TIMEOUT_S)
    for (row, _), vector in zip(rows, vectors, strict=True):
        row["vector"] = np.asarray(vector, dtype=np.float32).tolist()
    return [row for row, _ in rows]


def embed_and_upsert(
    rows: Sequence[tuple[ItemRow, str]], triton: TritonClient, store: VectorStore
) -> int:
    """One batch: item-tower vectors from Triton, then one Milvus upsert."""
    return store.upsert_items(with_vectors(rows, triton.embed_items))


def index_items(
    dataset: Dataset,
    triton: TritonClient,
    store: VectorStore,
    batch: int = 64,
    *,
    half_life_days: float,
    bucketed: bool = True,
    lengths: Lengths | None = None,
) -> int:
    """Embed every item through Triton's item tower; store it with popularity (decayed with
    ``half_life_days``) and neighbours.

    Batches are length buckets (:func:`length_buckets`, ``lengths`` default
    :func:`estimated_lengths`; :func:`release_lengths` gives exact counts); ``bucketed=False``
    sends them in file order, as before."""
    rows = item_rows(dataset, half_life_days)
    return index_rows(rows, triton, store, batch, bucketed=bucketed, lengths=lengths)


def index_rows(
    rows: Sequence[tuple[ItemRow, str]],
    triton: TritonClient,
    store: VectorStore,
    batch: int = 64,
    *,
    bucketed: bool = True,
    lengths: Lengths | None = None,
) -> int:
    """:func:`index_items` for rows already built by :func:`item_rows`, through
    :func:`embed_while_upserting`."""
    chunks = item_batches([t for _, t in rows], batch, bucketed=bucketed, lengths=lengths)
    return embed_while_upserting(
        ([rows[i] for i in chunk] for chunk in chunks),
        lambda chunk: with_vectors(chunk, triton.embed_items),
        store.upsert_items,
        tqdm(total=len(rows), desc="index items", unit="item"),
    )


def embed_while_upserting(
    chunks: Iterable[Sequence[Any]],
    embed: Callable[[Sequence[Any]], list[Any]],
    upsert: Callable[[list[Any]], int],
    bar: tqdm[Any],
) -> int:
    """Each chunk embedded (one Triton request), its Milvus upsert running while the next
    chunk is embedded: one upsert in flight, in chunk order. A failed upsert stops the job at
    the next chunk, and it returns (the rows written) only when every upsert has been
    acknowledged."""
    done = 0
    pending: Future[int] | None = None
    with bar, ThreadPoolExecutor(max_workers=1, thread_name_prefix="upsert") as upserts:
        for chunk in chunks:
            embedded = embed(chunk)
            if pending is not None:
                done += pending.result()
            pending = upserts.submit(upsert, embedded)
            bar.update(len(chunk))
        if pending is not None:
            done += pending.result()
    return done


def user_rows(
    dataset: Dataset, max_items: int = 50, tombstones: Tombstones | None = None
) -> list[tuple[UserRow, str]]:
    """(user row without vector, behaviour text) for every user with positive history who
    was not deleted (``tombstones``)."""
    dataset = without_deleted(dataset, tombstones)
    lookup = item_lookup(dataset.items)
    histories = user_histories(dataset.events, dataset.items, max_items=RECENT_ITEMS)
    sizes = dataset.events.groupby("user_id").size()
    seen = seen_items(dataset.events, SEEN_ITEMS)
    sequences = user_event_sequences(dataset.events)
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
            events=sequences.get(uid),
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
    tombstones: Tombstones | None = None,
) -> int:
    """Encode each user's recent positive history with the user tower and upsert it; users
    in ``tombstones`` (deleted) are left out. Sent in length buckets, as items are: a
    history's text runs from one title to the tower's whole window."""
    pending = user_rows(dataset, max_items, tombstones)
    return embed_while_upserting(
        ([pending[i] for i in bucket] for bucket in length_buckets([t for _, t in pending], batch)),
        lambda chunk: with_vectors(chunk, triton.embed_users),
        store.upsert_users,
        tqdm(total=len(pending), desc="index users", unit="user"),
    )


def main(argv: list[str] | None = None) -> int:
    """Index a dataset's items and users into the configured Milvus through Triton, leaving
    out the users the event log has deleted."""
    settings = get_settings()
    parser = argparse.ArgumentParser(prog="python -m ops.indexing", description=main.__doc__)
    parser.add_argument("--data", default=str(settings.data_dir))
    parser.add_argument("--batch-size", type=int, default=settings.triton_batch_size)
    parser.add_argument(
        "--no-tombstones",
        action="store_true",
        help="do not read the event log's deletions (only for a store no user was deleted from)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=settings.log_level)
    tombstones = None if args.no_tombstones else Tombstones.load(settings)
    dataset = without_deleted(load_dataset(args.data), tombstones)
    if args.no_tombstones:  # nor can it record the half-life and reference time there
        days = popularity_half_life(dataset.events, settings.popularity_half_life_days)
        log.warning("popularity half-life %g days not recorded: set it on the gateways", days)
    else:
        days = index_half_life(dataset, settings)
    store, triton = VectorStore(settings), TritonClient(settings)
    try:
        store.ensure_collections()
        lengths = release_lengths(settings.model_repository)  # exact where the release is here
        n_items = index_items(
            dataset, triton, store, args.batch_size, half_life_days=days, lengths=lengths
        )
        if not args.no_tombstones:
            index_exploration(dataset, store, settings, days)
        n_users = index_users(dataset, triton, store, args.batch_size)
    finally:
        triton.close()
        store.close()
    print(f"indexed {n_items} items and {n_users} users ({len(tombstones or ())} deleted)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
