"""A small typed client for backend teams and the CLI: one method per RPC."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from services.api import pb, pb_grpc


class RecommenderClient:
    """Wraps a channel to the gateway; every call takes a deadline in seconds."""

    def __init__(self, target: str, timeout: float = 5.0) -> None:
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.RecommenderServiceStub(self.channel)
        self.timeout = timeout

    def __enter__(self) -> RecommenderClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def recommend(
        self,
        user_id: str,
        k: int = 10,
        categories: Sequence[str] = (),
        exclude: Sequence[str] = (),
        diversity: float | None = None,
    ) -> pb.RecommendResponse:
        request = pb.RecommendRequest(
            user_id=user_id, k=k, categories=categories, exclude_item_ids=exclude
        )
        if diversity is not None:
            request.diversity = diversity
        return self.stub.Recommend(request, timeout=self.timeout)

    def similar(self, item_id: str, k: int = 10) -> pb.SimilarItemsResponse:
        request = pb.SimilarItemsRequest(item_id=item_id, k=k)
        return self.stub.SimilarItems(request, timeout=self.timeout)

    def profile(self, user_id: str) -> pb.GetUserProfileResponse:
        request = pb.GetUserProfileRequest(user_id=user_id)
        return self.stub.GetUserProfile(request, timeout=self.timeout)

    def ingest(self, events: Sequence[pb.Event]) -> pb.IngestEventsResponse:
        return self.stub.IngestEvents(pb.IngestEventsRequest(events=events), timeout=self.timeout)

    def upsert_items(self, items: Sequence[pb.Item]) -> pb.UpsertItemsResponse:
        return self.stub.UpsertItems(pb.UpsertItemsRequest(items=items), timeout=self.timeout)

    def delete_user(self, user_id: str) -> pb.DeleteUserResponse:
        request = pb.DeleteUserRequest(user_id=user_id)
        return self.stub.DeleteUser(request, timeout=self.timeout)
