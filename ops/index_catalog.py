"""Scale-out catalogue indexing as a Ray Data job: batches through Triton into Milvus.

``python -m ops.index_catalog`` runs it on the local Ray here and unchanged on a Ray
cluster (``ray job submit -- python -m ops.index_catalog``), where each actor holds its
own Triton and Milvus clients and writes in batches; throughput grows with actors until
Triton's instances or Milvus' write path saturate. It needs a Milvus server (a Milvus Lite
file cannot be shared between processes).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import pandas as pd

from core.config import Settings, get_settings
from core.rows import ItemRow, item_row
from ops.indexing import (
    Lengths,
    embed_and_upsert,
    index_exploration,
    index_half_life,
    item_rows,
    length_order,
    release_lengths,
    without_deleted,
)
from services.events.scan import Tombstones
from services.inference.triton_client import TritonClient
from services.vectors.store import VectorStore
from training.data import load_dataset
from training.ray_cluster import connect

log = logging.getLogger(__name__)
EMBED_TEXT = "embed_text"  # the item tower's input travels beside the row
BLOCK_BATCHES = 16
# how long the job waits for every actor (its Triton and Milvus clients) before the first
# block goes out: an actor up early would otherwise take the blocks cut for the others
ACTORS_START_S = 600


class EmbedAndWrite:
    """A Ray Data actor: one Triton and one Milvus client, reused for every batch."""

    def __init__(self, settings: Settings) -> None:
        self.triton = TritonClient(settings)
        self.store = VectorStore(settings)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        records: list[dict[str, Any]] = batch.to_dict("records")
        rows = [  # rebuilt through the one builder: Arrow hands lists back as arrays
            (
                item_row(
                    r["item_id"],
                    r["title"],
                    r["categories"],
                    r["text"],
                    popularity=r["popularity"],
                    created_at=r["created_at"],
                    co_items=r["co_items"],
                ),
                str(r[EMBED_TEXT]),
            )
            for r in records
        ]
        written = embed_and_upsert(rows, self.triton, self.store)
        return pd.DataFrame({"written": [written], "actor": [os.getpid()]})


def blocks(
    rows: Sequence[tuple[ItemRow, str]],
    batch_size: int,
    actors: int,
    lengths: Lengths | None = None,
) -> list[pd.DataFrame]:
    """``rows`` (with their texts) from shortest to longest text, cut into Ray Data blocks
    of whole batches: at most BLOCK_BATCHES batches, and at least one block per actor (a
    single block, what ``from_pandas`` makes of one frame, feeds a single actor)."""
    order = length_order([text for _, text in rows], lengths)
    frame = pd.DataFrame([{**rows[i][0], EMBED_TEXT: rows[i][1]} for i in order])
    batches = math.ceil(len(frame) / batch_size)
    size = batch_size * max(1, min(BLOCK_BATCHES, math.ceil(batches / actors)))  # 0: no rows
    return [frame.iloc[i : i + size] for i in range(0, len(frame), size)]


def index_catalog_ray(
    rows: Sequence[tuple[ItemRow, str]],
    settings: Settings,
    batch_size: int = 64,
    actors: int = 2,
    lengths: Lengths | None = None,
) -> int:
    """Embed and write ``rows`` (from :func:`ops.indexing.item_rows`) with Ray Data, in
    length order (``lengths``, default estimated) so that each batch pads little."""
    import ray

    if settings.milvus_is_lite:
        raise ValueError("Ray indexing needs a Milvus server URI, not a Milvus Lite file")
    if not rows:
        return 0
    context = ray.data.DataContext.get_current()
    waited, context.wait_for_min_actors_s = context.wait_for_min_actors_s, ACTORS_START_S
    try:  # a dataset keeps a copy of the context it was made under
        dataset = ray.data.from_pandas(blocks(rows, batch_size, actors, lengths))
    finally:
        context.wait_for_min_actors_s = waited
    written = dataset.map_batches(
        EmbedAndWrite,
        fn_constructor_kwargs={"settings": settings},
        batch_size=batch_size,
        batch_format="pandas",
        # one block at a time per actor: else the first actor up can queue them all
        compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1),
        num_cpus=0.5,
    )
    batches = written.to_pandas()  # one row per batch
    total = int(batches["written"].sum())
    log.info("indexed %d items by %d actors", total, batches["actor"].nunique())
    return total


def main(argv: list[str] | None = None) -> int:
    settings = get_settings()
    parser = argparse.ArgumentParser(prog="python -m ops.index_catalog", description=__doc__)
    parser.add_argument("--data", default=str(settings.data_dir))
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=settings.triton_batch_size)
    args = parser.parse_args(argv)
    logging.basicConfig(level=settings.log_level)
    connect()
    store = VectorStore(settings)
    try:
        store.ensure_collections()
        # deleted users' events leave no trace in popularity or co-occurrence
        dataset = without_deleted(load_dataset(args.data), Tombstones.load(settings))
        days = index_half_life(dataset, settings)
        rows, lengths = item_rows(dataset, days), release_lengths(settings.model_repository)
        n = index_catalog_ray(rows, settings, args.batch_size, args.actors, lengths)
        index_exploration(dataset, store, settings, days)  # on the vectors the actors wrote
    finally:
        store.close()
    print(f"indexed {n} items")
    return 0


if __name__ == "__main__":
    sys.exit(main())
