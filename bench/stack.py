"""The system under test: an exported release, a MovieLens slice, and the local stack.

The release is exported once per (checkpoint, repository sources) into ``var/bench`` and
reused; Milvus is filled afresh every run through Triton, exactly as the integration tests
and the demo do it (``ops.indexing``, ``ops.segments``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from core.config import REPO_ROOT, Settings
from ops.stack import LocalStack, local_stack

log = logging.getLogger(__name__)
_RELEASE_ENSEMBLE = re.compile(r".+_r[0-9]+")  # build outputs of an export
MOVIELENS = REPO_ROOT / "third_party" / "movielens" / "ml-latest-small"
DEFAULT_CHECKPOINT = REPO_ROOT / "runs" / "local" / "final"


@dataclass(frozen=True)
class Models:
    """Where the served models come from (the PyTorch side loads the very same weights)."""

    item_tower: str
    user_tower: str
    ranker: str
    source: str  # "fine-tuned <dir>" or "pretrained MiniLM + untrained head"
    feature_ranker: str  # the checkpoint's, else a seeded untrained DCN-v2 (speed only)
    sequence: str | None = None  # the checkpoint's sequence model, when it has one


def resolve_models(checkpoint: Path | None, var_dir: Path) -> Models:
    """The fine-tuned checkpoint when it is there, else pretrained towers and a MiniLM ranker."""
    from training.export.__main__ import served_sequence

    features = _feature_ranker(checkpoint, var_dir)
    if checkpoint and (checkpoint / "item_tower").is_dir() and (checkpoint / "ranker").is_dir():
        return Models(
            str(checkpoint / "item_tower"),
            str(checkpoint / "user_tower"),
            str(checkpoint / "ranker"),
            f"fine-tuned checkpoint {checkpoint}",
            features,
            served_sequence(checkpoint),
        )
    from training.pretrained import resolve_pretrained

    pretrained = resolve_pretrained()
    ranker = var_dir / "pretrained_ranker"
    if not (ranker / "ranker_config.json").is_file():
        import torch

        from training.models.ranker import CrossEncoder, save_ranker
        from training.pretrained import load_bert, load_tokenizer

        torch.manual_seed(0)
        model = CrossEncoder(load_bert(pretrained), hidden_size=384)
        save_ranker(model, load_tokenizer(pretrained), ranker, max_seq_len=128)
    return Models(
        pretrained,
        pretrained,
        str(ranker),
        "pretrained MiniLM towers, MiniLM ranker with untrained head",
        features,
    )


def _feature_ranker(checkpoint: Path | None, var_dir: Path) -> str:
    """The checkpoint's feature ranker, else a seeded untrained one (its speed is the same)."""
    if checkpoint and (checkpoint / "feature_ranker").is_dir():
        return str(checkpoint / "feature_ranker")
    out = var_dir / "untrained_feature_ranker"
    if not (out / "config.json").is_file():
        import torch

        from training.models.feature_ranker import DCNv2, save_feature_ranker

        torch.manual_seed(0)
        save_feature_ranker(DCNv2().eval(), out)
    return str(out)


def _fingerprint(models: Models) -> str:
    """Changes when the weights, the exporter or the tracked repository sources change."""
    h = hashlib.sha1()
    paths = (models.item_tower, models.user_tower, models.ranker, models.feature_ranker)
    for path in (*paths, *([models.sequence] if models.sequence else [])):
        h.update(path.encode())
        for f in sorted(Path(path).glob("*")):
            if f.is_file():
                h.update(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}".encode())
    exporter = sorted((REPO_ROOT / "training" / "export").glob("*.py"))
    for f in [*exporter, *sorted((REPO_ROOT / "model_repository").rglob("*"))]:
        if f.is_file() and not any(
            p.isdigit() or p == "__pycache__" or _RELEASE_ENSEMBLE.fullmatch(p) for p in f.parts
        ):
            h.update(f.relative_to(REPO_ROOT).as_posix().encode() + f.read_bytes())
    return h.hexdigest()[:12]


def exported_repository(models: Models, var_dir: Path) -> tuple[Path, dict[str, object]]:
    """A model repository with one release of ``models``; reused while nothing changed."""
    target = var_dir / f"repository-{_fingerprint(models)}"
    report_file = target / "export_report.json"
    if report_file.is_file():
        import json

        return target, json.loads(report_file.read_text())
    from training.export.__main__ import export_release

    staging = var_dir / f".staging-{target.name}"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(
        REPO_ROOT / "model_repository",
        staging,
        symlinks=True,
        ignore=lambda d, names: [
            n for n in names if n.isdigit() or n.startswith(".staging") or n == "__pycache__"
        ],
    )
    report = export_release(
        staging,
        models.item_tower,
        models.user_tower,
        ranker=models.ranker,
        feature_ranker=models.feature_ranker,
        sequence=models.sequence,
    )
    for entry in report.values():  # paths as they will be after the rename
        if isinstance(entry, dict) and "onnx" in entry:
            entry["onnx"] = str(entry["onnx"]).replace(str(staging), str(target))
    import json

    (staging / "export_report.json").write_text(json.dumps(report, indent=2))
    for old in var_dir.glob("repository-*"):
        shutil.rmtree(old, ignore_errors=True)
    staging.rename(target)
    return target, report


def dataset_slice(n_items: int, n_users: int, var_dir: Path) -> Path:
    """MovieLens cut to its first ``n_items`` movies, their ratings (of the first ``n_users``
    users, 0 = all) and tags."""
    out = var_dir / f"movielens-{n_items}-{n_users}"
    if (out / "ratings.csv").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    movies = pd.read_csv(MOVIELENS / "movies.csv").head(n_items)
    ratings = pd.read_csv(MOVIELENS / "ratings.csv")
    ratings = ratings[ratings["movieId"].isin(movies["movieId"])]
    if n_users:
        ratings = ratings[ratings["userId"].isin(sorted(ratings["userId"].unique())[:n_users])]
    tags = pd.read_csv(MOVIELENS / "tags.csv")
    tags = tags[tags["movieId"].isin(movies["movieId"])]
    for name, frame in (("movies", movies), ("ratings", ratings), ("tags", tags)):
        frame.to_csv(out / f"{name}.csv", index=False)
    return out


@contextlib.contextmanager
def running_stack(
    repository: Path,
    data_dir: Path,
    var_dir: Path,
    segments: int = 8,
    milvus: str | None = None,
) -> Iterator[LocalStack]:
    """Milvus (``milvus``: ``lite``, the Milvus Lite server, or ``engine``, the real engine;
    default ``RECSYS_MILVUS_SERVER``) + tritonserver, the slice indexed through Triton, then
    the gateway. On the engine the index is flushed, so searches run on sealed HNSW segments
    as they would after a bulk indexing job."""
    from ops.demo import index_dataset
    from training.data import load_dataset

    state = var_dir / "stack"
    shutil.rmtree(state, ignore_errors=True)
    base = Settings(
        model_repository=repository,
        data_dir=data_dir,
        var_dir=state,
        readiness_poll_s=1.0,
        log_level="WARNING",
        segments=segments,
    )
    engine = (milvus or base.milvus_server) == "engine"
    with local_stack(base, state) as stack:
        stack.start_milvus(engine=engine)
        stack.start_triton()
        index_dataset(stack, load_dataset(data_dir))  # with the event log; flushed on the engine
        stack.start_gateway()
        yield stack
