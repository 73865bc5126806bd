"""The gateway against real tritonserver and Milvus Lite processes."""

from __future__ import annotations

import os
import signal
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from recsys_client import RecommenderClient

from core.config import Settings
from ops.stack import LocalStack
from services.api import pb, pb_grpc
from services.events import aggregates
from services.events.aggregates import Aggregates
from services.events.log import BlockingEventLog
from services.inference.triton_client import TritonClient
from services.vectors.store import VectorStore

pytestmark = pytest.mark.integration


def _code(excinfo: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    return excinfo.value.code()  # type: ignore[attr-defined,no-any-return]


def test_health_serving_and_reflection(stack: LocalStack) -> None:
    with grpc.insecure_channel(stack.gateway_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "recsys.v1.RecommenderService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = refl.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names = {s.name for r in replies for s in r.list_services_response.service}
    assert "recsys.v1.RecommenderService" in names
    assert "grpc.health.v1.Health" in names


SOURCES = {"ann", "co_occurrence", "segment", "popular"}
REASONS = (
    "similar to ",
    "people who liked ",
    "popular in your segment",
    "popular overall",
    "new in ",
    "for your recent interest in ",
)


def test_known_user_gets_ranked_personal_items(
    client: RecommenderClient, store: VectorStore
) -> None:
    reply = client.recommend("1", k=10, diversity=0.0)
    assert not reply.degraded and not reply.cold_start
    assert reply.model_version == "1"
    assert len(reply.items) == 10
    sources = [s.source for s in reply.items]
    assert set(sources) <= SOURCES and {"ann", "co_occurrence"} & set(sources)
    # Every candidate was scored by the feature ranker on Triton (one request) and the list
    # is in its order, best first (no MMR at diversity 0, no new item in this slice).
    assert all(0.0 < s.click_probability < 1.0 for s in reply.items)
    scores = [s.score for s in reply.items]
    assert scores == sorted(scores, reverse=True)
    assert all(s.reason.startswith(REASONS) for s in reply.items)
    user = store.get_user("1", 5)
    assert user is not None
    assert not {s.item.item_id for s in reply.items} & set(user["recent_items"])


def _settled_aggregates(settings: Settings) -> Aggregates:
    """The online aggregates once no profile worker has merged for longer than a gateway's
    refresh interval, so the running gateway holds the same (earlier tests' events move
    them: popularity candidates and co-occurrence neighbours)."""
    events = BlockingEventLog(settings, "test-aggregates")
    try:
        deadline = time.monotonic() + 60
        while not events.ready():
            assert time.monotonic() < deadline, "event log not ready"
            time.sleep(0.2)
        last = None
        while True:
            now = events.call(lambda log: aggregates.read(log), 5.0)
            if last is not None and _same(now, last):
                return now
            assert time.monotonic() < deadline, "online aggregates kept changing"
            last = now
            time.sleep(settings.aggregates_refresh_s + settings.aggregates_flush_s)
    finally:
        events.close()


def _same(a: Aggregates, b: Aggregates) -> bool:
    """Equal but for the decay between the two reads (a 365-day half-life: ~1e-7 over s)."""
    return (
        a.co_occurrence == b.co_occurrence
        and a.popularity.keys() == b.popularity.keys()
        and all(np.isclose(a.popularity[k], b.popularity[k], rtol=1e-6) for k in a.popularity)
    )


def test_click_probabilities_are_the_feature_rankers_on_the_gateways_features(
    client: RecommenderClient, stack: LocalStack, store: VectorStore
) -> None:
    """The probability a client sees is the feature ranker's (the exported ONNX graph, run
    here by ONNX Runtime) on the rows the gateway builds, and Triton serves the same."""
    import onnxruntime as ort

    from services.deadline import Deadline
    from services.recommend.context import Context, Filters
    from services.recommend.pipeline import Pipeline
    from services.recommend.rank import Rankers, RankerStatus, candidate_features
    from services.recommend.retrieve import PopularItems

    settings = stack.settings
    popular = PopularItems(settings.popular_cache_size)
    assert popular.refresh(store)
    online = _settled_aggregates(settings)  # what the running gateway blends in too
    popular.set_online(online.popularity, online.co_occurrence, online.indexed_weight)
    triton = TritonClient(settings)
    try:
        ready = RankerStatus(deployed=True, ready=True)
        up = Rankers(features=ready, sequence=ready)
        pipe = Pipeline(settings, store, triton, popular, lambda _: up)
        ctx = Context.begin("1", 5, Filters(), Deadline.after(20), diversity=0.0)
        pipe.profile(ctx)
        pipe.retrieve(ctx)
        assert ctx.sequence_inputs is not None and not ctx.degraded
        assert any("sequence" in c.ranks for c in ctx.candidates)
        scores = triton.sequence(ctx.sequence_inputs, [c.item_id for c in ctx.candidates], 20)
        # retrieval's one request scored every candidate as this request does (its own best
        # items through top_scores, the rest through candidate_scores)
        one = [ctx.sequence_scores[c.item_id] for c in ctx.candidates]
        assert np.allclose(one, scores.candidate_scores, atol=1e-5)
        features = candidate_features(ctx, popular.clock(), scores.candidate_scores)
        served = triton.rank_features(features, 20)
    finally:
        triton.close()
    model_dir = settings.model_repository / "feature_ranker"
    newest = max(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())
    session = ort.InferenceSession(str(model_dir / str(newest) / "model.onnx"))
    expected = session.run(["probability"], {"features": features})[0].reshape(-1)
    assert np.allclose(served, expected, atol=1e-5)
    by_id = dict(zip((c.item_id for c in ctx.candidates), expected, strict=True))
    reply = client.recommend("1", k=5, diversity=0.0)
    got = [s.click_probability for s in reply.items]
    assert np.allclose(got, [by_id[s.item.item_id] for s in reply.items], atol=1e-5)


def test_mmr_diversity_lowers_similarity_within_the_list(
    client: RecommenderClient, store: VectorStore
) -> None:
    def intra_list_similarity(reply: pb.RecommendResponse) -> float:
        ids = [s.item.item_id for s in reply.items]
        rows = store.get_items(ids, 5, with_vectors=True)
        vectors = np.stack([rows[i]["vector"] for i in ids])
        sims = vectors @ vectors.T
        return float((sims.sum() - np.trace(sims)) / (len(ids) * (len(ids) - 1)))

    plain = client.recommend("1", k=10, diversity=0.0)
    diverse = client.recommend("1", k=10, diversity=0.9)
    assert intra_list_similarity(diverse) < intra_list_similarity(plain)


def test_unknown_user_gets_popular_cold_start(client: RecommenderClient) -> None:
    reply = client.recommend("someone-new", k=5, diversity=0.0)
    assert reply.cold_start and not reply.degraded
    assert [s.source for s in reply.items] == ["popular"] * 5
    assert [s.score for s in reply.items] == sorted((s.score for s in reply.items), reverse=True)
    assert {s.reason for s in reply.items} == {"popular overall"}


def test_category_filter_and_exclusions_hold(client: RecommenderClient) -> None:
    first = client.recommend("1", k=5)
    excluded = [s.item.item_id for s in first.items[:2]]
    reply = client.recommend("1", k=10, categories=["Comedy"], exclude=excluded)
    assert reply.items
    for scored in reply.items:
        assert "Comedy" in scored.item.categories
        assert scored.item.item_id not in excluded


@pytest.mark.parametrize(
    ("request_kwargs", "fragment"),
    [
        ({"user_id": "", "k": 5}, "user_id is required"),
        ({"user_id": "bad id!", "k": 5}, "malformed"),
        ({"user_id": "x" * 200, "k": 5}, "malformed"),
        ({"user_id": "1", "k": -1}, "k must be between"),
        ({"user_id": "1", "k": 100_000}, "k must be between"),
        ({"user_id": "1", "k": 5, "exclude_item_ids": ["ok", "not ok"]}, "exclude_item_ids"),
        ({"user_id": "1", "k": 5, "categories": ["\x00"]}, "categories"),
        ({"user_id": "1", "k": 5, "diversity": 1.5}, "diversity"),
    ],
)
def test_recommend_rejects_bad_input(
    stack: LocalStack, request_kwargs: dict[str, object], fragment: str
) -> None:
    with grpc.insecure_channel(stack.gateway_target) as channel:
        stub = pb_grpc.RecommenderServiceStub(channel)
        with pytest.raises(grpc.RpcError) as excinfo:
            stub.Recommend(pb.RecommendRequest(**request_kwargs), timeout=5)  # type: ignore[arg-type]
    assert _code(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in excinfo.value.details()  # type: ignore[attr-defined]


def test_k_zero_means_default(client: RecommenderClient) -> None:
    assert len(client.recommend("1", k=0).items) == 10


def test_similar_items_and_not_found(client: RecommenderClient) -> None:
    reply = client.similar("1", k=5)  # Toy Story
    assert len(reply.items) == 5 and "1" not in {s.item.item_id for s in reply.items}
    with pytest.raises(grpc.RpcError) as excinfo:
        client.similar("no-such-item")
    assert _code(excinfo) == grpc.StatusCode.NOT_FOUND


def test_new_item_is_retrievable_once_upsert_returns(client: RecommenderClient) -> None:
    item = pb.Item(
        item_id="new-space-film",
        title="Galactic Toy Adventure (2031)",
        categories=["Animation", "Children", "Sci-Fi"],
        description="Toys lost in space find their way home.",
    )
    assert client.upsert_items([item]).upserted_count == 1
    similar = client.similar("new-space-film", k=3)
    assert len(similar.items) == 3
    # ...and recommendable to a user whose taste it matches, explained as new.
    client.ingest(
        [pb.Event(user_id="toy-fan", item_id="1", event_type=pb.EVENT_TYPE_RATING, value=5.0)]
    )
    reply = client.recommend("toy-fan", k=50, diversity=0.0)
    new = [s for s in reply.items if s.item.item_id == "new-space-film"]
    assert new and new[0].reason.startswith("new in ")


def test_ingest_moves_recommendations_and_profile(client: RecommenderClient) -> None:
    user = "fresh-viewer"
    before = client.recommend(user, k=50, diversity=0.0)
    assert before.cold_start
    assert not {"ann", "co_occurrence"} & {s.source for s in before.items}  # no history yet
    events = [
        pb.Event(user_id=user, item_id=i, event_type=pb.EVENT_TYPE_RATING, value=5.0)
        for i in ("1", "2", "3")  # Toy Story, Jumanji, Grumpier Old Men
    ]
    assert client.ingest(events).accepted_count == 3
    # every candidate (k = the stack's rank_candidates): the tiny rankers are untrained, so
    # which of them make a top 5 is arbitrary; that the history brought some in is not
    reply = client.recommend(user, k=50, diversity=0.0)
    assert reply.cold_start  # three events: still cold, but now content- and segment-aware
    assert {"ann", "co_occurrence"} & {s.source for s in reply.items}
    assert not {"1", "2", "3"} & {s.item.item_id for s in reply.items}
    profile = client.profile(user)
    assert profile.history_size == 3
    assert list(profile.recent_item_ids)[:3] == ["3", "2", "1"]
    assert profile.top_interests[0].weight > 0
    assert profile.segment.startswith("seg-")  # assigned online to the nearest centroid
    more = [
        pb.Event(user_id=user, item_id=i, event_type=pb.EVENT_TYPE_CLICK)
        for i in ("4", "5", "6", "7")
    ]
    client.ingest(more)
    warm = client.recommend(user, k=5)
    assert not warm.cold_start and not warm.degraded


def test_a_profile_is_current_once_ingest_acknowledges_however_far_behind_the_workers(
    client: RecommenderClient, stack: LocalStack, store: VectorStore
) -> None:
    """With the profile worker paused (SIGSTOP: a backlog, or every worker down), the
    gateway's profile reads fold in the acknowledged events nobody applied yet: the profile,
    the seen-item filter and the history behind the candidates are current at once. Once the
    worker runs again it applies them, once."""
    user = f"paused-{time.time_ns():x}"
    worker = stack.processes["profile-worker"]
    events = [
        pb.Event(user_id=user, item_id=i, event_type=pb.EVENT_TYPE_RATING, value=5.0)
        for i in ("1", "2", "3")
    ]
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        assert client.ingest(events).accepted_count == 3  # OK: durable, not applied
        assert store.get_user(user, 5, with_vector=False) is None
        profile = client.profile(user)
        assert profile.history_size == 3
        assert set(profile.recent_item_ids) == {"1", "2", "3"}
        assert profile.top_interests and profile.top_interests[0].weight > 0
        reply = client.recommend(user, k=10)
        assert not {"1", "2", "3"} & {s.item.item_id for s in reply.items}  # seen: left out
        assert not reply.degraded
        assert {"ann", "co_occurrence"} & {s.source for s in reply.items}  # from the history
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and store.get_user(user, 5, with_vector=False) is None:
        time.sleep(0.1)
    row = store.get_user(user, 5, with_vector=False)
    assert row is not None and row["history_size"] == 3
    assert client.profile(user).history_size == 3  # applied once, not merged again


def test_ingest_rejects_bad_events(client: RecommenderClient) -> None:
    bad = [
        pb.Event(user_id="u", item_id="1"),  # no event type
        pb.Event(user_id="u", item_id="1", event_type=pb.EVENT_TYPE_RATING, value=9),
        pb.Event(user_id="u u", item_id="1", event_type=pb.EVENT_TYPE_CLICK),
    ]
    for event in bad:
        with pytest.raises(grpc.RpcError) as excinfo:
            client.ingest([event])
        assert _code(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as excinfo:
        client.ingest([])
    assert _code(excinfo) == grpc.StatusCode.INVALID_ARGUMENT


def test_delete_user_leaves_nothing_in_milvus(
    client: RecommenderClient, store: VectorStore
) -> None:
    client.ingest([pb.Event(user_id="to-forget", item_id="1", event_type=pb.EVENT_TYPE_CLICK)])
    assert store.get_user("to-forget", 5) is not None
    assert client.delete_user("to-forget").existed
    assert store.get_user("to-forget", 5) is None
    with pytest.raises(grpc.RpcError) as excinfo:
        client.profile("to-forget")
    assert _code(excinfo) == grpc.StatusCode.NOT_FOUND
    assert client.recommend("to-forget", k=3).cold_start
    assert not client.delete_user("to-forget").existed
