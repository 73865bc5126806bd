"""Calls whose client set no deadline: gRPC Python reports ~9.2e18 s remaining for them, which
the gateway must treat as "use the default", not as a timeout to pass on to Milvus/Triton."""

from __future__ import annotations

import uuid

import grpc
import pytest

from ops.stack import LocalStack
from services.api import pb, pb_grpc

pytestmark = pytest.mark.integration

WATCHDOG_S = 60  # the test's own patience: a wait on the future, not a gRPC deadline


def test_recommend_and_ingest_without_a_deadline(stack: LocalStack) -> None:
    with grpc.insecure_channel(stack.gateway_target) as channel:
        stub = pb_grpc.RecommenderServiceStub(channel)
        # A warm-up with a deadline, so the no-deadline call below is not the first one the
        # gateway serves (its default deadline is short on a loaded CI machine).
        stub.Recommend(pb.RecommendRequest(user_id="1", k=10), timeout=30)

        reply = stub.Recommend.future(pb.RecommendRequest(user_id="1", k=10)).result(WATCHDOG_S)
        assert not reply.degraded, reply.degraded_reason
        assert not reply.cold_start and len(reply.items) == 10

        user = f"no-deadline-{uuid.uuid4().hex[:8]}"
        event = pb.Event(
            user_id=user, item_id="1", event_type=pb.EVENT_TYPE_CLICK, idempotency_key=user
        )
        ingest = stub.IngestEvents.future(pb.IngestEventsRequest(events=[event]))
        first = ingest.result(WATCHDOG_S)
        assert (first.accepted_count, first.duplicate_count) == (1, 0)
        again = stub.IngestEvents.future(pb.IngestEventsRequest(events=[event])).result(WATCHDOG_S)
        assert (again.accepted_count, again.duplicate_count) == (0, 1)
        profile = stub.GetUserProfile.future(pb.GetUserProfileRequest(user_id=user)).result(
            WATCHDOG_S
        )
        assert profile.history_size == 1 and list(profile.recent_item_ids) == ["1"]
