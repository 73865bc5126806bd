"""What a client may read of a server-side failure: which part failed, never how or where.

Exception text of the dependencies carries internal addresses (``Milvus at http://10.0.3.7``),
hostnames and library internals; it belongs in the gateway's log, not in a status message or
a degraded reason that reaches every caller. :func:`public_unavailable` names the component
behind an ``UNAVAILABLE``; :func:`public_degraded` keeps the ``<component> unavailable``
head of each degraded reason (the pipeline writes ``"<what>: <detail>"``) and drops the rest.
"""

from __future__ import annotations

from collections.abc import Iterable

# Exception class name -> what the client is told; anything else gets the generic text.
COMPONENTS = {
    "StoreUnavailable": "vector store unavailable",
    "StoreSchemaError": "vector store unavailable",
    "InferenceUnavailable": "model server unavailable",
    "WalError": "event log unavailable",
    "EventLogUnavailable": "event log unavailable",
}
GENERIC = "a dependency is unavailable"
RETRY = "; retry with backoff"


def public_unavailable(exc: BaseException) -> str:
    """The client-visible message of an ``UNAVAILABLE`` caused by ``exc``."""
    for cls in type(exc).__mro__:
        if cls.__name__ in COMPONENTS:
            return COMPONENTS[cls.__name__] + RETRY
    return GENERIC + RETRY


def public_degraded(reasons: Iterable[str]) -> str:
    """Degraded reasons without their detail, each once, joined with ``; ``."""
    heads = (reason.split(":", 1)[0].strip() for reason in reasons)
    return "; ".join(dict.fromkeys(h for h in heads if h))
