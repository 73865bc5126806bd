from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from core.text import (
    item_text,
    normalize_categories,
    normalize_text,
    user_histories,
    user_text,
    user_text_for_tokens,
)


def test_item_text_format() -> None:
    assert (
        item_text("Toy Story (1995)", ["Adventure", "Animation"], "Tags: pixar, fun")
        == "Toy Story (1995). Genres: Adventure, Animation. Tags: pixar, fun"
    )
    assert item_text("Heat (1995)", ["Action"]) == "Heat (1995). Genres: Action"
    assert item_text("Heat (1995)", []) == "Heat (1995)"
    assert item_text("", ["Drama"]) == "Genres: Drama"
    assert item_text("", [], "") == ""
    assert item_text("Wow!", [], "fun") == "Wow! fun"
    assert item_text("  A \t\n B ", [" x ", ""], " t ") == "A B. Genres: x. t"


def test_normalize() -> None:
    assert normalize_text(None) == ""
    assert normalize_text(float("nan")) == ""
    assert normalize_text("\uff46\uff55\uff4c\uff4c\u00a0width\x00x") == "full width x"
    assert normalize_categories("A|b|(no genres listed)|| a |B") == ["A", "b"]
    assert normalize_categories(["x", None, "X"]) == ["x"]


def test_user_text_format_and_truncation() -> None:
    h = [("Heat (1995)", ["Action", "Crime"]), ("Toy Story (1995)", ["Animation"]), ("Z", [])]
    full = "Recently liked: Heat (1995) (Action, Crime); Toy Story (1995) (Animation); Z"
    assert user_text(h) == full
    cut = user_text(h, max_chars=len(full) - 1)
    assert cut == "Recently liked: Heat (1995) (Action, Crime); Toy Story (1995) (Animation)"
    assert user_text(h, max_chars=50) == "Recently liked: Heat (1995) (Action, Crime)"
    assert user_text(h, max_chars=20) == "Recently liked: Heat"  # first item always present
    assert user_text([]) == ""
    for budget in range(10, 100, 7):
        assert len(user_text(h, budget)) <= budget


def test_user_text_token_budget() -> None:
    from training.pretrained import load_tokenizer, resolve_pretrained

    tok = load_tokenizer(resolve_pretrained(""))
    h = [(f"Movie number {i} (2000)", ["Drama", "Comedy"]) for i in range(40)]
    for budget in (16, 32, 64, 128):
        t = user_text_for_tokens(h, tok, budget)
        assert len(tok.encode(t)) <= budget
        more = user_text(h[: t.count(";") + 2], 10**6)
        assert len(tok.encode(more)) > budget  # one more item would not fit
    # callable token counter also accepted
    assert user_text_for_tokens(h, lambda s: len(s.split()), 14).count(";") == 1
    assert user_text_for_tokens(h, lambda s: len(s.split()), 13).count(";") == 0


def test_user_histories() -> None:
    ts = pd.to_datetime(
        ["2024-01-01", "2024-01-03", "2024-01-02", "2024-01-04", "2024-01-05", "2024-01-01"],
        utc=True,
    )
    events = pd.DataFrame(
        {
            "user_id": ["u", "u", "u", "u", "u", "v"],
            "item_id": ["a", "b", "c", "a", "x", "a"],
            "timestamp": ts,
            "weight": [1.0, 0.5, 0.0, 1.0, 1.0, 1.0],
        }
    )
    items = pd.DataFrame({"item_id": ["a", "b", "c"]})
    h = user_histories(events, items)
    assert h == {"u": ["a", "b"], "v": ["a"]}  # c: negative; x: unknown; a once, latest
    assert user_histories(events, items, max_items=1)["u"] == ["a"]


def test_features_import_is_light() -> None:
    code = (
        "import sys, core.text, training.data;"
        "bad = [m for m in ('torch', 'transformers', 'ray') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("n", [0, 1, 5])
def test_user_text_pure(n: int) -> None:
    h = [(f"T{i}", ["G"]) for i in range(n)]
    assert user_text(h) == user_text(list(h))
