from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from core.events import EVENT_TYPES, ImplicitRule
from tests.training.conftest import MOVIELENS, write
from training.data import load_dataset, load_generic, load_movielens

MOVIES = """movieId,title,genres
1,Toy Story (1995),Adventure|Animation|Children
2,"Matrix, The (1999)",Action|Sci-Fi
3,"Multi
Line Title (2001)",(no genres listed)
4,  Spaces   In  Title  ,Drama|drama| Drama
5,,(no genres listed)
"""

RATINGS = """userId,movieId,rating,timestamp
1,1,4.0,964982703
1,2,5.0,964981247
1,3,2.0,964982224
2,1,3.5,1445714994
"""

TAGS = """userId,movieId,tag,timestamp
1,1,pixar,1445714994
2,1,Pixar,1445714995
2,1,fun,1445714996
2,2,,1445714997
2,99,ghost,1445714998
"""


def _ml(tmp_path: Path, *, ratings: str = RATINGS, crlf: bool = False) -> Path:
    write(tmp_path / "movies.csv", MOVIES, crlf=crlf)
    write(tmp_path / "ratings.csv", ratings, crlf=crlf)
    write(tmp_path / "tags.csv", TAGS, crlf=crlf)
    return tmp_path


def test_vendored_movielens_loads_cleanly() -> None:
    ds = load_movielens(MOVIELENS)
    assert len(ds.events) == 100836
    assert len(ds.items) == 9742
    assert ds.report.malformed == []
    assert ds.report.counts["events_read"] == ds.report.counts["events_kept"]
    assert str(ds.events["timestamp"].dtype) == "datetime64[ns, UTC]"
    assert set(ds.events["event_type"]) == {"rating"}
    assert ds.events["weight"].between(0, 1).all()
    assert not ds.items["title"].str.contains("\r").any()
    assert ds.events["timestamp"].is_monotonic_increasing
    toy = ds.items.set_index("item_id").loc["1"]
    assert toy["title"] == "Toy Story (1995)"
    assert toy["text"].startswith("Tags: pixar")
    assert "The Matrix (1999)" in set(ds.items["title"])
    assert ds.items["categories"].map(lambda c: "(no genres listed)" not in c).all()


@pytest.mark.parametrize("crlf", [False, True])
def test_movielens_crlf_and_lf_same_result(tmp_path: Path, crlf: bool) -> None:
    ds = load_movielens(_ml(tmp_path, crlf=crlf))
    items = ds.items.set_index("item_id")
    assert items.loc["3", "title"] == "Multi Line Title (2001)"
    assert items.loc["3", "categories"] == []
    assert items.loc["2", "title"] == "The Matrix (1999)"
    assert items.loc["4", "title"] == "Spaces In Title"
    assert items.loc["4", "categories"] == ["Drama"]
    assert items.loc["1", "text"] == "Tags: pixar, fun"  # case-insensitive dedupe, by count
    assert items.loc["1", "created_at"] == pd.Timestamp("1995-01-01", tz="UTC")
    assert pd.isna(items.loc["4", "created_at"])
    assert len(ds.events) == 4
    # empty title kept (reported), empty and unknown tags reported with their lines
    assert ds.report.counts["empty_titles"] == 1
    got = {(m.file, m.line_number, m.reason) for m in ds.report.malformed}
    assert ("tags.csv", 5, "empty tag") in got
    assert ("tags.csv", 6, "unknown item_id: '99'") in got


