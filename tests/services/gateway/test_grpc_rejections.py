"""The rejections gRPC itself would answer without details: an unknown method (answered by
us, UNIMPLEMENTED with ErrorInfo METHOD_UNKNOWN) and a message over the receive limit (a list
too long is left to validation: INVALID_ARGUMENT with a BadRequest; only a message over the
limit, far beyond any valid request, is still gRPC core's RESOURCE_EXHAUSTED)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from recsys_client import InvalidArgumentError, RecommenderClient

from core.config import Settings
from ops.stack import LocalStack
from services.api import pb
from services.api.validation import MAX_DESCRIPTION_BYTES, max_receive_bytes
from services.gateway.metrics import MetricsInterceptor
from services.reliability import interceptors
from services.reliability.error_details import DETAILS_KEY, UnknownMethod


def _error_info(err: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo in a failed call's rich status, None when the call carried none."""
    for key, value in err.trailing_metadata() or ():  # type: ignore[attr-defined]
        if key == DETAILS_KEY:
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info
    return None


@pytest.fixture()
def bare_server() -> Iterator[str]:
    """Health and the catch-all behind the gateway's own interceptors (auth off)."""
    settings = Settings()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        interceptors=[MetricsInterceptor(), *interceptors(settings)],
    )
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    server.add_generic_rpc_handlers((UnknownMethod(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0).wait()


def _assert_unknown(channel: grpc.Channel, method: str, streaming: bool) -> None:
    with pytest.raises(grpc.RpcError) as excinfo:
        if streaming:
            list(channel.stream_stream(method)(iter([b"", b"x"]), timeout=5))
        else:
            channel.unary_unary(method)(b"", timeout=5)
    err = excinfo.value
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]
    info = _error_info(err)
    assert info is not None and (info.reason, info.domain) == ("METHOD_UNKNOWN", "recsys.v1")
    assert info.metadata["method"] == method


def test_unknown_methods_get_an_error_info_and_known_ones_still_work(bare_server: str) -> None:
    with grpc.insecure_channel(bare_server) as channel:
        _assert_unknown(channel, "/recsys.v1.RecommenderService/NoSuchMethod", streaming=False)
        _assert_unknown(channel, "/some.other.Service/Chat", streaming=True)
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        # what is still gRPC core's (README): a body that is not the method's message
        with pytest.raises(grpc.RpcError) as garbled:
            channel.unary_unary("/grpc.health.v1.Health/Check")(b"\xff\xff\xff", timeout=5)
        assert garbled.value.code() == grpc.StatusCode.INTERNAL  # type: ignore[attr-defined]
        assert _error_info(garbled.value) is None


def test_the_receive_limit_is_above_every_valid_request() -> None:
    settings = Settings()
    upsert = pb.UpsertItemsRequest(
        items=[
            pb.Item(
                item_id="i" * 128,
                title="t" * 512,
                categories=["c" * 64] * 32,
                description="d" * MAX_DESCRIPTION_BYTES,
            )
        ]
        * settings.max_items_per_call
    )
    ingest = pb.IngestEventsRequest(
        events=[
            pb.Event(
                user_id="u" * 128,
                item_id="i" * 128,
                event_type=pb.EVENT_TYPE_RATING,
                value=4.5,
                idempotency_key="k" * 128,
                recommendation_id="r" * 128,
                session_id="",
            )
        ]
        * settings.max_events_per_call
    )
    limit = max_receive_bytes(settings)
    largest = max(upsert.ByteSize(), ingest.ByteSize())
    assert upsert.ByteSize() > 4 * 1024 * 1024  # gRPC's default refused a valid upsert
    assert 2 * largest <= limit


@pytest.mark.integration
def test_the_gateway_answers_unknown_methods_and_long_lists_itself(
    stack: LocalStack, client: RecommenderClient
) -> None:
    with grpc.insecure_channel(stack.gateway_target) as channel:
        _assert_unknown(channel, "/recsys.v1.RecommenderService/Recommend2", streaming=False)
    # 501 items of 9 kB: over gRPC's default 4 MiB, under the gateway's limit, so the
    # answer is validation's (the items are never written)
    many = [pb.Item(item_id=f"too-many-{i}", title="x", description="d" * 9000) for i in range(501)]
    with pytest.raises(InvalidArgumentError) as excinfo:
        client.upsert_items(many)
    assert excinfo.value.reason == "TOO_MANY_ENTRIES"
    assert [f for f, _ in excinfo.value.field_violations] == ["items"]
    # a message over the limit is still refused by gRPC core, without details
    limit = max_receive_bytes(stack.settings)
    huge = [pb.Item(item_id="huge", title="x", description="d" * (limit + 1))]
    with grpc.insecure_channel(stack.gateway_target) as channel:
        stub = channel.unary_unary(
            "/recsys.v1.RecommenderService/UpsertItems",
            request_serializer=pb.UpsertItemsRequest.SerializeToString,
            response_deserializer=pb.UpsertItemsResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as core:
            stub(pb.UpsertItemsRequest(items=huge), timeout=20)
    assert core.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    assert _error_info(core.value) is None
