"""Row builders cut text to the schema's limits in UTF-8 bytes, as Milvus counts them."""

from __future__ import annotations

import pytest

from core.milvus_schema import (
    CATEGORY_MAX_LENGTH,
    MAX_CATEGORIES,
    TEXT_MAX_LENGTH,
    TITLE_MAX_LENGTH,
)
from core.rows import cut_utf8, item_row


def _nbytes(text: str) -> int:
    return len(text.encode("utf-8"))


@pytest.mark.parametrize("char", ["a", "é", "漢", "😀"])  # 1, 2, 3 and 4 bytes
@pytest.mark.parametrize("limit", [1, 5, 64, 2048])
def test_cut_never_exceeds_the_limit_nor_splits_a_character(char: str, limit: int) -> None:
    text = char * (limit + 3)
    cut = cut_utf8(text, limit)
    assert _nbytes(cut) <= limit
    assert _nbytes(cut) > limit - _nbytes(char)  # as long as whole characters allow
    assert text.startswith(cut) and set(cut) <= {char}


def test_cut_keeps_text_that_fits() -> None:
    for text in ("", "plain", "naïve café", "x" * 10):
        assert cut_utf8(text, 64) == text
    assert cut_utf8("é" * 32, 64) == "é" * 32  # exactly at the limit


def test_cut_replaces_what_utf8_cannot_hold() -> None:
    assert cut_utf8("a\udc80b", 10) == "a?b"


def test_item_row_fits_the_schema_in_bytes() -> None:
    row = item_row(
        "i1",
        "標" * TITLE_MAX_LENGTH,  # 3 bytes a character: 3x the limit
        ["é" * CATEGORY_MAX_LENGTH] * (MAX_CATEGORIES + 5),
        "😀" * TEXT_MAX_LENGTH,
    )
    assert _nbytes(row["title"]) <= TITLE_MAX_LENGTH and row["title"] == "標" * 170
    assert len(row["categories"]) == MAX_CATEGORIES
    assert all(c == "é" * (CATEGORY_MAX_LENGTH // 2) for c in row["categories"])
    assert row["text"] == "😀" * (TEXT_MAX_LENGTH // 4)
    ascii_row = item_row("i2", "T" * 600, ["c"], "x" * 3000)
    assert ascii_row["title"] == "T" * TITLE_MAX_LENGTH
    assert ascii_row["text"] == "x" * TEXT_MAX_LENGTH