def test_movielens_malformed_rows_reported_with_line_numbers(tmp_path: Path) -> None:
    ratings = """userId,movieId,rating,timestamp
1,1,4.0,964982703
1,2,abc,964981247
1,3,4.0
,1,4.0,964982703
2,1,7.0,964982703
2,2,4.0,not-a-time

2,777,4.0,964982703
2,3,4.0,964982703,extra
3,1,4.5,964982800
"""
    ds = load_movielens(_ml(tmp_path, ratings=ratings, crlf=True))
    lines = {m.line_number: m.reason for m in ds.report.malformed if m.file == "ratings.csv"}
    assert lines[3].startswith("bad value")
    assert lines[4] == "field count: expected 4, got 3"
    assert lines[5] == "missing user_id"
    assert lines[6].startswith("bad rating")
    assert lines[7].startswith("bad timestamp")
    assert lines[9] == "unknown item_id: '777'"
    assert lines[10] == "field count: expected 4, got 5"
    assert len(lines) == 7
    assert ds.report.counts["blank_lines"] == 1
    assert ds.report.counts["unknown_item_events"] == 1
    assert len(ds.events) == 2
    # nothing silent: every data row is kept, malformed or collapsed
    c = ds.report.counts
    assert c["events_read"] == c["events_kept"] + len(lines) + len(ds.report.collapsed)
    assert "malformed rows: " in ds.report.summary()


def test_duplicates_exact_and_near(tmp_path: Path) -> None:
    events = """user_id,item_id,event_type,timestamp,value
u1,i1,click,2024-01-01T00:00:00Z,
u1,i1,click,2024-01-01T00:00:00Z,
u1,i1,rating,2024-01-01T00:00:00Z,3.0
u1,i1,rating,2024-01-01T00:00:30Z,4.5
u1,i1,rating,2024-01-01T00:01:20Z,5.0
u1,i1,rating,2024-01-01T02:00:00Z,1.0
u2,i1,click,2024-01-01T00:00:00Z,
"""
    items = "item_id,title\ni1,One\n"
    ds = load_generic(write(tmp_path / "events.csv", events), write(tmp_path / "items.csv", items))
    c = ds.report.counts
    assert c["exact_duplicates"] == 1
    assert c["near_duplicates"] == 2  # 00:00:00 -> 00:00:30 -> 00:01:20 chain (each < 60s)
    reasons = {m.line_number: m.reason for m in ds.report.collapsed}
    assert reasons[3] == "exact duplicate of line 2"
    assert reasons[4] == "near duplicate of line 6"
    assert reasons[5] == "near duplicate of line 6"
    ev = ds.events
    ratings = ev[(ev.user_id == "u1") & (ev.event_type == "rating")].sort_values("timestamp")
    assert ratings["value"].tolist() == [5.0, 1.0]  # latest value of the cluster wins
    assert len(ev) == 4


def test_near_duplicate_window_configurable(tmp_path: Path) -> None:
    events = "user_id,item_id,event_type,timestamp\nu,i,view,0\nu,i,view,100\n"
    e = write(tmp_path / "events.csv", events)
    i = write(tmp_path / "items.csv", "item_id\ni\n")
    assert len(load_generic(e, i).events) == 2
    assert len(load_generic(e, i, near_duplicate_window=pd.Timedelta("5min")).events) == 1
    assert len(load_generic(e, i, near_duplicate_window=None).events) == 2


def test_out_of_order_timestamps_counted_and_sorted(tmp_path: Path) -> None:
    events = """user_id,item_id,event_type,timestamp
u1,i2,view,2024-01-03
u1,i1,view,2024-01-01
u1,i3,view,2024-01-02
u2,i1,view,2023-12-31
"""
    ds = load_generic(
        write(tmp_path / "events.csv", events),
        write(tmp_path / "items.csv", "item_id\ni1\ni2\ni3\n"),
    )
    assert ds.report.counts["out_of_order_events"] == 1
    assert ds.events["timestamp"].is_monotonic_increasing
    assert ds.events["item_id"].tolist() == ["i1", "i1", "i3", "i2"]


