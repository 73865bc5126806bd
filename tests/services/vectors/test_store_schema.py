"""The Milvus schema check, against an embedded Milvus Lite file."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.config import Settings
from core.milvus_schema import users_schema
from core.rows import UserRow
from services.vectors.store import StoreSchemaError, VectorStore


def test_a_collection_from_an_older_schema_is_refused_with_its_missing_fields(
    tmp_path: Path,
) -> None:
    from pymilvus import MilvusClient

    settings = Settings(milvus_uri=str(tmp_path / "milvus.db"), embedding_dim=8)
    old = users_schema(8)
    old.fields[:] = [f for f in old.fields if f.name != "seen_items"]  # before seen_items
    raw = MilvusClient(settings.milvus_uri)
    index = raw.prepare_index_params()
    index.add_index("vector", index_type="FLAT", metric_type="IP")
    raw.create_collection(settings.users_collection, schema=old, index_params=index)
    raw.close()

    store = VectorStore(settings)
    try:
        assert not store.ping()
        with pytest.raises(StoreSchemaError, match="seen_items"):
            store.ensure_collections()
        store.drop_collections()
        store.ensure_collections()  # fresh collections: accepted
        assert store.ping()
        row: UserRow = {
            "user_id": "u1",
            "vector": [1.0] + [0.0] * 7,
            "segment": "",
            "interests": {},
            "recent_items": ["b"],
            "seen_items": ["b", "a"],
            "history_size": 2,
            "updated_at": 0,
            "version": 0,
            "events": {"items": ["a", "b"], "tokens": [5, 6], "seconds": [1, 2]},
        }
        store.upsert_users([row])
        got = store.get_user("u1", 5.0)
        assert got is not None and got["seen_items"] == ["b", "a"]
    finally:
        store.close()
