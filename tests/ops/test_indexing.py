"""Length-bucketed item indexing: every item once, with its own vector, whatever the order.

A fake Triton client derives each vector from its text, so a vector that lands on another
item's row is caught; the last tests make sure these checks do fail on such mix-ups.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.behaviour import DEFAULT_HALF_LIFE_DAYS, SECONDS_PER_DAY
from core.config import Settings
from core.rows import ItemRow, item_row
from ops.indexing import (
    embed_and_upsert,
    embed_bucketed,
    estimated_lengths,
    index_exploration,
    index_half_life,
    index_rows,
    index_users,
    item_rows,
    length_buckets,
    length_order,
    release_lengths,
    user_rows,
    without_deleted,
)
from services.events import aggregates
from services.events.scan import Tombstones
from services.inference.triton_client import TritonClient
from services.vectors.store import StoreUnavailable, VectorStore
from tests.core.test_exploration_share import shop_arrivals
from tests.nats_server import nats_settings, on_log
from training.data import Dataset, load_dataset

__all__ = ["nats_settings"]

DIM = 8


def vector_of(text: str) -> np.ndarray:
    """A vector that only this text gets."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return np.frombuffer(digest[: DIM * 4], dtype=np.uint32).astype(np.float32) / 2**32


class FakeTriton:
    """``embed_items`` as Triton answers it: one vector per text, in the order sent."""

    def __init__(self, scramble: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        self.requests: list[list[str]] = []
        self.scramble = scramble

    def embed_items(self, texts: Sequence[str], timeout_s: float) -> np.ndarray:
        self.requests.append(list(texts))
        out = np.stack([vector_of(t) for t in texts])
        return self.scramble(out) if self.scramble else out


class FakeStore:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.vectors_read = 0

    def upsert_items(self, rows: Sequence[ItemRow], timeout: float = 30.0) -> int:
        self.rows.extend(dict(r) for r in rows)
        return len(rows)

    def all_items(self, fields: Sequence[str]) -> list[dict[str, Any]]:
        return [{f: r[f] for f in fields} for r in self.rows]

    def get_items(
        self, ids: Sequence[str], timeout: float, with_vectors: bool, consistency: str
    ) -> dict[str, dict[str, Any]]:
        assert with_vectors and len(ids) <= 1000  # in batches, only the vectors needed
        self.vectors_read += len(ids)
        return {r["item_id"]: r for r in self.rows if r["item_id"] in set(ids)}


def catalogue(n: int) -> list[tuple[ItemRow, str]]:
    """Rows whose embedded texts differ in length (1 to 40 words) and are all distinct."""
    rng = np.random.default_rng(n)
    out = []
    for i in range(n):
        words = " ".join(f"w{i}x{k}" for k in range(int(rng.integers(1, 40))))
        out.append((item_row(f"item-{i}", f"Title {i}", ["Drama"], ""), f"Title {i}. {words}"))
    return out


def run_index(
    rows: list[tuple[ItemRow, str]], triton: FakeTriton, batch: int, **kwargs: Any
) -> FakeStore:
    store = FakeStore()
    written = index_rows(
        rows, cast(TritonClient, triton), cast(VectorStore, store), batch, **kwargs
    )
    assert written == len(rows)
    return store


def assert_each_item_once_with_its_vector(
    store: FakeStore, rows: list[tuple[ItemRow, str]]
) -> None:
    ids = [r["item_id"] for r in store.rows]
    assert sorted(ids) == sorted(row["item_id"] for row, _ in rows), "items lost or repeated"
    text_of = {row["item_id"]: text for row, text in rows}
    for r in store.rows:
        assert np.array_equal(np.asarray(r["vector"], np.float32), vector_of(text_of[r["item_id"]]))


# --- bucketing ---------------------------------------------------------------------------
@settings(max_examples=80, deadline=None)
@given(texts=st.lists(st.text(max_size=60), max_size=150), size=st.integers(1, 70))
def test_length_buckets_hold_every_index_once_in_length_order(texts: list[str], size: int) -> None:
    buckets = length_buckets(texts, size)
    flat = [i for bucket in buckets for i in bucket]
    assert sorted(flat) == list(range(len(texts)))
    assert all(1 <= len(b) <= size for b in buckets)
    assert all(len(b) == size for b in buckets[:-1])
    lengths = estimated_lengths(texts)
    assert [lengths[i] for i in flat] == sorted(lengths)


def test_length_order_follows_given_lengths_then_characters_then_input() -> None:
    texts = ["ccc", "a", "bb", "dd", "e"]
    assert length_order(texts, lambda ts: [1, 2, 1, 1, 2]) == [2, 3, 0, 1, 4]
    with pytest.raises(ValueError, match="lengths for"):
        length_order(texts, lambda ts: [1, 2])
    with pytest.raises(ValueError, match="batch size"):
        length_buckets(texts, 0)


def test_estimated_lengths_count_words_and_punctuation() -> None:
    assert estimated_lengths(["Toy Story (1995). Genres: Animation", "", "é!"]) == [9, 0, 2]


def test_bucketed_indexing_writes_each_item_once_with_its_own_vector() -> None:
    rows = catalogue(300)
    triton = FakeTriton()
    store = run_index(rows, triton, 64)
    assert_each_item_once_with_its_vector(store, rows)
    assert [len(r) for r in triton.requests] == [64, 64, 64, 64, 44]
    sizes = [estimated_lengths(r) for r in triton.requests]
    assert all(max(a) <= min(b) for a, b in pairwise(sizes))  # buckets
    # file order (the baseline) writes the same rows with the same vectors
    baseline = run_index(rows, FakeTriton(), 64, bucketed=False)
    assert_each_item_once_with_its_vector(baseline, rows)
    assert [r["item_id"] for r in baseline.rows] == [row["item_id"] for row, _ in rows]


def test_bucketing_pads_less_than_file_order() -> None:
    rows = catalogue(500)
    padded = {}
    for bucketed in (False, True):
        triton = FakeTriton()
        run_index(rows, triton, 64, bucketed=bucketed)
        padded[bucketed] = sum(max(estimated_lengths(r)) * len(r) for r in triton.requests)
    assert padded[True] < 0.75 * padded[False]


def test_embed_bucketed_returns_vectors_in_input_order() -> None:
    texts = [text for _, text in catalogue(130)]
    triton = FakeTriton()
    got = embed_bucketed(texts, lambda ts: triton.embed_items(ts, 1.0), batch=32)
    assert np.array_equal(got, np.stack([vector_of(t) for t in texts]))
    assert [texts.index(t) for t in triton.requests[0]] != list(range(32))  # it did reorder
    assert embed_bucketed([], lambda ts: np.zeros((0, DIM))).shape == (0, 0)


def test_release_lengths_use_the_newest_tokenizer(tmp_path: Path) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    assert release_lengths(tmp_path) is None
    tokenizer = Tokenizer(WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()  # type: ignore[assignment]
    for version in ("2", "10"):
        (tmp_path / "tokenizer" / version / "tokenizer").mkdir(parents=True)
    tokenizer.save(str(tmp_path / "tokenizer" / "10" / "tokenizer" / "tokenizer.json"))
    lengths = release_lengths(tmp_path)
    assert lengths is not None
    assert list(lengths(["a b c", "a", ""])) == [3, 1, 0]
    assert length_order(["a b c", "a", ""], lengths) == [2, 1, 0]


# --- the checks above do fail -------------------------------------------------------------
def test_the_check_catches_vectors_swapped_within_a_batch() -> None:
    rows = catalogue(100)
    store = run_index(rows, FakeTriton(scramble=lambda v: v[::-1]), 32)
    with pytest.raises(AssertionError):
        assert_each_item_once_with_its_vector(store, rows)


def test_the_check_catches_a_lost_or_repeated_item(monkeypatch: pytest.MonkeyPatch) -> None:
    import ops.indexing

    rows = catalogue(100)

    def repeating(texts: Sequence[str], size: int, lengths: Any = None) -> list[list[int]]:
        order = ops.indexing.length_order(texts, lengths)
        order[-1] = order[0]  # one item twice, one never
        return [order[i : i + size] for i in range(0, len(order), size)]

    monkeypatch.setattr(ops.indexing, "length_buckets", repeating)
    store = run_index(rows, FakeTriton(), 32)
    with pytest.raises(AssertionError, match="lost or repeated"):
        assert_each_item_once_with_its_vector(store, rows)


class SlowStore(FakeStore):
    """An upsert that takes ``seconds``, recording how many ran at once and what Triton was
    asked meanwhile; ``fail_at`` (1-based) raises like an unreachable Milvus."""

    def __init__(self, triton: FakeTriton, seconds: float, fail_at: int = 0) -> None:
        super().__init__()
        self.triton, self.seconds, self.fail_at = triton, seconds, fail_at
        self.in_flight = self.most_in_flight = self.upserts = 0
        self.overlapped = 0  # upserts during which Triton got the next batch
        self.lock = threading.Lock()

    def upsert_items(self, rows: Sequence[ItemRow], timeout: float = 30.0) -> int:
        with self.lock:
            self.in_flight += 1
            self.upserts += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            asked, upsert = len(self.triton.requests), self.upserts
        time.sleep(self.seconds)
        with self.lock:
            self.in_flight -= 1
            self.overlapped += len(self.triton.requests) > asked
        if upsert == self.fail_at:
            raise StoreUnavailable("upsert: connection refused")
        return super().upsert_items(rows, timeout)


class SlowTriton(FakeTriton):
    """Triton that takes 50 ms per batch before it has it."""

    def embed_items(self, texts: Sequence[str], timeout_s: float) -> np.ndarray:
        time.sleep(0.05)
        return super().embed_items(texts, timeout_s)


def test_a_batchs_upsert_runs_while_the_next_one_is_embedded() -> None:
    """One upsert in flight, in batch order, overlapping the next batch's embedding; the job
    returns once the last one is acknowledged."""
    rows = catalogue(40)
    triton = SlowTriton()
    store = SlowStore(triton, 0.1)
    written = index_rows(rows, cast(TritonClient, triton), cast(VectorStore, store), 8)
    assert written == 40 == len(store.rows)
    assert_each_item_once_with_its_vector(store, rows)
    assert store.most_in_flight == 1 and store.overlapped >= 3  # all but the last can
    id_of = {text: row["item_id"] for row, text in rows}
    sent = [id_of[text] for batch in triton.requests for text in batch]
    assert [r["item_id"] for r in store.rows] == sent  # in the order the batches went


def test_a_failed_upsert_fails_the_indexing() -> None:
    rows = catalogue(40)
    triton = FakeTriton()
    store = SlowStore(triton, 0.01, fail_at=2)
    with pytest.raises(StoreUnavailable):
        index_rows(rows, cast(TritonClient, triton), cast(VectorStore, store), 8)
    assert len(store.rows) == 8 and len(triton.requests) <= 3  # stopped at the next batch


def test_a_short_answer_from_triton_fails_the_batch() -> None:
    rows = catalogue(10)
    with pytest.raises(ValueError):
        embed_and_upsert(
            rows,
            cast(TritonClient, FakeTriton(scramble=lambda v: v[:-1])),
            cast(VectorStore, FakeStore()),
        )
    with pytest.raises(ValueError, match="vectors for a batch"):
        embed_bucketed([t for _, t in rows], lambda ts: np.zeros((len(ts) - 1, DIM)), batch=4)


def users_dataset(tmp_path: Path) -> Dataset:
    """12 users with histories of 1 to 12 items."""
    items = [f"i{n}" for n in range(12)]
    pd.DataFrame({"item_id": items, "title": [f"Film {n}" for n in range(12)]}).to_csv(
        tmp_path / "items.csv", index=False
    )
    events = [(f"u{u}", items[k]) for u in range(12) for k in range((u * 5) % 12 + 1)]
    pd.DataFrame(
        {
            "user_id": [u for u, _ in events],
            "item_id": [i for _, i in events],
            "event_type": "purchase",
            "timestamp": [1_600_000_000 + n for n in range(len(events))],
        }
    ).to_csv(tmp_path / "events.csv", index=False)
    return load_dataset(tmp_path)


def test_users_are_indexed_in_length_buckets_each_with_its_own_vector(tmp_path: Path) -> None:
    """Histories of 1 to 12 items: sent shortest first, every row keeps its text's vector."""

    class Users(FakeTriton):
        embed_users = FakeTriton.embed_items

    class UserStore(FakeStore):
        def upsert_users(self, rows: Sequence[dict[str, Any]], timeout: float = 30.0) -> int:
            return self.upsert_items(cast(Sequence[ItemRow], rows), timeout)

    dataset = users_dataset(tmp_path)
    triton, store = Users(), UserStore()
    assert index_users(dataset, cast(TritonClient, triton), cast(VectorStore, store), 4) == 12
    text_of = {row["user_id"]: text for row, text in user_rows(dataset)}
    assert sorted(r["user_id"] for r in store.rows) == sorted(text_of)
    for r in store.rows:
        assert np.array_equal(np.asarray(r["vector"], np.float32), vector_of(text_of[r["user_id"]]))
    sent = [len(t) for request in triton.requests for t in request]
    assert sent == sorted(sent) and len(set(sent)) > 1  # buckets, not file order


def test_a_user_buckets_upsert_runs_while_the_next_one_is_embedded(tmp_path: Path) -> None:
    """Users go through the same pipeline as items: one upsert in flight, overlapping the
    next bucket's embedding."""

    class Users(SlowTriton):
        embed_users = SlowTriton.embed_items

    class UserStore(SlowStore):
        upsert_users = SlowStore.upsert_items

    triton = Users()
    store = UserStore(triton, 0.1)
    dataset = users_dataset(tmp_path)
    assert index_users(dataset, cast(TritonClient, triton), cast(VectorStore, store), 3) == 12
    # 4 buckets: all but the last can overlap; 2 leaves room for a late thread start
    assert store.most_in_flight == 1 and store.overlapped >= 2
    assert len(store.rows) == 12


@pytest.mark.integration
def test_deleted_users_never_come_back_from_indexing(
    tmp_path: Path, nats_settings: Settings
) -> None:
    """A user DeleteUser tombstoned in the event log gets no user row from the dataset, and
    their events count in no item's popularity or neighbours."""
    pd.DataFrame(
        {"item_id": ["i1", "i2", "i3"], "title": ["One", "Two", "Three"], "categories": "A"}
    ).to_csv(tmp_path / "items.csv", index=False)
    pd.DataFrame(
        {
            "user_id": ["gone", "gone", "kept", "kept"],
            "item_id": ["i3", "i1", "i1", "i2"],
            "event_type": "purchase",
            "timestamp": [1_600_000_000, 1_600_000_010, 1_600_000_020, 1_600_000_030],
        }
    ).to_csv(tmp_path / "events.csv", index=False)
    dataset = load_dataset(tmp_path)
    assert {r["user_id"] for r, _ in user_rows(dataset)} == {"gone", "kept"}

    on_log(nats_settings, lambda log: log.forget_user("gone", 5.0))
    tombstones = Tombstones.load(nats_settings)
    assert {r["user_id"] for r, _ in user_rows(dataset, tombstones=tombstones)} == {"kept"}
    kept = without_deleted(dataset, tombstones)
    items = {r["item_id"]: r for r, _ in item_rows(kept, DEFAULT_HALF_LIFE_DAYS)}
    assert items["i3"]["popularity"] == 0.0 and items["i1"]["popularity"] > 0
    assert "i3" not in items["i1"]["co_items"]
    assert without_deleted(dataset, Tombstones()) is dataset  # nothing deleted: as is


@pytest.mark.integration
def test_the_index_records_its_popularity_half_life_and_time_for_the_online_aggregates(
    tmp_path: Path, nats_settings: Settings
) -> None:
    """The half-life the indexing job chose (here the setting's) is the one the profile
    workers' merges and the gateways' reads decay the online popularity with, and the
    indexed popularity is decayed from the index's own time by it."""
    pd.DataFrame({"item_id": ["i1"], "title": ["One"], "categories": "A"}).to_csv(
        tmp_path / "items.csv", index=False
    )
    pd.DataFrame(
        {"user_id": ["u"], "item_id": ["i1"], "event_type": "purchase", "timestamp": [1e9]}
    ).to_csv(tmp_path / "events.csv", index=False)
    dataset = load_dataset(tmp_path)
    assert index_half_life(dataset, nats_settings) == DEFAULT_HALF_LIFE_DAYS  # too few to choose
    chosen = nats_settings.model_copy(update={"popularity_half_life_days": 2.0})
    assert index_half_life(dataset, chosen) == 2.0
    day = SECONDS_PER_DAY
    delta = aggregates.Delta(at=10 * day)
    delta.add_user([], [("i1", 10 * day)], 2 * day)
    assert on_log(nats_settings, lambda log: aggregates.merge(log, delta)) == 2 * day
    # two half-lives later the item counts a quarter, as the recorded half-life says
    online = on_log(nats_settings, lambda log: aggregates.read(log, now=14 * day))
    assert online.popularity["i1"] == pytest.approx(0.25)
    # the indexed popularity was decayed to the newest event (1e9 s): a gateway reading four
    # days later weighs it a quarter, as it does the online part of the same age
    later = on_log(nats_settings, lambda log: aggregates.read(log, now=1e9 + 4 * day))
    assert later.indexed_weight == pytest.approx(0.25)


@pytest.mark.integration
def test_the_index_records_the_exploration_share_it_chose_for_the_gateways(
    nats_settings: Settings,
) -> None:
    """On a catalogue whose users buy the arrivals the job chooses three slots of ten, on
    the vectors the store holds, and records it where the gateways read it; a setting that
    fixes the share leaves nothing to choose."""
    events, ids, vectors, created = shop_arrivals(600, fresh=True)
    store = FakeStore()
    store.rows = [
        {"item_id": i, "vector": v.tolist(), "created_at": int(c)}
        for i, v, c in zip(ids, vectors, created, strict=True)
    ]
    dataset = Dataset(events, pd.DataFrame({"item_id": ids}))
    assert on_log(nats_settings, lambda log: aggregates.read(log)).exploration_share is None
    assert index_exploration(dataset, cast(VectorStore, store), nats_settings, 3.0) == 0.3
    assert 0 < store.vectors_read < len(ids)  # the new items at the cuts and the histories
    assert on_log(nats_settings, lambda log: aggregates.read(log)).exploration_share == 0.3
    fixed = nats_settings.model_copy(update={"exploration_share": 0.2})
    assert index_exploration(dataset, cast(VectorStore, store), fixed, 3.0) is None
    # a catalogue too small to replay anything on: no vector read, the default recorded
    few = Dataset(events.iloc[:1], pd.DataFrame({"item_id": ids}))
    store.vectors_read = 0
    assert index_exploration(few, cast(VectorStore, store), nats_settings, 3.0) == 0.1
    assert store.vectors_read == 0
    assert on_log(nats_settings, lambda log: aggregates.read(log)).exploration_share == 0.1
