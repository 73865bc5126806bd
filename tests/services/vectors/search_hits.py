"""Search results as pymilvus gives them, for fake Milvus clients."""

from __future__ import annotations

from typing import Any


class Hits(list[dict[str, Any]]):
    """One query's hits: Hit rows (``distance``, ``entity``), and their primary keys and
    distances as lists (``ids``, ``distances``), which the store reads without the rows."""

    def __init__(self, ids: list[str], rows: list[dict[str, Any]]) -> None:
        super().__init__(rows)
        self.ids = ids
        self.distances = [float(r["distance"]) for r in rows]
