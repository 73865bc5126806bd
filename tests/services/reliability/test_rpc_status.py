"""One private ``google.rpc`` pool for the status and every detail the gateway sends."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2

from services.reliability import error_details, retry_info, rpc_status
from services.reliability.error_details import DETAILS_KEY, status_trailers


def test_status_and_details_come_from_one_private_pool() -> None:
    classes = (
        retry_info.Status,
        retry_info.RetryInfo,
        error_details.ErrorInfo,
        error_details.BadRequest,
    )
    files = {c.DESCRIPTOR.file.name for c in classes}
    assert files == {"recsys/google_rpc.proto"}
    assert all(c.DESCRIPTOR.file.pool is rpc_status.POOL for c in classes)
    assert rpc_status.POOL is not status_pb2.DESCRIPTOR.pool  # googleapis' stay untouched


def test_googleapis_decodes_what_the_pool_encodes() -> None:
    trailers = dict(
        status_trailers(
            grpc.StatusCode.INVALID_ARGUMENT, "bad k", "OUT_OF_RANGE", [("k", "1..200")], 0.5
        )
    )
    status = status_pb2.Status.FromString(trailers[DETAILS_KEY])
    info, bad, retry = (
        error_details_pb2.ErrorInfo(),
        error_details_pb2.BadRequest(),
        error_details_pb2.RetryInfo(),
    )
    assert [d.Unpack(m) for d, m in zip(status.details, (info, bad, retry), strict=True)] == [
        True
    ] * 3
    assert (info.reason, info.domain) == ("OUT_OF_RANGE", "recsys.v1")
    assert bad.field_violations[0].field == "k" and retry.retry_delay.ToMilliseconds() == 500
