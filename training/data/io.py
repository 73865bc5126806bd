"""Reading CSV and Parquet tables into string frames that remember where each row came from.

Every frame returned here has one column per requested field (raw values, strings for CSV)
plus ``_line``: the 1-based physical line a CSV row starts on (header = line 1; CRLF, LF and
quoted multi-line fields are handled by :mod:`csv`) or the 1-based row number of a Parquet
row. Rows whose field count does not match the header are reported, never dropped silently.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from training.data.schema import LoadReport

PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv", ".tsv", ".txt")
LINE = "_line"


def _norm_header(name: str) -> str:
    return name.strip().lstrip("\ufeff").strip().lower()


def read_table(
    path: str | Path,
    *,
    required: Sequence[str],
    optional: Sequence[str] = (),
    rename: dict[str, str] | None = None,
    report: LoadReport,
    counter_prefix: str,
    keep_extra: bool = False,
) -> pd.DataFrame:
    """Read ``path`` (CSV/TSV or Parquet by suffix) keeping ``required`` + ``optional`` columns.

    ``rename`` maps normalised (lower-cased, stripped) header names to schema names before the
    column check. Missing required columns raise :class:`ValueError` (a file-level problem);
    bad rows go to ``report`` as malformed with their line number. ``keep_extra`` keeps the
    other columns too (used for generic item free-text fields).
    """
    path = Path(path)
    rename = rename or {}
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        df = pq.read_table(path).to_pandas()
        df.columns = [rename.get(_norm_header(str(c)), _norm_header(str(c))) for c in df.columns]
        df[LINE] = range(1, len(df) + 1)
        report.counts[f"{counter_prefix}_read"] += len(df)
    elif suffix in CSV_SUFFIXES:
        df = _read_csv(path, rename=rename, report=report, counter_prefix=counter_prefix)
    else:
        raise ValueError(f"{path}: unsupported file type {suffix!r} (use .csv or .parquet)")
    duplicated = sorted({c for c in df.columns if list(df.columns).count(c) > 1})
    if duplicated:
        raise ValueError(
            f"{path}: column(s) {duplicated} appear more than once (after header aliasing)"
        )
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(
            f"{path}: missing required column(s) {missing}; found {list(df.columns)[:-1]}"
        )
    wanted = [*required, *[c for c in optional if c in df.columns]]
    extra = [c for c in df.columns if c not in wanted and c != LINE]
    if extra and not keep_extra:
        report.notes.append(f"{path.name}: ignored column(s) {extra}")
    cols = [*wanted, *(extra if keep_extra else []), LINE]
    return df[cols].reset_index(drop=True)


def _read_csv(
    path: Path, *, rename: dict[str, str], report: LoadReport, counter_prefix: str
) -> pd.DataFrame:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    rows: list[list[str]] = []
    lines: list[int] = []
    with path.open("r", encoding="utf-8-sig", newline="", errors="replace") as fh:
        reader = csv.reader(fh, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            raise ValueError(f"{path}: empty file (no header row)") from None
        columns = [rename.get(_norm_header(h), _norm_header(h)) for h in header]
        n = len(columns)
        prev_end = reader.line_num
        read = 0
        try:
            for row in reader:
                start = prev_end + 1
                prev_end = reader.line_num
                if not row or (len(row) == 1 and not row[0].strip()):
                    report.counts["blank_lines"] += 1
                    continue
                read += 1
                if len(row) != n:
                    report.add_malformed(
                        path.name, start, f"field count: expected {n}, got {len(row)}"
                    )
                    continue
                rows.append(row)
                lines.append(start)
        except csv.Error as exc:  # e.g. unterminated quote at end of file
            report.add_malformed(path.name, prev_end + 1, f"csv error: {exc}")
    report.counts[f"{counter_prefix}_read"] += read
    df = (
        pd.DataFrame(rows, columns=columns, dtype=object)
        if rows
        else pd.DataFrame({c: pd.Series([], dtype=object) for c in columns})
    )
    df[LINE] = pd.Series(lines, dtype="int64")
    return df
