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
    embed_and_upsert,
    index_exploration,
    index_half_life,
    item_rows,
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


def index_catalog_ray(
    rows: Sequence[tuple[ItemRow, str]], settings: Settings, batch_size: int = 64, actors: int = 2
) -> int:
    """Embed and write ``rows`` (from :func:`ops.indexing.item_rows`) with Ray Data."""
    import ray

    if settings.milvus_is_lite:
        raise ValueError("Ray indexing needs a Milvus server URI, not a Milvus Lite file")
    if not rows:
        return 0
    frame = pd.DataFrame([{**row, EMBED_TEXT: text} for row, text in rows])
    # one block per BLOCK_BATCHES batches, at least one per actor: a single block (what
    # from_pandas makes of one frame) feeds a single actor, however many are asked for
    size = min(batch_size * BLOCK_BATCHES, math.ceil(len(frame) / actors))
    dataset = ray.data.from_pandas([frame.iloc[i : i + size] for i in range(0, len(frame), size)])
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
    log.info("indexed %d items by %d actors", batches["written"].sum(), batches["actor"].nunique())
    return int(batches["written"].sum())


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
        n = index_catalog_ray(item_rows(dataset, days), settings, args.batch_size, args.actors)
        index_exploration(dataset, store, settings, days)  # on the vectors the actors wrote
    finally:
        store.close()
    print(f"indexed {n} items")
    return 0


if __name__ == "__main__":
    sys.exit(main())
