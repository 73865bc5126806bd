"""Real components for the integration tests: an exported model repository, tritonserver,
a Milvus Lite server (the real engine with ``RECSYS_MILVUS_SERVER=engine``), nats-server (the
event log), one profile worker and the gateway process, on free ports, stopped at the end.

``stack`` is shared by every integration test of the session; ``scratch_stack`` is a second,
independent one for tests that write arbitrary data (the request fuzzer), so whatever they
write never reaches the catalogue the other tests assert on. Both start only when a test
asks for them (session fixtures are lazy).

The dataset is a slice of the vendored MovieLens (first 400 movies, their ratings by the
first 300 users) so that indexing through Triton takes seconds, not minutes: every stack
encodes each user's history with the real MiniLM tower (576 users took ~31 s a stack, half
of building it; 281 now).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from core.config import REPO_ROOT, Settings
from ops.stack import LocalStack, local_stack

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MOVIELENS = REPO_ROOT / "third_party" / "movielens" / "ml-latest-small"
N_MOVIES = 400
N_USERS = 300  # MovieLens user ids 1..300


@pytest.fixture(scope="session")
def tiny_ranker(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small, randomly initialised cross-encoder in the training output format: real
    weights through the real export and serving path, fast enough for CI."""
    from training.models.ranker import CrossEncoder, save_ranker
    from training.pretrained import load_bert, load_tokenizer, make_tiny_bert

    bert_dir = make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))
    model = CrossEncoder(load_bert(bert_dir), hidden_size=32)
    out = tmp_path_factory.mktemp("tiny_ranker") / "ranker"
    return save_ranker(model, load_tokenizer(bert_dir), out, max_seq_len=128)


@pytest.fixture(scope="session")
def tiny_feature_ranker(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A seeded, untrained DCN-v2 feature ranker in the training output format, marked as
    trained with the sequence model's features (so the release serves that model too)."""
    import torch

    from training.models.feature_ranker import DCNv2, save_feature_ranker

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_feature_ranker") / "feature_ranker"
    save_feature_ranker(DCNv2(sequence=True).eval(), out)  # served with the tiny sequence model
    return str(out)


@pytest.fixture(scope="session")
def tiny_sequence_model(tmp_path_factory: pytest.TempPathFactory, small_dataset_dir: Path) -> str:
    """A small sequence model trained for one epoch on the small dataset (no content
    vectors), in the training output format: its vocabulary is the indexed catalogue."""
    from training.config import SequenceConfig
    from training.data import load_dataset
    from training.models.sequence import save_sequence_model, train_sequence_model
    from training.models.sequence_data import build_item_space, training_rows

    data = load_dataset(small_dataset_dir)
    cfg = SequenceConfig(
        dim=16, blocks=1, heads=2, max_seq_len=20, epochs=1, time_periods=8, use_content=False
    )
    ids = [str(i) for i in data.items["item_id"]]
    space = build_item_space(data.events, ids, periods=cfg.time_periods)
    rows = training_rows(data.events, space, max_len=cfg.max_seq_len)
    model, _ = train_sequence_model(cfg, space, rows)
    out = tmp_path_factory.mktemp("tiny_sequence") / "sequence"
    save_sequence_model(model, out)
    return str(out)


def repository_sources(target: Path) -> Path:
    """A copy of the tracked model repository with no release in it: no version folders, no
    pinned ensembles, nothing hidden (staging)."""
    from training.export.repository import pinned_release

    shutil.copytree(
        REPO_ROOT / "model_repository",
        target,
        symlinks=True,
        ignore=lambda d, names: [
            n for n in names if n.isdigit() or n.startswith(".") or pinned_release(n)
        ],
    )
    return target


@pytest.fixture(scope="session")
def model_repository(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_ranker: str,
    tiny_feature_ranker: str,
    tiny_sequence_model: str,
) -> Path:
    """The tracked repository sources plus one exported release: pretrained towers, (tiny,
    untrained) rankers and a tiny sequence model."""
    from training.export.__main__ import export_release
    from training.pretrained import resolve_pretrained

    repo = tmp_path_factory.mktemp("model_repository") / "repo"
    shutil.copytree(
        REPO_ROOT / "model_repository",
        repo,
        symlinks=True,
        ignore=lambda d, names: [n for n in names if n.isdigit() or n.startswith(".staging")],
    )
    pretrained = resolve_pretrained()
    report = export_release(
        repo,
        pretrained,
        pretrained,
        ranker=tiny_ranker,
        feature_ranker=tiny_feature_ranker,
        sequence=tiny_sequence_model,
    )
    for model in ("item_encoder", "ranker", "feature_ranker", "sequence_recommender"):
        assert report[model]["max_abs_diff"] <= 1e-4  # type: ignore[index]
    return repo


@pytest.fixture(scope="session")
def small_dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MovieLens cut to its first movies and users, written CRLF like the original files."""
    out = tmp_path_factory.mktemp("ml-small")
    movies = pd.read_csv(MOVIELENS / "movies.csv").head(N_MOVIES)
    ratings = pd.read_csv(MOVIELENS / "ratings.csv")
    ratings = ratings[ratings["movieId"].isin(movies["movieId"]) & (ratings["userId"] <= N_USERS)]
    tags = pd.read_csv(MOVIELENS / "tags.csv")
    tags = tags[tags["movieId"].isin(movies["movieId"])]
    for name, frame in (("movies", movies), ("ratings", ratings), ("tags", tags)):
        frame.to_csv(out / f"{name}.csv", index=False, lineterminator="\r\n")
    return out


@contextlib.contextmanager
def _indexed_stack(
    model_repository: Path, dataset_dir: Path, var_dir: Path, **settings: Any
) -> Iterator[LocalStack]:
    """Milvus Lite (or what ``settings`` choose) + tritonserver + gateway, with the small
    dataset indexed."""
    from ops.demo import index_dataset
    from training.data import load_dataset

    base = Settings(
        model_repository=model_repository,
        data_dir=dataset_dir,
        readiness_poll_s=0.5,
        popular_refresh_s=1.0,
        rank_candidates=50,
        segments=4,
        log_level="INFO",
        **settings,
    )
    with local_stack(base, var_dir) as running:
        running.start_milvus()
        running.start_triton()
        index_dataset(running, load_dataset(dataset_dir))  # starts the event log
        running.start_worker()
        running.start_gateway()
        yield running


@pytest.fixture(scope="session")
def stack(
    model_repository: Path, small_dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalStack]:
    with _indexed_stack(model_repository, small_dataset_dir, tmp_path_factory.mktemp("var")) as s:
        yield s


@pytest.fixture(scope="session")
def scratch_stack(
    model_repository: Path, small_dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalStack]:
    with _indexed_stack(
        model_repository, small_dataset_dir, tmp_path_factory.mktemp("scratch")
    ) as s:
        yield s


@pytest.fixture(scope="session")
def store(stack: LocalStack) -> Iterator[object]:
    """The tests' own view of Milvus: another process than the gateway, so it reads Strong to
    see what the gateway wrote (Session only covers a process's own writes)."""
    from services.vectors.store import VectorStore

    strong = {"milvus_item_consistency": "Strong", "milvus_user_consistency": "Strong"}
    s = VectorStore(stack.settings.model_copy(update=strong))
    yield s
    s.close()


@pytest.fixture()
def client(stack: LocalStack) -> Iterator[object]:
    from recsys_client import RecommenderClient

    with RecommenderClient(stack.gateway_target, timeout=20) as c:
        yield c
