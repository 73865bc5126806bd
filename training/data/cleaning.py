"""Cleaning shared by every loader: ids, event types, values, timestamps, duplicates, items.

Rules (all reported in the :class:`~training.data.schema.LoadReport`, none silent):

* ids are stripped strings; an empty id makes the row malformed. Integral floats from
  Parquet (``1.0``) become ``"1"``.
* event types are lower-cased and mapped through
  :data:`~training.data.schema.EVENT_TYPE_ALIASES`; anything else is malformed, an
  impression with its own reason (it records what was shown, not what the user did).
* ``value`` must be numeric or empty; a ``rating`` needs a value in ``[0, rating_max]``.
* timestamps: numbers are epoch seconds, milliseconds, microseconds or nanoseconds chosen
  by magnitude (``< 1e11`` s, ``< 1e14`` ms, ``< 1e17`` us, else ns); strings are ISO 8601
  (or any format pandas parses); naive times are taken as UTC; all become
  ``datetime64[ns, UTC]``. Unparseable times make the row malformed.
* events whose ``item_id`` is not in the items table are malformed ("unknown item_id").
* exact duplicates (same user, item, type, timestamp and value) collapse into one row;
  near duplicates (same user, item and type, each within ``near_duplicate_window`` of the
  previous one) collapse into the *latest* row (its timestamp and value win: a re-rating
  is the user's final opinion). Collapsed rows are listed with the line they merged into.
* rows out of time order within a user are counted (``out_of_order_events``) and sorted.
* text is NFKC-normalised with whitespace collapsed; categories are split on ``|`` (CSV),
  de-duplicated, and "(no genres listed)" dropped. Repeated item ids: the last row wins.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from core.events import ImplicitRule
from core.text import normalize_categories, normalize_text
from training.data.io import LINE
from training.data.schema import (
    EVENT_TYPE_ALIASES,
    EXPOSURE_EVENT_TYPES,
    LoadReport,
    empty_events,
)

DEFAULT_NEAR_DUPLICATE_WINDOW = pd.Timedelta(seconds=60)


def clean_ids(col: pd.Series) -> pd.Series:
    """Ids as stripped strings ("" when missing)."""
    if pd.api.types.is_float_dtype(col.dtype):
        integral = col.notna() & (col == np.floor(col.fillna(0)))
        out = col.astype(object).where(col.notna(), "")
        out[integral] = col[integral].astype("int64").astype(str)
        return out.astype(str).str.strip()
    if pd.api.types.is_integer_dtype(col.dtype):
        return col.astype(str)
    return col.astype(object).where(col.notna(), "").astype(str).str.strip()


def parse_timestamps(col: pd.Series) -> pd.Series:
    """Anything timestamp-like to ``datetime64[ns, UTC]``; NaT where unparseable."""
    # zone-aware, numpy- or pyarrow-backed (a Parquet file written from Arrow-backed frames)
    if isinstance(col.dtype, pd.DatetimeTZDtype) or (
        pd.api.types.is_datetime64_any_dtype(col.dtype) and col.dt.tz is not None
    ):
        return col.dt.tz_convert("UTC").astype("datetime64[ns, UTC]")
    if pd.api.types.is_datetime64_any_dtype(col.dtype):
        return col.dt.tz_localize("UTC").astype("datetime64[ns, UTC]")
    out = pd.Series(pd.NaT, index=col.index, dtype="datetime64[ns, UTC]")
    as_str = col.astype(object).where(col.notna(), "").astype(str).str.strip()
    num = pd.to_numeric(as_str.where(as_str != "", None), errors="coerce")
    is_num = num.notna() & np.isfinite(num.astype("float64"))
    if is_num.any():
        v = num[is_num].astype("float64")
        mag = v.abs()
        for lo, hi, unit in (
            (0, 1e11, "s"),
            (1e11, 1e14, "ms"),
            (1e14, 1e17, "us"),
            (1e17, np.inf, "ns"),
        ):
            sel = (mag >= lo) & (mag < hi)
            if sel.any():
                out[sel[sel].index] = pd.to_datetime(
                    v[sel], unit=unit, utc=True, errors="coerce"
                ).astype("datetime64[ns, UTC]")
    rest = ~is_num & (as_str != "")
    if rest.any():
        s = as_str[rest]
        parsed = pd.to_datetime(s, utc=True, errors="coerce", format="ISO8601")
        bad = parsed.isna()
        if bad.any():
            parsed[bad] = pd.to_datetime(s[bad], utc=True, errors="coerce", format="mixed")
        out[rest] = parsed.astype("datetime64[ns, UTC]")
    return out


def _report_rows(
    report: LoadReport, file: str, lines: Iterable[int], reasons: Iterable[str], kind: str
) -> None:
    add = {
        "malformed": report.add_malformed,
        "collapsed": report.add_collapsed,
        "warning": report.add_warning,
    }[kind]
    for line, reason in zip(lines, reasons, strict=True):
        add(file, int(line), reason)


def clean_events(
    raw: pd.DataFrame,
    *,
    file: str,
    known_items: set[str] | None,
    report: LoadReport,
    rule: ImplicitRule = ImplicitRule(),  # noqa: B008 - frozen dataclass
    near_duplicate_window: pd.Timedelta | None = DEFAULT_NEAR_DUPLICATE_WINDOW,
) -> pd.DataFrame:
    """Raw event rows (``user_id, item_id, event_type, timestamp[, value], _line``) to the
    :class:`~training.data.schema.Dataset` events schema. See the module docstring."""
    if raw.empty:
        return empty_events()
    df = pd.DataFrame(index=raw.index)
    df["user_id"] = clean_ids(raw["user_id"])
    df["item_id"] = clean_ids(raw["item_id"])
    et_raw = raw["event_type"].astype(object).where(raw["event_type"].notna(), "")
    et_raw = et_raw.astype(str).str.strip()
    et_lower = et_raw.str.lower()
    df["event_type"] = et_lower.map(EVENT_TYPE_ALIASES)
    if "value" in raw.columns:
        v_raw = raw["value"].astype(object).where(raw["value"].notna(), "")
        v_str = v_raw.astype(str).str.strip()
        df["value"] = pd.to_numeric(v_str.where(v_str != "", None), errors="coerce").astype(
            "float64"
        )
        bad_value = (v_str != "") & df["value"].isna()
    else:
        df["value"] = np.nan
        bad_value = pd.Series(False, index=df.index)
    df["timestamp"] = parse_timestamps(raw["timestamp"])
    df[LINE] = raw[LINE].to_numpy()

    reasons = pd.Series("", index=df.index, dtype=object)

    def flag(mask: pd.Series, reason: pd.Series | str) -> None:
        sel = mask & (reasons == "")
        if sel.any():
            reasons[sel] = reason[sel] if isinstance(reason, pd.Series) else reason

    flag(df["user_id"] == "", "missing user_id")
    flag(df["item_id"] == "", "missing item_id")
    flag(
        et_lower.isin(EXPOSURE_EVENT_TYPES),
        "event_type "
        + et_raw.map(repr)
        + " records what was shown, not behaviour: shown items go in exposures.parquet",
    )
    flag(df["event_type"].isna(), "unknown event_type: " + et_raw.map(repr))
    flag(bad_value, "bad value: " + raw.get("value", pd.Series("", index=df.index)).map(repr))
    is_rating = df["event_type"] == "rating"
    flag(is_rating & df["value"].isna(), "bad rating: missing value")
    flag(
        is_rating & ((df["value"] < 0) | (df["value"] > rule.rating_max)),
        "bad rating: " + df["value"].astype(str) + f" outside [0, {rule.rating_max:g}]",
    )
    flag(df["timestamp"].isna(), "bad timestamp: " + raw["timestamp"].astype(str).map(repr))
    if known_items is not None:
        unknown = (reasons == "") & ~df["item_id"].isin(known_items)
        report.counts["unknown_item_events"] += int(unknown.sum())
        flag(unknown, "unknown item_id: " + df["item_id"].map(repr))
    bad = reasons != ""
    _report_rows(report, file, df.loc[bad, LINE], reasons[bad], "malformed")
    report.counts["malformed_events"] += int(bad.sum())
    df = df[~bad].copy()

    # out-of-order rows (file order) within each user - counted, then fixed by sorting
    prev = df.groupby("user_id", sort=False)["timestamp"].shift()
    report.counts["out_of_order_events"] += int((df["timestamp"] < prev).sum())

    df = _collapse_duplicates(df, file=file, report=report, window=near_duplicate_window)
    df["weight"] = rule.weights(df["event_type"], df["value"])
    df = df.sort_values(["timestamp", "user_id", LINE], kind="stable")
    report.counts["events_kept"] += len(df)
    out = df[["user_id", "item_id", "event_type", "timestamp", "value", "weight"]]
    return out.reset_index(drop=True)


def _collapse_duplicates(
    df: pd.DataFrame, *, file: str, report: LoadReport, window: pd.Timedelta | None
) -> pd.DataFrame:
    key = ["user_id", "item_id", "event_type"]
    df = df.sort_values([*key, "timestamp", LINE], kind="stable")
    # exact duplicates: keep the first occurrence in the file
    vkey = df["value"].fillna(-np.inf)
    exact = df.assign(_v=vkey).duplicated([*key, "timestamp", "_v"], keep="first")
    if exact.any():
        first_line = (
            df.assign(_v=vkey)
            .groupby([*key, "timestamp", "_v"], sort=False)[LINE]
            .transform("first")
        )
        _report_rows(
            report,
            file,
            df.loc[exact, LINE],
            ("exact duplicate of line " + first_line[exact].astype(str)),
            "collapsed",
        )
        report.counts["exact_duplicates"] += int(exact.sum())
        df = df[~exact]
    if window is None or df.empty:
        return df
    same_key = (df[key] == df[key].shift()).all(axis=1)
    gap = df["timestamp"] - df["timestamp"].shift()
    new_cluster = ~(same_key & (gap <= window))
    cluster = new_cluster.cumsum()
    last = ~cluster.duplicated(keep="last")
    near = ~last
    if near.any():
        kept_line = df[LINE].groupby(cluster).transform("last")
        _report_rows(
            report,
            file,
            df.loc[near, LINE],
            ("near duplicate of line " + kept_line[near].astype(str)),
            "collapsed",
        )
        report.counts["near_duplicates"] += int(near.sum())
    return df[last]


def clean_items(
    raw: pd.DataFrame,
    *,
    file: str,
    report: LoadReport,
    text_columns: list[str] | None = None,
    category_sep: str = "|",
) -> pd.DataFrame:
    """Raw item rows (``item_id[, title, categories, created_at, <text columns>], _line``) to
    the items schema. ``text_columns``: the free-text fields, joined in order as
    ``"<value>"`` for ``text``/``description`` and ``"<Column>: <value>"`` for others."""
    if raw.empty:
        return pd.DataFrame(
            {
                "item_id": pd.Series([], dtype=object),
                "title": pd.Series([], dtype=object),
                "categories": pd.Series([], dtype=object),
                "text": pd.Series([], dtype=object),
                "created_at": pd.Series([], dtype="datetime64[ns, UTC]"),
            }
        )
    df = pd.DataFrame(index=raw.index)
    df["item_id"] = clean_ids(raw["item_id"])
    df["title"] = raw["title"].map(normalize_text) if "title" in raw else ""
    if "categories" in raw:
        df["categories"] = [normalize_categories(c, category_sep) for c in raw["categories"]]
    else:
        df["categories"] = [[] for _ in range(len(raw))]
    texts: list[list[str]] = [[] for _ in range(len(raw))]
    for col in text_columns or []:
        plain = col in ("text", "description")
        for k, v in enumerate(raw[col].map(normalize_text)):
            if v:
                texts[k].append(v if plain else f"{col.replace('_', ' ').capitalize()}: {v}")
    df["text"] = [" ".join(_sentences(t)) for t in texts]
    if "created_at" in raw:
        created = parse_timestamps(raw["created_at"])
        bad = (
            created.isna()
            & raw["created_at"].notna()
            & (raw["created_at"].astype(str).str.strip() != "")
        )
        _report_rows(
            report,
            file,
            raw.loc[bad, LINE],
            ("bad created_at (set to NaT): " + raw.loc[bad, "created_at"].astype(str)),
            "warning",
        )
        df["created_at"] = created
    else:
        df["created_at"] = pd.Series(pd.NaT, index=raw.index, dtype="datetime64[ns, UTC]")
    df[LINE] = raw[LINE].to_numpy()

    missing = df["item_id"] == ""
    _report_rows(
        report, file, df.loc[missing, LINE], ["missing item_id"] * int(missing.sum()), "malformed"
    )
    report.counts["malformed_items"] += int(missing.sum())
    df = df[~missing]
    dup = df.duplicated("item_id", keep="last")
    if dup.any():
        kept = df.groupby("item_id")[LINE].transform("last")
        _report_rows(
            report,
            file,
            df.loc[dup, LINE],
            "duplicate item_id, replaced by line " + kept[dup].astype(str),
            "collapsed",
        )
        report.counts["duplicate_items"] += int(dup.sum())
        df = df[~dup]
    report.counts["empty_titles"] += int((df["title"] == "").sum())
    report.counts["items_kept"] += len(df)
    return df.drop(columns=[LINE]).reset_index(drop=True)


def _sentences(parts: list[str]) -> list[str]:
    return [
        p if p.endswith((".", "!", "?")) or i == len(parts) - 1 else p + "."
        for i, p in enumerate(parts)
    ]
