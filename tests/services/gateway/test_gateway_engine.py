"""The gateway on the real Milvus engine (PyPI ``milvus`` 2.3.5), inside ``make test``.

Milvus Lite sees every write at once, whatever the consistency level; the engine does not:
a Session read waits only for this process's own writes, and the user rows are written by
the profile workers, another process. So the flows that depend on reading what was just
written run here again, on a stack of their own with the engine: ingest then recommend
(read-your-writes through the applied version and the profile cache), upsert then
retrieve, delete then nothing, the item calls (a query iterator on the engine), the
profile cache's version check, and last the event log's SIGKILL scenario (two workers, whose
exactly-once rests on their Strong reads of the rows they rewrite).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from recsys_client import NotFoundError, RecommenderClient

from ops.stack import LocalStack
from services.api import pb, pb_grpc
from services.vectors.store import VectorStore
from tests.services.events import test_event_log as event_log
from tests.services.gateway.test_gateway import (
    test_category_filter_and_exclusions_hold,
    test_delete_user_leaves_nothing_in_milvus,
    test_ingest_moves_recommendations_and_profile,
    test_new_item_is_retrievable_once_upsert_returns,
)
from tests.stack_fixtures import _indexed_stack
from training.data import load_dataset

pytestmark = pytest.mark.integration
__all__ = [  # collected here, with this module's engine fixtures
    "test_category_filter_and_exclusions_hold",
    "test_delete_user_leaves_nothing_in_milvus",
    "test_ingest_moves_recommendations_and_profile",
    "test_new_item_is_retrievable_once_upsert_returns",
]
# The event-log module's replicas and second worker, here on the engine stack.
replicas, second_worker, stubs = event_log.replicas, event_log.second_worker, event_log.stubs


@pytest.fixture(scope="module")
def stack(
    model_repository: Path, small_dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalStack]:
    var_dir = tmp_path_factory.mktemp("engine-stack")
    with _indexed_stack(model_repository, small_dataset_dir, var_dir, milvus_server="engine") as s:
        yield s


@pytest.fixture(scope="module")
def store(stack: LocalStack) -> Iterator[VectorStore]:
    """Another process's view: Strong, to see what the gateway and the workers wrote (the
    shared ``store`` is session-scoped, on the Lite stack; ``client`` follows ``stack``)."""
    strong = {"milvus_item_consistency": "Strong", "milvus_user_consistency": "Strong"}
    s = VectorStore(stack.settings.model_copy(update=strong))
    yield s
    s.close()


def test_the_stack_runs_the_engine(stack: LocalStack) -> None:
    assert stack.settings.milvus_server == "engine"
    gateway_store = VectorStore(stack.settings)
    try:  # the gateway's own settings: Session reads, and the profile cache in play
        assert gateway_store.settings.milvus_user_consistency == "Session"
        assert gateway_store.user_cache.enabled
    finally:
        gateway_store.close()


def test_a_cached_profile_never_hides_a_new_event_or_a_deletion(
    client: RecommenderClient,
) -> None:
    user = "cache-checked"
    seed = [
        pb.Event(user_id=user, item_id=i, event_type=pb.EVENT_TYPE_RATING, value=5.0)
        for i in ("1", "2", "3", "4")
    ]
    assert client.ingest(seed).accepted_count == 4
    first = [s.item.item_id for s in client.recommend(user, k=10, diversity=0.0).items]
    again = [s.item.item_id for s in client.recommend(user, k=10, diversity=0.0).items]
    assert first and again and not {"1", "2", "3", "4"} & {*first, *again}
    # A new event, applied by a profile worker (another process): the next Recommend must
    # not answer from the profile cached before it.
    clicked = again[0]
    client.ingest([pb.Event(user_id=user, item_id=clicked, event_type=pb.EVENT_TYPE_CLICK)])
    after = [s.item.item_id for s in client.recommend(user, k=10, diversity=0.0).items]
    assert clicked not in after, "a cached profile hid the user's newest event"
    assert client.profile(user).recent_item_ids[0] == clicked
    # A deleted user is never served from the cache either.
    assert client.delete_user(user).existed
    assert client.recommend(user, k=5).cold_start


def test_items_read_listed_deleted_and_written_back_through_the_gateway(
    stack: LocalStack, client: RecommenderClient, store: VectorStore
) -> None:
    """The item calls on the engine: pages from its query iterator, and the gateway's own
    delete and upsert seen by its very next reads (Session: its own writes; another
    process's writes appear once Milvus has applied them, which Lite hides)."""
    first = client.list_items(page_size=7)
    ids = [i.item_id for i in first.items]
    assert len(ids) == 7 and ids == sorted(ids) and first.next_page_token
    second = client.list_items(page_size=7, page_token=first.next_page_token)
    assert min(i.item_id for i in second.items) > ids[-1]
    every = [i.item_id for i in client.iter_items(page_size=1000)]
    assert every == sorted(set(every)) and len(every) <= store.count(store.items.name)
    # pymilvus's query iterator misses rows still in a growing segment on the 2.3 engine
    # (README, "Query iterators"): an item upserted by an earlier test may be missing; the
    # indexed catalogue (sealed by the indexing job's flush) must all be there.
    indexed = {str(i) for i in load_dataset(stack.settings.data_dir).items["item_id"]}
    assert indexed <= set(every)
    cold = [s.item.item_id for s in client.recommend("engine-cold-visitor", k=20).items]
    victim = client.get_item(cold[-1])
    assert client.delete_item(victim.item_id).existed
    with pytest.raises(NotFoundError):
        client.get_item(victim.item_id)
    assert victim.item_id not in {i.item_id for i in client.iter_items(page_size=1000)}
    again = {s.item.item_id for s in client.recommend("engine-cold-visitor", k=20).items}
    assert victim.item_id not in again
    assert client.upsert_items([victim]).upserted_count == 1
    assert client.get_item(victim.item_id).title == victim.title


def test_sigkill_under_load_applies_each_acknowledged_event_once_on_the_engine(
    stack: LocalStack,
    stubs: list[pb_grpc.RecommenderServiceStub],
    replicas: list[event_log.Replica],
    second_worker: str,
    store: VectorStore,
) -> None:
    """The event log's SIGKILL scenario (3 gateways, 2 workers; a gateway, a worker and
    nats-server killed under load) on the engine, last in this module: exactly once rests
    there on the workers' Strong reads of the rows they rewrite, which Lite cannot show (it
    sees every write at once, at any level)."""
    event_log.test_sigkill_gateway_worker_and_nats_under_load_applies_each_acknowledged_event_once(
        stack, stubs, replicas, second_worker, store
    )
