"""A collection the server serves released (after a restart) is loaded by the read that
finds it so, in any process: a make-test run once saw Milvus Lite keep ``recsys_users``
released after a SIGKILL and restart, and every later read failed."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.config import Settings
from core.rows import user_row
from ops.processes import free_port, milvus_process, port_open
from services.vectors.store import VectorStore

pytestmark = pytest.mark.integration


def test_a_read_of_a_released_collection_loads_it_and_answers(tmp_path: Path) -> None:
    from pymilvus import MilvusClient

    port = free_port()
    server = milvus_process(tmp_path / "milvus", port, tmp_path).start()
    try:
        server.wait_ready(lambda: port_open("127.0.0.1", port), 60)
        settings = Settings(milvus_uri=f"http://127.0.0.1:{port}", embedding_dim=8)
        store = VectorStore(settings)
        store.ensure_collections()
        row = user_row(
            "u1",
            segment="",
            interests={"Drama": 0.75, "War": 0.25},
            recent_items=["a"],
            seen_items=["a"],
            history_size=1,
            events={"items": ["a"], "tokens": [3], "seconds": [1_700_000_000]},
            vector=[1.0] + [0.0] * 7,
        )
        store.upsert_users([row])
        other = MilvusClient(uri=settings.milvus_uri)  # another process's view: released
        other.release_collection(settings.users_collection)
        assert "NotLoad" in str(other.get_load_state(settings.users_collection)["state"])
        got = store.get_user("u1", 5.0)
        assert got is not None and got["history_size"] == 1
        # JSON fields go out as JSON text (VectorStore._json_encoded) and come back as values
        assert got["interests"] == row["interests"] and got["events"] == row["events"]
        assert "Loaded" in str(other.get_load_state(settings.users_collection)["state"])
        other.close()
        store.close()
    finally:
        server.stop()
