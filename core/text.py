"""Turning items and behaviour into the text the BERT towers read.

Used by training *and* by the gateway at serving time, so everything here is pure, fast and
imports nothing heavier than the standard library (pandas only inside
:func:`user_histories`, which is a training helper).

Formats (stable; changing them changes what the models were trained on):

* item: ``"Toy Story (1995). Genres: Adventure, Animation. Tags: pixar, fun"`` - the title,
  then ``Genres: ...`` when there are categories, then the free text (empty parts omitted).
* user: ``"Recently liked: Toy Story (1995) (Adventure, Animation); Heat (1995) (Action)"``
  - most recent item first, cut on item boundaries so it fits the budget; ``""`` for an
  empty history (cold start: the caller decides what to do).
* ranker input: the pair ``(user_text, item_text)`` encoded as
  ``[CLS] user [SEP] item [SEP]`` (see :mod:`training.models.ranker`).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

USER_PREFIX = "Recently liked: "
ITEM_SEPARATOR = "; "
NO_CATEGORY_MARKERS = frozenset({"(no genres listed)", "(no categories)", "none", "n/a"})

_WS = re.compile(r"\s+")


def normalize_text(value: object) -> str:
    """Unicode NFKC, control characters to spaces, whitespace collapsed, stripped.

    ``None``/NaN and other non-strings become ``""``/``str(value)``.
    """
    if value is None:
        return ""
    if isinstance(value, float) and value != value:  # NaN
        return ""
    s = value if isinstance(value, str) else str(value)
    if not s:
        return ""
    if not s.isascii():
        s = unicodedata.normalize("NFKC", s)
        s = "".join(" " if unicodedata.category(ch)[0] == "C" else ch for ch in s)
    return _WS.sub(" ", s).strip()


def normalize_categories(categories: Iterable[object] | str | None, sep: str = "|") -> list[str]:
    """Split (when a string), normalise, drop empties and "(no genres listed)", de-duplicate
    case-insensitively keeping the first spelling and the order."""
    if categories is None:
        return []
    if isinstance(categories, float) and categories != categories:
        return []
    if isinstance(categories, str):
        raw: Iterable[object] = categories.split(sep)
    elif isinstance(categories, Iterable):
        raw = categories
    else:  # a lone number or flag where a list was expected: one category
        raw = [categories]
    out: list[str] = []
    seen: set[str] = set()
    for c in raw:
        t = normalize_text(c)
        key = t.lower()
        if not t or key in NO_CATEGORY_MARKERS or key in seen:
            continue
        seen.add(key)
        out.append(t)
    return out


def item_text(title: str, categories: Sequence[str] = (), text: str = "") -> str:
    """``"Toy Story (1995). Genres: Adventure, Animation. Tags: pixar, fun"``.

    Parts are the title, ``Genres: ...`` and the free text, empty ones omitted, joined with
    ``". "`` (just ``" "`` after a part that already ends in ``.``, ``!`` or ``?``).
    """
    cats = [c for c in (normalize_text(c) for c in categories) if c]
    parts = [
        normalize_text(title),
        f"Genres: {', '.join(cats)}" if cats else "",
        normalize_text(text),
    ]
    out = ""
    for p in parts:
        if not p:
            continue
        if out:
            out += " " if out.endswith((".", "!", "?")) else ". "
        out += p
    return out


def _history_piece(title: str, categories: Sequence[str]) -> str:
    t = normalize_text(title) or "Untitled"
    cats = [c for c in (normalize_text(c) for c in categories) if c]
    return f"{t} ({', '.join(cats)})" if cats else t


def user_text(history: Sequence[tuple[str, Sequence[str]]], max_chars: int = 1000) -> str:
    """Behaviour text from ``(title, categories)`` pairs, most recent first.

    Whole items are added while the result stays within ``max_chars``; if even the first
    item does not fit, it is cut to the budget (so a non-empty history never gives ``""``).
    """
    if not history:
        return ""
    pieces = [_history_piece(t, c) for t, c in history]
    out = USER_PREFIX + pieces[0]
    if len(out) > max_chars:
        return out[:max_chars].rstrip()
    for p in pieces[1:]:
        cand = out + ITEM_SEPARATOR + p
        if len(cand) > max_chars:
            break
        out = cand
    return out


def _count_tokens(tokenizer: Any, text: str) -> int:
    if callable(getattr(tokenizer, "encode", None)):
        return len(tokenizer.encode(text, add_special_tokens=True))
    return len(tokenizer(text)["input_ids"])


def user_text_for_tokens(
    history: Sequence[tuple[str, Sequence[str]]],
    tokenizer: Any | Callable[[str], int],
    max_tokens: int,
    max_chars: int = 100_000,
) -> str:
    """Like :func:`user_text` but the budget is ``max_tokens`` tokens (special tokens
    included) under ``tokenizer`` (anything with ``encode(text, add_special_tokens=True)``,
    or a callable ``text -> token count``). Binary search over the number of items."""
    if not history:
        return ""

    def count(s: str) -> int:
        if callable(tokenizer) and not hasattr(tokenizer, "encode"):
            r = tokenizer(s)
            if isinstance(r, int):
                return r
        return _count_tokens(tokenizer, s)

    lo, hi = 1, len(history)
    if count(user_text(history[:1], max_chars)) > max_tokens:
        return user_text(history[:1], max_chars)  # the model's truncation cuts it further
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(user_text(history[:mid], max_chars)) <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    return user_text(history[:lo], max_chars)


def history_from_ids(
    item_ids: Iterable[str], lookup: Mapping[str, tuple[str, Sequence[str]]]
) -> list[tuple[str, Sequence[str]]]:
    """``(title, categories)`` pairs for ids, skipping ids missing from ``lookup``."""
    return [lookup[i] for i in item_ids if i in lookup]


def item_lookup(items: pd.DataFrame) -> dict[str, tuple[str, list[str]]]:
    """``item_id -> (title, categories)`` from a :class:`~training.data.schema.Dataset` items
    frame, ready for :func:`history_from_ids`."""
    return {
        str(i): (str(t), list(c))
        for i, t, c in zip(items["item_id"], items["title"], items["categories"], strict=True)
    }


def item_texts(items: pd.DataFrame) -> dict[str, str]:
    """``item_id -> item_text`` for every item."""
    return {
        str(i): item_text(t, c, x)
        for i, t, c, x in zip(
            items["item_id"], items["title"], items["categories"], items["text"], strict=True
        )
    }


def user_histories(
    events: pd.DataFrame, items: pd.DataFrame, max_items: int = 50
) -> dict[str, list[str]]:
    """``user_id -> item_ids`` of positive events (``weight > 0``), most recent first.

    Items the user interacted with several times appear once, at their most recent
    position; events for items missing from ``items`` are ignored. Ties in timestamp keep
    the later row first.
    """
    pos = events.loc[events["weight"] > 0, ["user_id", "item_id", "timestamp"]]
    pos = pos[pos["item_id"].isin(set(items["item_id"]))]
    pos = pos.reset_index(drop=True)
    pos["_order"] = range(len(pos))
    pos = pos.sort_values(["user_id", "timestamp", "_order"], ascending=[True, False, False])
    pos = pos.drop_duplicates(["user_id", "item_id"], keep="first")
    pos = pos.groupby("user_id", sort=False).head(max_items)
    out: dict[str, list[str]] = {}
    for uid, iid in zip(pos["user_id"], pos["item_id"], strict=True):
        out.setdefault(str(uid), []).append(str(iid))
    return out
