"""The Ray Data catalogue job (``python -m ops.index_catalog``) writes the vectors the item
tower computes and records the catalogue's half-life and exploration share."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import ops.index_catalog
from core.behaviour import SECONDS_PER_DAY, popularity_half_life, popularity_reference
from core.config import get_settings
from core.exploration import DEFAULT_EXPLORATION_SHARE
from ops.indexing import item_rows
from ops.stack import LocalStack
from services.events import aggregates
from services.inference.triton_client import TritonClient
from services.vectors.store import VectorStore
from tests.nats_server import on_log
from tests.training.export.served_runner import tower_atol
from training.data import load_dataset
from training.ray_cluster import connect

N_ITEMS = 150


@pytest.mark.integration
def test_ray_catalogue_job_indexes_through_triton_into_milvus(
    stack: LocalStack,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    import ray

    data = tmp_path / "catalogue"
    data.mkdir()
    movies = pd.read_csv(stack.settings.data_dir / "movies.csv").head(N_ITEMS)
    ratings = pd.read_csv(stack.settings.data_dir / "ratings.csv")
    movies.to_csv(data / "movies.csv", index=False)
    ratings[ratings["movieId"].isin(movies["movieId"])].to_csv(data / "ratings.csv", index=False)
    own = {  # its own collections and aggregates bucket: the shared stack's stay as they are
        "RECSYS_ITEMS_COLLECTION": "ray_items",
        "RECSYS_USERS_COLLECTION": "ray_users",
        "RECSYS_SEGMENTS_COLLECTION": "ray_segments",
        "RECSYS_AGGREGATES_BUCKET": "ray_aggregates",
    }
    for name, value in {**stack.env(), **own}.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    settings = get_settings()
    connect(num_cpus=2, include_dashboard=False, log_to_driver=False)
    caplog.set_level(logging.INFO, logger=ops.index_catalog.__name__)
    try:
        assert ops.index_catalog.main(["--data", str(data), "--batch-size", "32"]) == 0
    finally:
        ray.shutdown()
        get_settings.cache_clear()
    assert f"indexed {N_ITEMS} items" in capsys.readouterr().out
    done = [r.getMessage() for r in caplog.records if r.name == ops.index_catalog.__name__]
    assert done == [f"indexed {N_ITEMS} items by 2 actors"]  # both actors had blocks

    store = VectorStore(settings.model_copy(update={"milvus_item_consistency": "Strong"}))
    dataset = load_dataset(data)
    days = popularity_half_life(dataset.events, settings.popularity_half_life_days)
    rows = item_rows(dataset, days)
    triton = TritonClient(settings)
    try:
        assert store.count("ray_items") == N_ITEMS
        ids = [r["item_id"] for r, _ in rows[:5]]
        stored = store.get_items(ids, 10, with_vectors=True, with_neighbours=True)
        direct = triton.embed_items([text for _, text in rows[:5]], 20)
        got = np.stack([stored[i]["vector"] for i in ids])
        assert np.abs(got - direct).max() < tower_atol(1e-5)  # its batches, not these five
        assert stored[ids[0]]["co_items"] == rows[0][0]["co_items"]
    finally:
        triton.close()
        store.drop_collections()
        store.close()
    # what the gateways read from the job's bucket: the indexed popularity weighs a half one
    # half-life after the time it was decayed to, and the exploration share (the default:
    # this catalogue has too few users to choose on)
    at = popularity_reference(dataset.events)
    assert at is not None
    recorded = on_log(settings, lambda log: aggregates.read(log, now=at + days * SECONDS_PER_DAY))
    assert recorded.indexed_weight == pytest.approx(0.5)
    assert recorded.exploration_share == DEFAULT_EXPLORATION_SHARE


def test_blocks_are_whole_length_ordered_batches_for_every_actor() -> None:
    """Each batch an actor embeds is cut from texts of similar length (it is padded to its
    longest), and every actor gets a block."""
    from core.rows import item_row
    from ops.index_catalog import EMBED_TEXT, blocks
    from ops.indexing import estimated_lengths

    texts = [" ".join(["word"] * (1 + (i * 7) % 23)) for i in range(300)]
    rows = [(item_row(str(i), f"t{i}", [], text), text) for i, text in enumerate(texts)]
    for actors, expected in ((2, [160, 140]), (4, [96, 96, 96, 12]), (1, [300])):
        cut = blocks(rows, 32, actors, estimated_lengths)
        assert [len(b) for b in cut] == expected  # whole batches of 32, up to 16 a block
    ordered = pd.concat(blocks(rows, 32, 2, estimated_lengths))[EMBED_TEXT].tolist()
    assert sorted(ordered) == sorted(texts)
    counts = estimated_lengths(ordered)
    assert counts == sorted(counts)
    assert blocks([], 32, 2) == []
