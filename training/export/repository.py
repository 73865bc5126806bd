"""Write exported models into the Triton model repository as new numbered versions.

One export is one *release*: every model it touches gets the same new version number
(one above the highest in the repository), so the tokenizer, towers and ranker of a training
run travel together, and ``version_policy { latest { num_versions: 2 } }`` keeps the previous
release loaded for rollback. A version directory is assembled under a temporary name and
renamed into place, so a Triton polling the repository never sees half a model.

Tracked sources per model (``config.pbtxt``, ``configs/gpu.pbtxt``, ``model.py``) stay as they
are; the python-backend ``model.py`` is copied into each version, where Triton looks for it.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

TOWERS = ("item", "user")
ENSEMBLES = {"item_embedder", "user_embedder", "ranker_scorer"}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)


def versions(model_dir: Path) -> list[int]:
    """Numbered version directories of one model, ascending."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def latest_release(repository: Path) -> int:
    """Highest version number of any model in the repository (0 when empty)."""
    found = [v for d in repository.iterdir() if d.is_dir() for v in versions(d)]
    return max(found, default=0)


def servable_models(repository: Path) -> list[str]:
    """Models that have a config and at least one version: what Triton should load."""
    return sorted(
        d.name
        for d in repository.iterdir()
        if d.is_dir() and (d / "config.pbtxt").is_file() and versions(d)
    )


@dataclass
class Release:
    """A new version being assembled; ``commit`` moves every staged model into place."""

    repository: Path
    version: int
    staged: dict[str, Path] = field(default_factory=dict)

    def stage(self, model: str) -> Path:
        """A fresh staging directory for ``model``'s new version, with its model.py."""
        model_dir = self.repository / model
        if not (model_dir / "config.pbtxt").is_file():
            raise FileNotFoundError(f"{model_dir}/config.pbtxt is missing: not a model")
        staging = model_dir / f".staging-{self.version}"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        source = model_dir / "model.py"
        if source.exists():
            shutil.copyfile(source.resolve(), staging / "model.py")
        self.staged[model] = staging
        return staging

    def commit(self, metadata: dict[str, object]) -> dict[str, int]:
        """Rename every staged directory to its version number; ensembles last."""
        order = sorted(self.staged, key=lambda m: m in ENSEMBLES)
        for model in order:
            staging = self.staged[model]
            (staging / "release.json").write_text(
                json.dumps({"version": self.version, "model": model, **metadata}, indent=2)
            )
            staging.rename(self.repository / model / str(self.version))
        return {m: self.version for m in order}


def new_release(repository: Path) -> Release:
    """Start the next release of the repository."""
    return Release(repository, latest_release(repository) + 1)


def copy_tokenizer(source_dir: str, target: Path) -> None:
    """Copy the fast-tokenizer files the python-backend tokenizer loads."""
    target.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (Path(source_dir) / name).is_file():
            shutil.copyfile(Path(source_dir) / name, target / name)
    if not (target / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{source_dir} has no tokenizer.json (a fast tokenizer is needed)")


def prune(repository: Path, keep: int = 3) -> list[Path]:
    """Delete all but the newest ``keep`` versions of each model (disk hygiene)."""
    removed = []
    for model_dir in repository.iterdir():
        for v in versions(model_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(model_dir / str(v))
            removed.append(model_dir / str(v))
    return removed


def release_metadata(**extra: object) -> dict[str, object]:
    """Common provenance written beside every model version."""
    return {"created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra}
