"""Property-based fuzzing of the ingestion file formats (generic CSV/TSV/Parquet loader).

Whatever the bytes, ``load_generic`` either returns a dataset whose report accounts for every
row, or raises a ``ValueError`` (a file-level problem: no header, a missing required column,
unreadable Parquet) with a message naming the file - never another exception, never a hang.

The two defects this fuzzer found (duplicate columns after header aliasing; a numeric
Parquet ``categories`` column) are fixed and pinned by the regression tests at the end.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz_text import CHARS
from training.data import load_generic

pytestmark = pytest.mark.fuzz

TOTAL = int(os.environ.get("RECSYS_FUZZ_EXAMPLES", "210"))
EXAMPLES = max(20, TOTAL // 20)
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)

EVENT_COLUMNS = ["user_id", "item_id", "event_type", "timestamp", "value", "user", "ts", "type"]
ITEM_COLUMNS = ["item_id", "title", "categories", "created_at", "description", "id", "genres"]
cell = st.one_of(
    st.sampled_from(["", "1", "i1", "u1", "view", "purchase", "rating", "buy", "4.5", "-1"]),
    st.sampled_from(["1714557600", "2024-05-01T10:00:00Z", "1e300", "nan", "inf", "NaT"]),
    st.text(CHARS, max_size=30),
    st.just('"'),
    st.just("a,b"),
    st.just("x\ny"),
)
header = st.one_of(
    st.lists(st.sampled_from(EVENT_COLUMNS + ITEM_COLUMNS), min_size=1, max_size=8),
    st.lists(st.text(max_size=8), max_size=5),
)


@st.composite
def csv_bytes(draw: st.DrawFn, columns: list[str]) -> bytes:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=300))  # not text at all
    cols = draw(st.one_of(st.just(columns), header))
    rows = draw(st.lists(st.lists(cell, min_size=0, max_size=len(cols) + 2), max_size=15))
    sep = draw(st.sampled_from([",", ";", "\t"]))
    newline = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    out = io.StringIO()
    out.write(sep.join(cols) + newline)
    for row in rows:
        out.write(sep.join(row) + newline)
    data = out.getvalue().encode("utf-8", "surrogatepass")
    if draw(st.booleans()):
        data = b"\xef\xbb\xbf" + data  # BOM
    cut = draw(st.integers(0, len(data)))
    return data[:cut] if draw(st.integers(0, 4)) == 0 else data


column_values = st.one_of(
    st.lists(st.one_of(st.none(), st.text(max_size=12)), min_size=1, max_size=10),
    st.lists(st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)), min_size=1, max_size=10),
    st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=10),
    st.lists(st.lists(st.text(max_size=6), max_size=3), min_size=1, max_size=10),
    st.lists(st.booleans(), min_size=1, max_size=10),
    st.lists(
        st.datetimes(timezones=st.sampled_from([None])).map(pd.Timestamp), min_size=1, max_size=10
    ),
)


@st.composite
def parquet_bytes(draw: st.DrawFn, columns: list[str]) -> bytes:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=300))
    names = draw(st.one_of(st.just(columns), header))
    names = list(dict.fromkeys(names)) or ["x"]
    n = draw(st.integers(0, 8))
    table = {}
    for name in names:
        values = draw(column_values)
        table[name] = (values * (n // len(values) + 1))[:n]
    buf = io.BytesIO()
    try:
        pq.write_table(pa.table(table), buf)
    except (pa.ArrowException, ValueError, TypeError, OverflowError):
        return draw(st.binary(max_size=50))
    return buf.getvalue()


ALIASES = {
    "id": "item_id",
    "item": "item_id",
    "user": "user_id",
    "name": "title",
    "category": "categories",
    "genres": "categories",
    "event": "event_type",
    "type": "event_type",
    "ts": "timestamp",
    "time": "timestamp",
    "rating": "value",
}


def _columns(path: Path) -> list[str]:
    """The header as the loader will name it (normalised, aliases applied)."""
    try:
        if path.suffix == ".parquet":
            raw = [str(c) for c in pq.read_schema(path).names]
        else:
            with path.open(encoding="utf-8-sig", newline="", errors="replace") as fh:
                delimiter = "\t" if path.suffix == ".tsv" else ","
                raw = next(csv.reader(fh, delimiter=delimiter), [])
    except Exception:
        return []
    names = [c.strip().lstrip("\ufeff").strip().lower() for c in raw]
    return [ALIASES.get(n, n) for n in names]


def _load(events: bytes, items: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        events_path, items_path = Path(tmp, "events" + suffix), Path(tmp, "items" + suffix)
        events_path.write_bytes(events)
        items_path.write_bytes(items)
        try:
            ds = load_generic(events_path, items_path)
        except Exception as exc:
            # ValueError includes UnicodeDecodeError, pyarrow's ArrowInvalid, ParserError
            assert isinstance(exc, ValueError), f"{type(exc).__name__}: {exc}"
            assert str(exc), "a ValueError must say what is wrong"
            return
        counts = ds.report.counts
        assert len(ds.events) == counts["events_kept"] <= counts["events_read"]
        assert len(ds.items) <= counts["items_read"]
        assert set(ds.events["item_id"]) <= set(ds.items["item_id"])
        ds.report.summary()  # the report itself must render


@FUZZ
@given(
    events=csv_bytes(["user_id", "item_id", "event_type", "timestamp", "value"]),
    items=csv_bytes(["item_id", "title", "categories", "description"]),
    suffix=st.sampled_from([".csv", ".tsv"]),
)
def test_csv_loader_never_crashes(events: bytes, items: bytes, suffix: str) -> None:
    _load(events, items, suffix)


@FUZZ
@given(
    events=parquet_bytes(["user_id", "item_id", "event_type", "timestamp", "value"]),
    items=parquet_bytes(["item_id", "title", "categories", "created_at"]),
)
def test_parquet_loader_never_crashes(events: bytes, items: bytes) -> None:
    _load(events, items, ".parquet")


def test_duplicate_columns_are_a_value_error(tmp_path: Path) -> None:
    (tmp_path / "items.csv").write_text("item_id,id,title\n1,2,a\n")
    (tmp_path / "events.csv").write_text("user_id,item_id,event_type,timestamp\nu,1,view,1\n")
    with pytest.raises(ValueError, match="column"):
        load_generic(tmp_path / "events.csv", tmp_path / "items.csv")


def test_parquet_numeric_categories_load(tmp_path: Path) -> None:
    items = pa.table({"item_id": ["1", "2"], "categories": [1.0, None]})
    pq.write_table(items, tmp_path / "i.pq")
    events = pa.table(
        {"user_id": ["u"], "item_id": ["1"], "event_type": ["view"], "timestamp": [1]}
    )
    pq.write_table(events, tmp_path / "e.pq")
    ds = load_generic(tmp_path / "e.pq", tmp_path / "i.pq")
    assert len(ds.items) == 2  # or a ValueError naming the column; not a TypeError
