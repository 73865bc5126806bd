"""Property-based fuzzing of every RPC against the real gateway (tritonserver + Milvus Lite).

Every generated request must be answered, within its deadline, with one of the documented
codes - OK, INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED (limits, message size) or
DEADLINE_EXCEEDED - never INTERNAL, UNKNOWN or a hang. ``RECSYS_FUZZ_EXAMPLES`` is the total
number of requests over all targets (default 210 for ``make test``; ``make fuzz`` runs 10,500).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings

from ops.reliability_report import Scenario, record
from ops.stack import LocalStack
from services.api import pb, pb_grpc
from services.api.validation import max_receive_bytes
from tests.services.gateway import fuzz_strategies as s

pytestmark = [pytest.mark.integration, pytest.mark.fuzz]

TOTAL = int(os.environ.get("RECSYS_FUZZ_EXAMPLES", "210"))
TARGETS = 11
PER_TARGET = max(10, TOTAL // TARGETS)
CALL_TIMEOUT_S = 10.0
DOCUMENTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
FUZZ = settings(
    max_examples=PER_TARGET,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
SENT: Counter[str] = Counter()
FAILED: set[str] = set()  # targets that found a defect (they stop early)


@pytest.fixture(scope="module")
def stub(scratch_stack: LocalStack) -> Iterator[pb_grpc.RecommenderServiceStub]:
    options = [("grpc.max_send_message_length", 64 * 1024 * 1024)]
    with grpc.insecure_channel(scratch_stack.gateway_target, options=options) as channel:
        yield pb_grpc.RecommenderServiceStub(channel)


def check(method: str, call: Callable[..., Any], request: Any) -> None:
    """Send one request; the answer must come in time, with a documented code."""
    started = time.monotonic()
    try:
        call(request, timeout=CALL_TIMEOUT_S)
        code, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details()
    elapsed = time.monotonic() - started
    SENT[code.name] += 1
    try:
        assert code in DOCUMENTED, f"{method} answered {code.name}: {details}"
        assert elapsed < CALL_TIMEOUT_S + 2, f"{method} took {elapsed:.1f}s"
        if code != grpc.StatusCode.OK:
            assert details, f"{method} {code.name} without a message"
    except AssertionError:
        FAILED.add(method)
        raise


@FUZZ
@given(request=s.recommend())
def test_recommend(stub: pb_grpc.RecommenderServiceStub, request: pb.RecommendRequest) -> None:
    check("Recommend", stub.Recommend, request)


@FUZZ
@given(request=s.similar)
def test_similar_items(stub: pb_grpc.RecommenderServiceStub, request: Any) -> None:
    check("SimilarItems", stub.SimilarItems, request)


@FUZZ
@given(request=s.profile)
def test_get_user_profile(stub: pb_grpc.RecommenderServiceStub, request: Any) -> None:
    check("GetUserProfile", stub.GetUserProfile, request)


@FUZZ
@given(request=s.ingest)
def test_ingest_events(stub: pb_grpc.RecommenderServiceStub, request: Any) -> None:
    check("IngestEvents", stub.IngestEvents, request)


@FUZZ
@given(messages=s.stream)
def test_stream_ingest_events(stub: pb_grpc.RecommenderServiceStub, messages: list[Any]) -> None:
    check(
        "StreamIngestEvents",
        lambda m, timeout: stub.StreamIngestEvents(iter(m), timeout=timeout),
        messages,
    )


@FUZZ
@given(request=s.upsert)
def test_upsert_items(stub: pb_grpc.RecommenderServiceStub, request: Any) -> None:
    check("UpsertItems", stub.UpsertItems, request)


@FUZZ
@given(request=s.delete)
def test_delete_user(stub: pb_grpc.RecommenderServiceStub, request: Any) -> None:
    check("DeleteUser", stub.DeleteUser, request)


@FUZZ
@given(request=s.get_item)
def test_get_item(stub: pb_grpc.RecommenderServiceStub, request: Any) -> None:
    check("GetItem", stub.GetItem, request)


@FUZZ
@given(request=s.list_items)
def test_list_items(stub: pb_grpc.RecommenderServiceStub, request: Any) -> None:
    check("ListItems", stub.ListItems, request)


@FUZZ
@given(request=s.delete_item)
def test_delete_item(stub: pb_grpc.RecommenderServiceStub, request: Any) -> None:
    check("DeleteItem", stub.DeleteItem, request)


@FUZZ
@given(request=s.rank())
def test_rank_items(stub: pb_grpc.RecommenderServiceStub, request: Any) -> None:
    check("RankItems", stub.RankItems, request)


def test_oversized_messages_are_refused(
    stub: pb_grpc.RecommenderServiceStub, scratch_stack: LocalStack
) -> None:
    """Over the receive limit: gRPC core's RESOURCE_EXHAUSTED; under it (5 MiB, over gRPC's
    default 4 MiB): decoded and refused by validation."""
    limit = max_receive_bytes(scratch_stack.settings)
    request = pb.RecommendRequest(user_id="x" * (limit + 1))
    with pytest.raises(grpc.RpcError) as err:
        stub.Recommend(request, timeout=CALL_TIMEOUT_S)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    SENT["RESOURCE_EXHAUSTED"] += 1
    check("Recommend", stub.Recommend, pb.RecommendRequest(user_id="x" * (5 * 1024 * 1024)))


def test_invalid_timestamp_nanos_are_invalid_argument(
    stub: pb_grpc.RecommenderServiceStub,
) -> None:
    """Found by this fuzzer: a Timestamp with nanos outside [0, 1e9) was INTERNAL."""
    event = pb.Event(user_id="1", item_id="1", event_type=pb.EVENT_TYPE_VIEW)
    event.event_time.nanos = -1
    check("IngestEvents", stub.IngestEvents, pb.IngestEventsRequest(events=[event]))


def test_long_item_description_is_not_unavailable(stub: pb_grpc.RecommenderServiceStub) -> None:
    """Found by this fuzzer: a valid 9,990-character description (limit 10,000) overflowed
    Milvus' 2,048-character ``text`` field and came back UNAVAILABLE."""
    item = pb.Item(item_id="fz-long", title="Long", description="0" * 9_990)
    check("UpsertItems", stub.UpsertItems, pb.UpsertItemsRequest(items=[item]))


def test_summary(stub: pb_grpc.RecommenderServiceStub) -> None:
    """Runs last: every target ran its examples; prints answers by code."""
    total = sum(SENT.values())
    print(f"\nfuzz: {total} requests, by code: {dict(SENT.most_common())}")
    record(Scenario("fuzzed requests (all RPCs)", requests=total, codes=SENT))
    if SENT and not FAILED:
        assert total >= TARGETS * PER_TARGET
