"""A whole gateway over a repository of two releases: release 1 has a feature ranker and a
sequence model, release 2 (the newest, served) the towers only, as ``make train`` makes a
release whose catalogue chose to serve neither (training/release_choice.py). Triton keeps
release 1 loaded for rollback. Unpinned users get release 2's retrieval order without a
request to release 1's models; an experiment arm pinned to release 1 gets both of them.
What each user got is read from the responses and from Triton's own request counters per
model version (``test_releases.py`` checks the gateway's release refresh piece by piece)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from recsys_client import RecommenderClient

from bench import metrics
from ops.stack import LocalStack
from tests.stack_fixtures import _indexed_stack

pytestmark = pytest.mark.integration

PINNED = "release=previous"
EXPERIMENTS = [
    {
        "name": "release",
        "salt": "two-releases",
        "arms": [
            {"name": "control", "weight": 50},
            {"name": "previous", "weight": 50, "variant": {"model_version": "1"}},
        ],
    }
]
OPTIONAL = ("feature_ranker", "sequence_recommender")


@pytest.fixture(scope="module")
def two_releases(
    model_repository: Path, small_dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalStack]:
    """The session's repository (release 1: the pretrained towers, the rankers and the
    sequence model) with a release 2 of the towers alone, indexed and served."""
    from training.export.__main__ import export_release
    from training.pretrained import resolve_pretrained

    root = tmp_path_factory.mktemp("two-releases")
    repo = root / "repo"
    shutil.copytree(model_repository, repo, symlinks=True)
    pretrained = resolve_pretrained()
    assert export_release(repo, pretrained, pretrained)["version"] == 2
    with _indexed_stack(
        repo, small_dataset_dir, root / "var", experiments=json.dumps(EXPERIMENTS)
    ) as stack:
        yield stack


def requests_by_version(port: int) -> dict[tuple[str, str], float]:
    """Triton's successful inference requests, per (model, version), of the optional
    models."""
    out: dict[tuple[str, str], float] = {}
    for (name, labels), value in metrics.scrape(port).items():
        label = dict(labels)
        if name == "nv_inference_request_success" and label.get("model") in OPTIONAL:
            out[(label["model"], label["version"])] = value
    return out


def test_each_user_is_served_the_models_of_their_release(two_releases: LocalStack) -> None:
    port = two_releases.ports.triton_metrics
    users = [str(u) for u in range(1, 31)]  # the small dataset's first users
    with RecommenderClient(two_releases.gateway_target, timeout=20) as client:
        arms = {u: client.recommend(u, k=5).experiment_arm for u in users}
        served = [u for u in users if arms[u] != PINNED]
        pinned = [u for u in users if arms[u] == PINNED]
        assert served and pinned, arms

        before = requests_by_version(port)
        for user in served:
            reply = client.recommend(user, k=5)
            assert reply.model_version == "2" and not reply.degraded, reply
            assert len(reply.items) == 5
            assert all(i.click_probability == 0 for i in reply.items)  # not ranked
        # release 2 deploys neither model: none of release 1's was asked (nor any other)
        assert requests_by_version(port) == before

        ranked = 0
        for user in pinned:
            reply = client.recommend(user, k=5)
            assert reply.model_version == "1" and not reply.degraded, reply
            assert len(reply.items) == 5
            ranked += any(i.click_probability > 0 for i in reply.items)
        after = requests_by_version(port)
        # one request each per ranked Recommend, to release 1's version (a user without any
        # history gets popularity's list, unranked)
        assert ranked > 0
        assert {m: after[(m, "1")] - before[(m, "1")] for m in OPTIONAL} == {
            m: ranked for m in OPTIONAL
        }
