"""Structured errors: a ``google.rpc.Status`` with ``ErrorInfo`` and ``BadRequest`` details.

Every error the gateway sends carries, in the ``grpc-status-details-bin`` trailer that gRPC
clients of every language decode, an ``ErrorInfo`` whose ``reason`` is a stable UPPER_SNAKE
code in the ``recsys.v1`` domain (what code should branch on; the message is for people),
and for ``INVALID_ARGUMENT`` a ``BadRequest`` naming the offending field. The messages come
from the one private ``google.rpc`` pool of :mod:`services.reliability.rpc_status` (shared
with :mod:`services.reliability.retry_info`), so the gateway image needs no googleapis
package.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

import grpc

from services.reliability.retry_info import PUSHBACK_KEY, RETRY_AFTER_KEY
from services.reliability.rpc_status import DETAILS_KEY, BadRequest, ErrorInfo, RetryInfo, Status

DOMAIN = "recsys.v1"

# Reasons for the codes no specific reason is given for (one per status code).
DEFAULT_REASONS = {
    grpc.StatusCode.INVALID_ARGUMENT: "INVALID_ARGUMENT",
    grpc.StatusCode.NOT_FOUND: "NOT_FOUND",
    grpc.StatusCode.DEADLINE_EXCEEDED: "DEADLINE_EXCEEDED",
    grpc.StatusCode.UNAVAILABLE: "UNAVAILABLE",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "RESOURCE_EXHAUSTED",
    grpc.StatusCode.UNAUTHENTICATED: "UNAUTHENTICATED",
    grpc.StatusCode.PERMISSION_DENIED: "PERMISSION_DENIED",
    grpc.StatusCode.INTERNAL: "INTERNAL_ERROR",
}


def status_trailers(
    code: grpc.StatusCode,
    message: str,
    reason: str | None = None,
    violations: Sequence[tuple[str, str]] = (),
    retry_delay_s: float | None = None,
    metadata: dict[str, str] | None = None,
) -> tuple[tuple[str, Any], ...]:
    """The trailers of an error: the rich status (``ErrorInfo``; ``BadRequest`` for field
    ``violations``; ``RetryInfo`` with the ``retry-after-ms`` and gRPC pushback trailers
    when a retry delay is hinted)."""
    status = Status(code=code.value[0], message=message)
    info = ErrorInfo(reason=reason or DEFAULT_REASONS.get(code, code.name), domain=DOMAIN)
    info.metadata.update(metadata or {})
    status.details.add().Pack(info)
    if violations:
        bad = BadRequest()
        for name, description in violations:
            bad.field_violations.add(field=name, description=description)
        status.details.add().Pack(bad)
    trailers: tuple[tuple[str, Any], ...] = ()
    if retry_delay_s is not None:
        millis = max(1, math.ceil(retry_delay_s * 1000))
        retry = RetryInfo()
        retry.retry_delay.FromMilliseconds(millis)
        status.details.add().Pack(retry)
        trailers = ((RETRY_AFTER_KEY, str(millis)), (PUSHBACK_KEY, str(millis)))
    return (*trailers, (DETAILS_KEY, status.SerializeToString()))


def with_error_info(
    trailing: Sequence[tuple[str, Any]],
    code: grpc.StatusCode,
    message: str,
    reason: str | None = None,
) -> tuple[tuple[str, Any], ...]:
    """``trailing`` with an ``ErrorInfo`` in its rich status (added to the status already
    there, e.g. one with a ``RetryInfo``, else a new one)."""
    status = Status(code=code.value[0], message=message)
    rest = []
    for key, value in trailing:
        if key == DETAILS_KEY:
            status.ParseFromString(value)
        else:
            rest.append((key, value))
    info = ErrorInfo(reason=reason or DEFAULT_REASONS.get(code, code.name), domain=DOMAIN)
    status.details.add().Pack(info)
    return (*rest, (DETAILS_KEY, status.SerializeToString()))


def abort_with_details(
    context: grpc.ServicerContext,
    code: grpc.StatusCode,
    message: str,
    reason: str | None = None,
    violations: Sequence[tuple[str, str]] = (),
    retry_delay_s: float | None = None,
) -> NoReturn:
    """End the call with ``code`` and its structured details (:func:`status_trailers`)."""
    context.set_trailing_metadata(status_trailers(code, message, reason, violations, retry_delay_s))
    context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises")


class UnknownMethod(grpc.GenericRpcHandler):
    """Answers a method no service of the server has: ``UNIMPLEMENTED`` with an ``ErrorInfo``
    (reason ``METHOD_UNKNOWN``, the method in its metadata), which gRPC core's own answer to
    an unknown method lacks. Register it after every service: generic handlers are asked in
    the order they were added, so it only sees the calls nothing else claimed. One
    stream-stream handler serves every call shape (it never reads the request)."""

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = str(handler_call_details.method)[:200]

        def reject(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
            message = (
                f"unknown method {method!r}: this server has recsys.v1.RecommenderService, "
                "grpc.health.v1.Health and server reflection"
            )
            code = grpc.StatusCode.UNIMPLEMENTED
            metadata = {"method": method}
            context.set_trailing_metadata(
                status_trailers(code, message, "METHOD_UNKNOWN", metadata=metadata)
            )
            context.abort(code, message)
            yield b""  # unreachable: a generator, so gRPC runs it as a response stream

        return grpc.stream_stream_rpc_method_handler(reject)
