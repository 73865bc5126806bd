"""Rollback for real: two releases with different weights on one tritonserver; a client
pinned to release N-1 gets release N-1's scores and vectors, an unpinned one release N's.

Before per-release ensembles, a pin to N-1 reached the shared ensemble whose steps say
``model_version: -1``, i.e. release N's ranker (or no loaded ensemble version at all)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from transformers import AutoTokenizer

from core.config import Settings
from ops.stack import local_stack
from services.inference.triton_client import TritonClient
from tests.stack_fixtures import repository_sources
from tests.training.export.served_runner import tower_atol
from training.export.repository import servable_models

pytestmark = pytest.mark.integration

QUERY = "Recently liked: Heat (Action, Crime), Toy Story (Animation)"
DOCUMENTS = [
    "Toy Story (1995). Genres: Adventure, Animation",
    "Heat (1995). Genres: Action, Crime, Thriller",
    "Sense and Sensibility (1995). Genres: Drama, Romance",
    "x " * 200,  # truncated to the pair budget
]


@dataclass(frozen=True)
class Served:
    repo: Path
    settings: Settings


def _tiny_release_sources(root: Path, seed: int, bias: float) -> tuple[str, str]:
    """A tiny random BERT (the towers) and a cross-encoder on it whose head differs by
    ``seed`` and ``bias``: its scores cannot be mistaken for the other release's."""
    import torch

    from training.models.ranker import CrossEncoder, save_ranker
    from training.pretrained import load_bert, load_tokenizer, make_tiny_bert

    bert = make_tiny_bert(root / f"bert{seed}", seed=seed)
    torch.manual_seed(seed)
    ranker = CrossEncoder(load_bert(bert), hidden_size=32)
    torch.nn.init.constant_(ranker.head.bias, bias)
    out = save_ranker(ranker, load_tokenizer(bert), root / f"ranker{seed}", max_seq_len=128)
    return bert, out


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    from training.export.__main__ import export_release

    root = tmp_path_factory.mktemp("rollback")
    repo = root / "repo"
    repository_sources(repo)
    for seed, bias in ((1, -1.5), (2, 1.5)):
        bert, ranker = _tiny_release_sources(root, seed, bias)
        report = export_release(repo, bert, bert, ranker=ranker)
        assert report["ranker"]["max_abs_diff"] <= 1e-4  # type: ignore[index]
    assert {"ranker_scorer_r1", "ranker_scorer_r2", "item_embedder_r1"} <= set(
        servable_models(repo)
    )
    base = Settings(model_repository=repo, log_level="INFO")
    with local_stack(base, root / "var") as stack:
        stack.start_triton()
        yield Served(repo, stack.settings)


def _direct(repo: Path, version: int, model: str, texts: list[str], pairs: list[str] | None):
    """ONNX Runtime on release ``version``'s file, tokenized as the tokenizer model does."""
    tokenizer = AutoTokenizer.from_pretrained(str(repo / "tokenizer" / str(version) / "tokenizer"))
    args = (texts, pairs) if pairs is not None else (texts,)
    limit = 128 if pairs is None else 64  # the tokenizer model's max_length / pair_max_length
    tokens = tokenizer(*args, padding=True, truncation=True, max_length=limit, return_tensors="np")
    session = ort.InferenceSession(str(repo / model / str(version) / "model.onnx"))
    feeds = {i.name: tokens[i.name].astype(np.int64) for i in session.get_inputs()}
    return session.run(None, feeds)


def _client(served: Served, version: str = "") -> TritonClient:
    return TritonClient(served.settings.model_copy(update={"triton_model_version": version}))


def test_ranker_pinned_to_the_previous_release_scores_with_its_weights(served: Served) -> None:
    old = _direct(served.repo, 1, "ranker", [QUERY] * len(DOCUMENTS), DOCUMENTS)[1].reshape(-1)
    new = _direct(served.repo, 2, "ranker", [QUERY] * len(DOCUMENTS), DOCUMENTS)[1].reshape(-1)
    assert np.abs(old - new).min() > 0.1  # the releases really differ
    pinned, latest = _client(served, "1"), _client(served)
    try:
        rolled_back = pinned.score(QUERY, DOCUMENTS, 30)
        assert np.abs(rolled_back - old).max() < 1e-4
        assert np.abs(rolled_back - new).min() > 0.1
        assert np.abs(latest.score(QUERY, DOCUMENTS, 30) - new).max() < 1e-4
        # an experiment arm pins per call, on an otherwise unpinned client
        assert np.abs(latest.score(QUERY, DOCUMENTS, 30, version="1") - old).max() < 1e-4
        assert np.abs(pinned.score(QUERY, DOCUMENTS, 30, version="2") - new).max() < 1e-4
        assert pinned.ready() and latest.ready()
        assert pinned.model_version("user_embedder") == "1"
        assert latest.model_version("user_embedder") == "2"
    finally:
        pinned.close()
        latest.close()


def test_towers_pinned_to_the_previous_release_embed_with_its_weights(served: Served) -> None:
    texts = DOCUMENTS[:3]
    pinned, latest = _client(served, "1"), _client(served)
    try:
        for version, client in ((1, pinned), (2, latest)):
            for model, embed in (
                ("item_encoder", client.embed_items),
                ("user_encoder", client.embed_users),
            ):
                expected = _direct(served.repo, version, model, texts, None)[0]
                assert np.abs(embed(texts, 30) - expected).max() < tower_atol(1e-4), (
                    version,
                    model,
                )
        assert np.abs(pinned.embed_items(texts, 30) - latest.embed_items(texts, 30)).max() > 0.05
    finally:
        pinned.close()
        latest.close()
