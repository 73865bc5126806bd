"""Typed errors: one class per status code a caller handles, with the decoded error details.

The gateway sends a ``google.rpc.Status`` in the ``grpc-status-details-bin`` trailer (the
rich error model every gRPC language reads); its details (``RetryInfo``, ``ErrorInfo``,
``BadRequest``, ...) are unpacked here. Every error is still a :class:`grpc.RpcError` with
``code()`` and ``details()``, so code written against plain gRPC keeps working.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf import any_pb2, message
from google.rpc import error_details_pb2, status_pb2

DETAILS_KEY = "grpc-status-details-bin"
RETRY_AFTER_KEY = "retry-after-ms"
_DETAIL_TYPES: tuple[type[message.Message], ...] = (
    error_details_pb2.RetryInfo,
    error_details_pb2.ErrorInfo,
    error_details_pb2.BadRequest,
    error_details_pb2.QuotaFailure,
    error_details_pb2.PreconditionFailure,
    error_details_pb2.ResourceInfo,
    error_details_pb2.DebugInfo,
    error_details_pb2.Help,
    error_details_pb2.LocalizedMessage,
)


class RecsysError(grpc.RpcError):
    """A failed call: its status code, message, trailers and decoded error details."""

    retryable = False

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        details: Sequence[message.Message] = (),
        trailing_metadata: Sequence[tuple[str, Any]] = (),
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self._code = code
        self.message = message
        self.error_details = tuple(details)
        self._trailing = tuple(trailing_metadata)

    # the grpc.Call surface, so `except grpc.RpcError as e: e.code()` keeps working
    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self.message

    def trailing_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self._trailing

    def _detail(self, kind: type[Any]) -> Any:
        return next((d for d in self.error_details if isinstance(d, kind)), None)

    @property
    def retry_delay(self) -> float | None:
        """Seconds the server asked the caller to wait (``RetryInfo``), if it said."""
        info = self._detail(error_details_pb2.RetryInfo)
        if info is not None and info.HasField("retry_delay"):
            return float(info.retry_delay.ToMilliseconds()) / 1000.0
        for key, value in self._trailing:
            if key == RETRY_AFTER_KEY:
                return int(value) / 1000.0
        return None

    @property
    def reason(self) -> str | None:
        """The machine-readable ``ErrorInfo.reason``, if the server sent one."""
        info = self._detail(error_details_pb2.ErrorInfo)
        return info.reason if info is not None else None

    @property
    def domain(self) -> str | None:
        """The ``ErrorInfo.domain`` of :attr:`reason` (``recsys.v1`` for the gateway's)."""
        info = self._detail(error_details_pb2.ErrorInfo)
        return info.domain if info is not None else None

    @property
    def error_metadata(self) -> dict[str, str]:
        """The ``ErrorInfo.metadata`` (empty when none was sent)."""
        info = self._detail(error_details_pb2.ErrorInfo)
        return dict(info.metadata) if info is not None else {}

    @property
    def field_violations(self) -> list[tuple[str, str]]:
        """``BadRequest`` field violations as (field, description) pairs."""
        bad = self._detail(error_details_pb2.BadRequest)
        return [(v.field, v.description) for v in bad.field_violations] if bad else []


class InvalidArgumentError(RecsysError):
    """The request is wrong (INVALID_ARGUMENT); see :attr:`field_violations`."""


class NotFoundError(RecsysError):
    """The user or item does not exist (NOT_FOUND)."""


class UnauthenticatedError(RecsysError):
    """No or an unknown API key (UNAUTHENTICATED)."""


class PermissionDeniedError(RecsysError):
    """The key lacks the method's scope, or is bound to another user (PERMISSION_DENIED)."""


class ResourceExhaustedError(RecsysError):
    """Rate limited or shed (RESOURCE_EXHAUSTED); wait :attr:`retry_delay`, then retry."""

    retryable = True


class UnavailableError(RecsysError):
    """The gateway or a dependency is down (UNAVAILABLE); retry with backoff."""

    retryable = True


class DeadlineExceededError(RecsysError):
    """The call's deadline passed (DEADLINE_EXCEEDED)."""


class InternalError(RecsysError):
    """A server fault (INTERNAL, UNKNOWN, DATA_LOSS)."""


class UnimplementedError(RecsysError):
    """The gateway has no such method (UNIMPLEMENTED, reason ``METHOD_UNKNOWN``): an older
    gateway than this client, or a wrong target."""


_BY_CODE: dict[grpc.StatusCode, type[RecsysError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.UNKNOWN: InternalError,
    grpc.StatusCode.DATA_LOSS: InternalError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
}


def _unpack(detail: any_pb2.Any) -> message.Message:
    for kind in _DETAIL_TYPES:
        if detail.Is(kind.DESCRIPTOR):
            out = kind()
            detail.Unpack(out)
            return out
    return detail  # an unknown detail stays an Any


def decode_details(trailing_metadata: Sequence[tuple[str, Any]]) -> list[message.Message]:
    """The details of a ``grpc-status-details-bin`` trailer (empty when absent or garbled)."""
    for key, value in trailing_metadata:
        if key == DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status()
            try:
                status.ParseFromString(value)
            except message.DecodeError:
                return []
            return [_unpack(d) for d in status.details]
    return []


def from_rpc_error(err: grpc.RpcError) -> RecsysError:
    """The typed error for a failed call (``err`` is a ``grpc.Call`` as raised by stubs)."""
    if isinstance(err, RecsysError):
        return err
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    message_text = (err.details() if hasattr(err, "details") else None) or str(err)
    trailing = tuple(err.trailing_metadata() or ()) if hasattr(err, "trailing_metadata") else ()
    cls = _BY_CODE.get(code, RecsysError)
    return cls(code, message_text, decode_details(trailing), trailing)
