"""Dataset loading: MovieLens and the generic events/items format, CSV or Parquet.

``load_dataset(path)`` auto-detects the layout of a directory:

* MovieLens: ``ratings.csv`` + ``movies.csv`` (+ optional ``tags.csv``);
* generic: ``events.{csv,tsv,parquet,pq}`` + ``items.{csv,tsv,parquet,pq}``.
"""

from __future__ import annotations

from pathlib import Path

from core.events import EVENT_TYPES, ImplicitRule
from training.data.generic import load_generic
from training.data.movielens import load_movielens
from training.data.schema import (
    Dataset,
    LoadReport,
    MalformedRow,
)
from training.data.split import time_split

__all__ = [
    "EVENT_TYPES",
    "Dataset",
    "ImplicitRule",
    "LoadReport",
    "MalformedRow",
    "load_dataset",
    "load_generic",
    "load_movielens",
    "time_split",
]

_SUFFIXES = (".parquet", ".pq", ".csv", ".tsv")


def _find(root: Path, stem: str) -> Path | None:
    for suffix in _SUFFIXES:
        p = root / f"{stem}{suffix}"
        if p.exists():
            return p
    return None


def load_dataset(path: str | Path, **kwargs: object) -> Dataset:
    """Load a dataset directory, detecting MovieLens or generic layout (see module doc).

    Keyword arguments go to the loader (e.g. ``rule=ImplicitRule(...)``).
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset directory not found: {root}")
    if (root / "ratings.csv").exists() and (root / "movies.csv").exists():
        return load_movielens(root, **kwargs)  # type: ignore[arg-type]
    events, items = _find(root, "events"), _find(root, "items")
    if events is not None and items is not None:
        return load_generic(events, items, **kwargs)  # type: ignore[arg-type]
    raise ValueError(
        f"{root}: no dataset found (need ratings.csv + movies.csv, or events.* + items.*)"
    )
