"""The Ray Data catalogue job writes the same vectors the item tower computes."""

from __future__ import annotations

import numpy as np
import pytest

from core.behaviour import DEFAULT_HALF_LIFE_DAYS
from ops.index_catalog import index_catalog_ray
from ops.indexing import item_rows
from ops.stack import LocalStack
from services.inference.triton_client import TritonClient
from services.vectors.store import VectorStore
from training.data import load_dataset
from training.ray_cluster import connect

pytestmark = pytest.mark.integration


def test_ray_data_job_indexes_through_triton_into_milvus(stack: LocalStack) -> None:
    import ray

    settings = stack.settings.model_copy(
        update={
            "items_collection": "ray_items",
            "users_collection": "ray_users",
            "segments_collection": "ray_segments",
        }
    )
    store = VectorStore(settings)
    store.ensure_collections()
    rows = item_rows(load_dataset(stack.settings.data_dir), DEFAULT_HALF_LIFE_DAYS)[:150]
    connect(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        written = index_catalog_ray(rows, settings, batch_size=32, actors=2)
    finally:
        ray.shutdown()
    assert written == 150
    assert store.count("ray_items") == 150
    ids = [r["item_id"] for r, _ in rows[:5]]
    stored = store.get_items(ids, 10, with_vectors=True, with_neighbours=True)
    triton = TritonClient(settings)
    try:
        direct = triton.embed_items([text for _, text in rows[:5]], 20)
    finally:
        triton.close()
    got = np.stack([stored[r["item_id"]]["vector"] for r, _ in rows[:5]])
    assert np.abs(got - direct).max() < 1e-5
    assert stored[rows[0][0]["item_id"]]["co_items"] == rows[0][0]["co_items"]
    store.drop_collections()
    store.close()
