"""recsys-client: the typed gRPC client of the recommendation gateway.

    from recsys_client import RecommenderClient, Tls, pb

    tls = Tls(ca_file="ca.pem", cert_file="client.pem", key_file="client.key")
    with RecommenderClient("gateway:50051", api_key="...", tls=tls) as client:
        for scored in client.recommend("42", k=10).items:
            print(scored.item.title, scored.score)

Depends on grpcio, protobuf and the google.rpc error-detail messages only.
"""

from __future__ import annotations

from recsys_client._pb import pb, pb_grpc
from recsys_client.client import (
    DEFAULT_TIMEOUT_S,
    RecommenderClient,
    Tls,
    fill_idempotency_keys,
    new_idempotency_key,
    service_config,
)
from recsys_client.errors import (
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    RecsysError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
)

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DeadlineExceededError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "RecommenderClient",
    "RecsysError",
    "ResourceExhaustedError",
    "Tls",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "fill_idempotency_keys",
    "new_idempotency_key",
    "pb",
    "pb_grpc",
    "service_config",
]
