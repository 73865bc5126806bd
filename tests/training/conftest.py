from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[2]
MOVIELENS = REPO_ROOT / "third_party" / "movielens" / "ml-latest-small"
LOCAL_CONFIG = REPO_ROOT / "training" / "configs" / "local.yaml"


def write(path: Path, text: str, *, crlf: bool = False) -> Path:
    """Write ``text`` (lines separated by \\n) with LF or CRLF endings, byte-exact."""
    data = text.replace("\n", "\r\n") if crlf else text
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8"))
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A randomly initialised 2-layer, 32-wide BERT with the MiniLM tokenizer."""
    from training.pretrained import make_tiny_bert

    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def movielens():  # type: ignore[no-untyped-def]
    """The vendored ml-latest-small, loaded once (read-only: do not mutate)."""
    from training.data import load_movielens

    return load_movielens(MOVIELENS)


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    """A local Ray for one test module, started as ``make train`` starts it (small object
    store), shut down after the module."""
    import ray

    from training.config import load_config
    from training.train import init_ray

    if ray.is_initialized():
        ray.shutdown()
    init_ray(load_config(LOCAL_CONFIG, ["object_store_memory=200000000"]))
    yield
    ray.shutdown()
