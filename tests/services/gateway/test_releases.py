"""A release that leaves a model out, on a real tritonserver: release 1 has a feature ranker
and a sequence model, release 2 (the catalogue chose to serve neither) has the towers only.
Triton keeps release 1 loaded for rollback, so both of its models still answer for "latest";
the gateway must serve release 2 without them, and an arm pinned to release 1 with them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from core.config import Settings
from ops.stack import local_stack
from services.gateway.state import GatewayState
from services.inference.triton_client import TritonClient
from services.recommend.rank import Rankers, RankerStatus
from tests.stack_fixtures import repository_sources

pytestmark = pytest.mark.integration

UP = RankerStatus(deployed=True, ready=True)


@pytest.fixture(scope="module")
def triton(
    tmp_path_factory: pytest.TempPathFactory, tiny_feature_ranker: str, tiny_sequence_model: str
) -> Iterator[TritonClient]:
    from training.export.__main__ import export_release
    from training.pretrained import make_tiny_bert

    root = tmp_path_factory.mktemp("releases")
    repo = repository_sources(root / "repo")
    bert = make_tiny_bert(root / "bert")
    export_release(
        repo, bert, bert, feature_ranker=tiny_feature_ranker, sequence=tiny_sequence_model
    )
    export_release(repo, bert, bert)  # release 2: the towers alone
    with local_stack(Settings(model_repository=repo, log_level="INFO"), root / "var") as stack:
        stack.start_triton()
        client = TritonClient(stack.settings)
        try:
            yield client
        finally:
            client.close()


def _state(triton: TritonClient) -> GatewayState:
    state = GatewayState.__new__(GatewayState)  # only what the release refresh reads
    state.settings, state.triton = Settings(triton_url=triton.url), triton
    state.model_version, state.releases = "", {}
    return state


def test_the_served_release_has_none_of_the_models_it_left_out(triton: TritonClient) -> None:
    # what the gateway asked before: "latest" of each model, release 1's ranker included
    assert triton.ready([triton.feature_ranker_model, triton.sequence_model])
    state = _state(triton)
    state._refresh_releases()
    assert state.model_version == "2"
    assert state.rankers("") == state.rankers("2") == Rankers()  # retrieval order, no outage
    assert state.rankers("1") == Rankers(features=UP, sequence=UP)  # a pinned arm's
    assert state.rankers("3") == Rankers()  # no such release