def _generic_frames() -> tuple[pd.DataFrame, pd.DataFrame]:
    events = pd.DataFrame(
        {
            "user_id": ["u1", "u1", "u2", "u2", "u3", "u3"],
            "item_id": ["a", "b", "a", "c", "zzz", "b"],
            "event_type": ["Purchase", "view", "rate", "click", "view", "teleport"],
            "timestamp": [
                "2024-05-01T10:00:00Z",
                "1714557600000",  # epoch ms
                "2024-05-01 12:00:00",  # naive -> UTC
                "1714557601",  # epoch s
                "2024-05-01T10:00:00+02:00",
                "2024-05-01T10:00:00Z",
            ],
            "value": ["", "", "4", "", "", ""],
        }
    )
    items = pd.DataFrame(
        {
            "item_id": ["a", "b", "c", "b"],
            "title": ["  Trail   shoe ", "Tent", "", "Tent v2"],
            "categories": ["Shoes|Running", "", "Camping", "Camping|Outdoor"],
            "description": ["Light, grippy", "", "", "Sleeps 2"],
            "brand": ["Acme", "", "", "Acme"],
            "created_at": ["2020-01-01", "garbage", "", "2021-06-01T00:00:00Z"],
        }
    )
    return events, items


def _check_generic(ds: object, header_lines: int) -> None:
    """``header_lines``: 1 for CSV (line numbers count the header), 0 for Parquet (row
    numbers)."""
    from training.data.schema import Dataset

    assert isinstance(ds, Dataset)
    ev, it = ds.events, ds.items.set_index("item_id")
    assert list(ev.columns) == ["user_id", "item_id", "event_type", "timestamp", "value", "weight"]
    assert set(ev["event_type"]) <= set(EVENT_TYPES)
    assert len(ev) == 4
    by = {(r.user_id, r.item_id): r for r in ev.itertuples()}
    assert by[("u1", "a")].event_type == "purchase" and by[("u1", "a")].weight == 1.0
    assert by[("u1", "b")].timestamp == pd.Timestamp("2024-05-01T10:00:00Z")
    assert by[("u2", "a")].timestamp == pd.Timestamp("2024-05-01T12:00:00Z")
    assert by[("u2", "a")].value == 4.0 and by[("u2", "a")].weight == pytest.approx(0.8)
    assert by[("u2", "c")].timestamp == pd.Timestamp("2024-05-01T10:00:01Z")
    assert it.loc["a", "title"] == "Trail shoe"
    assert it.loc["a", "categories"] == ["Shoes", "Running"]
    assert it.loc["a", "text"] == "Light, grippy. Brand: Acme"
    assert it.loc["b", "title"] == "Tent v2"  # repeated id: last row wins
    assert it.loc["c", "title"] == ""
    assert pd.isna(it.loc["c", "created_at"])
    r = ds.report
    assert r.counts["duplicate_items"] == 1
    assert r.counts["unknown_item_events"] == 1
    reasons = {m.line_number: m.reason for m in r.malformed}
    assert len(reasons) == 2
    assert [w.reason for w in r.warnings] == ["bad created_at (set to NaT): garbage"]
    assert reasons[5 + header_lines] == "unknown item_id: 'zzz'"
    assert reasons[6 + header_lines] == "unknown event_type: 'teleport'"


def test_generic_csv(tmp_path: Path) -> None:
    events, items = _generic_frames()
    events.to_csv(tmp_path / "events.csv", index=False)
    items.to_csv(tmp_path / "items.csv", index=False)
    ds = load_generic(tmp_path / "events.csv", tmp_path / "items.csv")
    _check_generic(ds, header_lines=1)


def test_generic_parquet(tmp_path: Path) -> None:
    events, items = _generic_frames()
    events.to_parquet(tmp_path / "events.parquet")
    items = items.assign(categories=[c.split("|") if c else [] for c in items["categories"]])
    items.to_parquet(tmp_path / "items.parquet")
    ds = load_dataset(tmp_path)  # auto-detects the generic layout
    _check_generic(ds, header_lines=0)


