"""Structured errors: a ``google.rpc.Status`` with ``ErrorInfo`` and ``BadRequest`` details.

Every error the gateway sends carries, in the ``grpc-status-details-bin`` trailer that gRPC
clients of every language decode, an ``ErrorInfo`` whose ``reason`` is a stable UPPER_SNAKE
code in the ``recsys.v1`` domain (what code should branch on; the message is for people),
and for ``INVALID_ARGUMENT`` a ``BadRequest`` naming the offending field. Like
:mod:`services.reliability.retry_info`, the two messages are declared in a private
descriptor pool, wire-identical to the googleapis definitions, so the gateway image needs no
googleapis package.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NoReturn

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from services.reliability.retry_info import (
    DETAILS_KEY,
    PUSHBACK_KEY,
    RETRY_AFTER_KEY,
    RetryInfo,
    Status,
)

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


def _classes() -> tuple[Any, Any]:
    field = descriptor_pb2.FieldDescriptorProto
    string, optional, repeated = field.TYPE_STRING, field.LABEL_OPTIONAL, field.LABEL_REPEATED
    proto = descriptor_pb2.FileDescriptorProto(
        name="recsys/google_rpc_error_details.proto", package="google.rpc", syntax="proto3"
    )
    info = proto.message_type.add(name="ErrorInfo")
    info.field.add(name="reason", number=1, type=string, label=optional)
    info.field.add(name="domain", number=2, type=string, label=optional)
    entry = info.nested_type.add(name="MetadataEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=string, label=optional)
    entry.field.add(name="value", number=2, type=string, label=optional)
    info.field.add(
        name="metadata",
        number=3,
        type=field.TYPE_MESSAGE,
        label=repeated,
        type_name=".google.rpc.ErrorInfo.MetadataEntry",
    )
    bad = proto.message_type.add(name="BadRequest")
    violation = bad.nested_type.add(name="FieldViolation")
    violation.field.add(name="field", number=1, type=string, label=optional)
    violation.field.add(name="description", number=2, type=string, label=optional)
    bad.field.add(
        name="field_violations",
        number=1,
        type=field.TYPE_MESSAGE,
        label=repeated,
        type_name=".google.rpc.BadRequest.FieldViolation",
    )
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(proto.SerializeToString())
    return (
        message_factory.GetMessageClass(pool.FindMessageTypeByName("google.rpc.ErrorInfo")),
        message_factory.GetMessageClass(pool.FindMessageTypeByName("google.rpc.BadRequest")),
    )


ErrorInfo, BadRequest = _classes()


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
