"""The segment refit against Milvus (an embedded Milvus Lite file): rows written, profiles
left alone, the online nearest-centroid search agreeing with the fitted labels."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from core.config import Settings
from core.milvus_schema import SEGMENT_FIELDS
from core.rows import user_row
from ops.segments import fit_segments, unit_rows
from services.events.log import EventLog
from services.events.scan import Tombstones
from services.vectors.store import VectorStore
from tests.nats_server import nats_settings, on_log

__all__ = ["nats_settings"]

DIM = 16
PER_CLUSTER = 20


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[VectorStore]:
    store = VectorStore(Settings(milvus_uri=str(tmp_path / "milvus.db"), embedding_dim=DIM))
    store.ensure_collections()
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(DIM, 4)))[0].T
    rows = []
    for cluster in range(3):
        for n in range(PER_CLUSTER):
            vector = unit_rows((2 * basis[0] + basis[1 + cluster] + rng.normal(0, 0.05, DIM))[None])
            rows.append(
                user_row(
                    f"u{cluster}-{n}",
                    segment="",
                    interests={f"genre-{cluster}": 1.0},
                    recent_items=[f"i{cluster}-{j}" for j in range(n % 5 + 1)],
                    seen_items=[f"i{cluster}-0"],
                    history_size=n + 1,
                    updated_at=1000 + n,
                    vector=vector[0],
                )
            )
    store.upsert_users(rows)
    try:
        yield store
    finally:
        store.close()


def test_fit_segments_writes_segments_and_only_the_segment_field(store: VectorStore) -> None:
    before = {u["user_id"]: u for u in store.scan(store.users.name, ["user_id", "vector"])}
    report = fit_segments(store, k=3, online_check=3 * PER_CLUSTER, k_scan=(2, 3))
    assert report.users == 3 * PER_CLUSTER
    assert sorted(report.sizes.values()) == [PER_CLUSTER] * 3
    assert report.reduction == "pca" and 2 <= report.dims <= DIM
    assert report.silhouette_reduced is not None and report.silhouette_reduced > 0.5
    assert report.agreement == 1.0
    assert report.online_checked == 3 * PER_CLUSTER and report.online_agreement == 1.0
    assert set(report.k_scan) == {2, 3}

    segments = store.scan(store.segments.name, [*SEGMENT_FIELDS, "vector"])
    assert sorted(s["segment_id"] for s in segments) == ["seg-0", "seg-1", "seg-2"]
    for segment in segments:
        assert segment["vector"].shape == (DIM,)  # the user-vector space, not the PCA one
        assert np.linalg.norm(segment["vector"]) == pytest.approx(1.0, abs=1e-4)
        assert segment["popular_items"][0].endswith("-0")  # every member has item i<c>-0

    users = store.scan(store.users.name, ["user_id", "segment", "interests", "history_size"])
    by_cluster: dict[str, set[str]] = {}
    for u in users:
        by_cluster.setdefault(u["user_id"].split("-")[0], set()).add(u["segment"])
        n = int(u["user_id"].split("-")[1])
        assert u["history_size"] == n + 1  # the rest of the profile is untouched
        current = store.get_user(u["user_id"], 5.0)
        assert current is not None
        assert np.allclose(current["vector"], before[u["user_id"]]["vector"])
    assert all(len(s) == 1 for s in by_cluster.values())
    assert len(set().union(*by_cluster.values())) == 3

    # a refit with fewer segments drops the stale ones
    fit_segments(store, k=2, online_check=0)
    assert len(store.scan(store.segments.name, ["segment_id"])) == 2


def test_segment_writes_skip_users_deleted_meanwhile(store: VectorStore) -> None:
    assert store.delete_user("u0-0", 5.0)
    written = store.set_user_segments({"u0-0": "seg-0", "u0-1": "seg-1"})
    assert written == 1
    assert store.get_user("u0-0", 5.0) is None  # not brought back by the refit
    row = store.get_user("u0-1", 5.0)
    assert row is not None and row["segment"] == "seg-1" and row["history_size"] == 2
    assert store.set_user_segments({}) == 0


@pytest.mark.integration
def test_deleted_users_take_no_part_in_the_refit(
    store: VectorStore, nats_settings: Settings
) -> None:
    """Users the event log tombstoned (here while their rows are still there: deleted during
    the scan) are neither fitted, nor counted in popular items, nor written."""

    async def forget_cluster_0(log: EventLog) -> None:
        for n in range(PER_CLUSTER):
            await log.forget_user(f"u0-{n}", 5.0)

    on_log(nats_settings, forget_cluster_0)
    report = fit_segments(
        store, k=2, online_check=0, tombstones=lambda: Tombstones.load(nats_settings)
    )
    assert report.users == 2 * PER_CLUSTER
    segments = store.scan(store.segments.name, list(SEGMENT_FIELDS))
    popular = {i for s in segments for i in s["popular_items"]}
    assert popular and not [i for i in popular if i.startswith("i0-")]
    users = store.scan(store.users.name, ["user_id", "segment"])
    assert {u["segment"] for u in users if u["user_id"].startswith("u0-")} == {""}
    assert all(u["segment"] for u in users if not u["user_id"].startswith("u0-"))