def test_a_music_log_loads_and_impressions_are_refused_as_behaviour(tmp_path: Path) -> None:
    """``play`` is a click; an impression is what was shown, which as a view would be a
    positive: it is refused with a reason that says where shown items go."""
    pd.DataFrame({"item_id": ["a", "b"], "title": ["Song", "Other song"]}).to_csv(
        tmp_path / "items.csv", index=False
    )
    pd.DataFrame(
        {
            "user_id": ["u1", "u1", "u1", "u2"],
            "item_id": ["a", "b", "a", "b"],
            "event_type": ["play", "Listen", "impression", "stream"],
            "timestamp": [1714557600, 1714557900, 1714558200, 1714557600],
        }
    ).to_csv(tmp_path / "events.csv", index=False)
    ds = load_generic(tmp_path / "events.csv", tmp_path / "items.csv")
    assert ds.events["event_type"].tolist() == ["click"] * 3
    assert (ds.events["weight"] == 0.5).all()
    (bad,) = ds.report.malformed
    assert bad.line_number == 4 and "shown" in bad.reason and "exposures.parquet" in bad.reason


def test_parquet_native_types(tmp_path: Path) -> None:
    ev = pd.DataFrame(
        {
            "user_id": [1, 2],
            "item_id": [10, 10],
            "event_type": ["click", "view"],
            "timestamp": pd.to_datetime(["2024-01-01 00:00", "2024-01-02 00:00"]),  # naive
            "value": [None, 2.5],
        }
    )
    ev.to_parquet(tmp_path / "events.parquet")
    pd.DataFrame({"item_id": [10], "title": ["Ten"]}).to_parquet(tmp_path / "items.parquet")
    ds = load_dataset(tmp_path)
    assert ds.events["user_id"].tolist() == ["1", "2"]
    assert ds.events["item_id"].tolist() == ["10", "10"]
    assert ds.events["timestamp"].iloc[0] == pd.Timestamp("2024-01-01", tz="UTC")


def test_missing_required_column_is_an_error(tmp_path: Path) -> None:
    e = write(tmp_path / "events.csv", "user_id,item_id,timestamp\nu,i,0\n")
    i = write(tmp_path / "items.csv", "item_id\ni\n")
    with pytest.raises(ValueError, match="event_type"):
        load_generic(e, i)


def test_load_dataset_detects_layouts(tmp_path: Path) -> None:
    assert len(load_dataset(_ml(tmp_path / "ml")).items) == 5
    with pytest.raises(ValueError, match="no dataset found"):
        load_dataset(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_dataset(tmp_path / "nope")


def test_implicit_rule() -> None:
    rule = ImplicitRule()
    et = pd.Series(["rating"] * 5 + ["view", "click", "purchase"])
    val = pd.Series([0.5, 3.0, 3.5, 4.0, 5.0, None, None, 99.0])
    assert rule.weights(et, val).tolist() == pytest.approx([0, 0, 0.7, 0.8, 1.0, 0.2, 0.5, 1.0])
    ten = ImplicitRule(rating_max=10, rating_threshold=6)
    assert ten.weights(pd.Series(["rating", "rating"]), pd.Series([5.0, 8.0])).tolist() == [
        0.0,
        0.8,
    ]


def test_empty_events_file(tmp_path: Path) -> None:
    e = write(tmp_path / "events.csv", "user_id,item_id,event_type,timestamp\n")
    i = write(tmp_path / "items.csv", "item_id,title\ni,\n")
    ds = load_generic(e, i)
    assert ds.events.empty and list(ds.events.columns)[-1] == "weight"
    assert ds.items["title"].tolist() == [""]


@pytest.mark.parametrize("tz", [None, "UTC", "Europe/Paris"])
def test_arrow_backed_timestamps_of_any_zone_parse_to_utc(tz: str | None) -> None:
    """A Parquet file written from pyarrow-backed frames reads back with Arrow timestamp
    dtypes; a zone-aware one used to fail ("Timestamps already have a timezone")."""
    import pyarrow as pa

    from training.data.cleaning import parse_timestamps

    moment = pd.Timestamp("2020-01-01 00:00:01", tz="UTC")
    value = moment if tz else moment.tz_localize(None)
    col = pd.Series(pd.array([value, None], dtype=pd.ArrowDtype(pa.timestamp("us", tz=tz))))
    parsed = parse_timestamps(col)
    assert str(parsed.dtype) == "datetime64[ns, UTC]"
    assert parsed.iloc[0] == moment and parsed.isna().iloc[1]
