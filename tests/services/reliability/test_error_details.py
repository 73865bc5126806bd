"""The gateway's structured errors decode with the googleapis messages every client uses."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2

from services.reliability.error_details import DETAILS_KEY, status_trailers, with_error_info
from services.reliability.retry_info import retry_trailers


def _status(trailers: tuple[tuple[str, object], ...]) -> status_pb2.Status:
    (raw,) = [v for k, v in trailers if k == DETAILS_KEY]
    assert isinstance(raw, bytes)
    return status_pb2.Status.FromString(raw)


def _unpack(status: status_pb2.Status) -> dict[str, object]:
    out: dict[str, object] = {}
    for kind in (
        error_details_pb2.ErrorInfo,
        error_details_pb2.BadRequest,
        error_details_pb2.RetryInfo,
    ):
        for detail in status.details:
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                out[kind.DESCRIPTOR.name] = message
    return out


def test_invalid_argument_names_the_field_and_a_reason() -> None:
    code = grpc.StatusCode.INVALID_ARGUMENT
    trailers = status_trailers(code, "k out of range", "OUT_OF_RANGE", [("k", "1..200")])
    status = _status(trailers)
    assert status.code == code.value[0] and status.message == "k out of range"
    details = _unpack(status)
    info = details["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain) == ("OUT_OF_RANGE", "recsys.v1")
    bad = details["BadRequest"]
    assert isinstance(bad, error_details_pb2.BadRequest)
    assert [(v.field, v.description) for v in bad.field_violations] == [("k", "1..200")]
    assert "RetryInfo" not in details


def test_retry_hint_rides_along_and_every_code_has_a_default_reason() -> None:
    code = grpc.StatusCode.UNAVAILABLE
    trailers = status_trailers(code, "event log unavailable", retry_delay_s=0.25)
    assert ("retry-after-ms", "250") in trailers
    details = _unpack(_status(trailers))
    assert details["ErrorInfo"].reason == "UNAVAILABLE"  # type: ignore[attr-defined]
    assert details["RetryInfo"].retry_delay.ToMilliseconds() == 250  # type: ignore[attr-defined]


def test_error_info_joins_an_existing_retry_status() -> None:
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    trailers = with_error_info(
        retry_trailers(code.value[0], "busy", 0.5), code, "busy", "OVERLOADED"
    )
    assert [k for k, _ in trailers].count(DETAILS_KEY) == 1
    assert ("retry-after-ms", "500") in trailers
    details = _unpack(_status(trailers))
    assert details["ErrorInfo"].reason == "OVERLOADED"  # type: ignore[attr-defined]
    assert details["RetryInfo"].retry_delay.ToMilliseconds() == 500  # type: ignore[attr-defined]
