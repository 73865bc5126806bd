"""The base of the reliability interceptors: a check that runs around each call's handler.

gRPC Python runs ``intercept_service`` on the server's polling thread, not on the worker
thread that executes the call; a check done there could neither block (a queue wait) nor
hand state to the handler. :class:`GuardInterceptor` therefore wraps the handler's behaviour
so that :meth:`GuardInterceptor.guard` - a context manager - runs on the worker thread,
around the servicer method (for streamed responses: until the stream ends). Guards nest in
the order the interceptors are given to ``grpc.server``, first = outermost, so a context
variable set by an outer guard (the authenticated client) is visible to the inner ones and
to the servicer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import grpc

from services.reliability.error_details import with_error_info

EXEMPT_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

Continuation = Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None]


def exempt(method: str) -> bool:
    """Health and reflection: never authenticated, limited or queued."""
    return method.startswith(EXEMPT_PREFIXES)


def metadata_value(context: grpc.ServicerContext, key: str) -> str | None:
    """The first value of an (ASCII) invocation-metadata key, or None."""
    for item in context.invocation_metadata() or ():
        if item.key == key:
            value = item.value
            return value.decode("latin-1") if isinstance(value, bytes) else str(value)
    return None


def abort(
    context: grpc.ServicerContext,
    code: grpc.StatusCode,
    message: str,
    trailing: tuple[tuple[str, Any], ...] = (),
    reason: str | None = None,
) -> NoReturn:
    """End the call with ``code``; ``trailing`` metadata (e.g. ``retry-after-ms``) goes along,
    and an ``ErrorInfo`` with ``reason`` (else the code's default) in the rich status."""
    context.set_trailing_metadata(with_error_info(trailing, code, message, reason))
    context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises")


class GuardInterceptor(grpc.ServerInterceptor):
    """An interceptor whose :meth:`guard` runs on the worker thread around each call."""

    def applies(self, method: str) -> bool:
        return not exempt(method)

    def guard(
        self, method: str, context: grpc.ServicerContext
    ) -> contextlib.AbstractContextManager[None]:
        """Admit the call (return a context manager) or reject it with ``context.abort``."""
        raise NotImplementedError

    def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not self.applies(method):
            return handler
        return _wrap(handler, lambda context: self.guard(method, context))


def _wrap(
    handler: grpc.RpcMethodHandler,
    guard: Callable[[grpc.ServicerContext], contextlib.AbstractContextManager[None]],
) -> grpc.RpcMethodHandler:
    def unary_response(behavior: Callable[..., Any]) -> Callable[..., Any]:
        def run(request: Any, context: grpc.ServicerContext) -> Any:
            with guard(context):
                return behavior(request, context)

        return run

    def stream_response(behavior: Callable[..., Any]) -> Callable[..., Any]:
        def run(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            with guard(context):
                yield from behavior(request, context)

        return run

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary_response(handler.unary_unary), **kwargs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary_response(handler.stream_unary), **kwargs)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(stream_response(handler.unary_stream), **kwargs)
    return grpc.stream_stream_rpc_method_handler(stream_response(handler.stream_stream), **kwargs)
