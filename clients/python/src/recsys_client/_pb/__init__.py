"""Generated stubs of ``recsys.v1`` (``generate_stubs.py``; never edited by hand)."""

from __future__ import annotations

try:
    from recsys_client._pb import recommender_pb2 as pb
    from recsys_client._pb import recommender_pb2_grpc as pb_grpc
except ImportError as exc:  # pragma: no cover - only before the first generation
    raise ImportError(
        "recsys_client stubs are missing: run `make client-proto` "
        "(python clients/python/generate_stubs.py) before installing the client"
    ) from exc

__all__ = ["pb", "pb_grpc"]
