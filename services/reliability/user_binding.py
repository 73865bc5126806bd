"""Per-user authorization: an API key bound to a user may only name that user.

A key entry with ``"user": "<id>"`` (see :mod:`services.reliability.auth`) is meant for a
caller that acts for one end user (an app install, a user's own export). Its calls that name
a user - ``Recommend``, ``RankItems``, ``GetUserProfile``, ``DeleteUser``, and every
event of ``IngestEvents`` / ``StreamIngestEvents`` - must name the bound user, else
``PERMISSION_DENIED``; calls that name no user (``SimilarItems``) are left to the key's
scopes. Keys without a user are unaffected. The check needs the request, so unlike the other
guards it wraps the handler's behaviour itself; it runs inside the auth guard, which has set
:func:`~services.reliability.auth.current_principal`. Set no ``user`` on a key to turn it off.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc

from services.reliability.auth import current_principal
from services.reliability.guard import Continuation, abort, exempt

_SERVICE = "/recsys.v1.RecommenderService/"
USER_METHODS = frozenset(
    _SERVICE + m for m in ("Recommend", "RankItems", "GetUserProfile", "DeleteUser", "IngestEvents")
)
STREAM_METHOD = _SERVICE + "StreamIngestEvents"
DENIED = "this API key is bound to one user and may not act for another"


def _named_users(request: Any) -> Iterator[str]:
    if hasattr(request, "events"):
        for event in request.events:
            yield event.user_id
    else:
        yield request.user_id


def _allowed(request: Any) -> bool:
    principal = current_principal()
    bound = principal.user if principal is not None else None
    return bound is None or all(user == bound for user in _named_users(request))


class UserBindingInterceptor(grpc.ServerInterceptor):
    """Rejects a user-bound key's requests that name another user."""

    def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or exempt(method):
            return handler
        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if method in USER_METHODS and handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(_unary(handler.unary_unary), **kwargs)
        if method == STREAM_METHOD and handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(_stream(handler.stream_unary), **kwargs)
        return handler


def _unary(behavior: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
    def run(request: Any, context: grpc.ServicerContext) -> Any:
        if not _allowed(request):
            abort(context, grpc.StatusCode.PERMISSION_DENIED, DENIED, reason="USER_MISMATCH")
        return behavior(request, context)

    return run


def _stream(behavior: Callable[[Iterable[Any], grpc.ServicerContext], Any]) -> Callable[..., Any]:
    """A message naming another user ends the stream the servicer sees (it is never
    ingested; earlier messages are) and the call answers PERMISSION_DENIED, not a reply."""

    def run(requests: Iterable[Any], context: grpc.ServicerContext) -> Any:
        denied = False

        def checked() -> Iterator[Any]:
            nonlocal denied
            for request in requests:
                if not _allowed(request):
                    denied = True
                    return
                yield request

        reply = behavior(checked(), context)
        if denied:
            abort(context, grpc.StatusCode.PERMISSION_DENIED, DENIED, reason="USER_MISMATCH")
        return reply

    return run
