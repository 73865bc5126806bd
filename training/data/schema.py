"""In-memory schema every loader produces, the load report and the implicit-feedback rule.

Events (``Dataset.events``), one row per cleaned interaction:

==============  ========================  ==================================================
column          dtype                     meaning
==============  ========================  ==================================================
``user_id``     str (object)              user identifier, whitespace-stripped
``item_id``     str (object)              item identifier, present in ``Dataset.items``
``event_type``  str (object)              one of :data:`core.events.EVENT_TYPES`
``timestamp``   ``datetime64[ns, UTC]``   normalised event time
``value``       float64                   rating or other numeric payload; NaN when none
``weight``      float64                   implicit-feedback strength in [0, 1] (see below);
                                          0 is a negative signal (e.g. a low rating)
==============  ========================  ==================================================

Items (``Dataset.items``), one row per item id:

==============  ========================  ==================================================
``item_id``     str (object)              item identifier
``title``       str (object)              normalised title ("" when unknown)
``categories``  list[str] (object)        ordered, de-duplicated; [] when none
``text``        str (object)              extra free text (MovieLens: "Tags: a, b"); "" if none
``created_at``  ``datetime64[ns, UTC]``   NaT when unknown
==============  ========================  ==================================================

Implicit-feedback rule (:class:`core.events.ImplicitRule`, shared with the gateway):

* ``rating``: ``weight = value / rating_max`` when ``value >= rating_threshold`` (3.5 on the
  5-star MovieLens scale, so 3.5 -> 0.7, 4 -> 0.8, 5 -> 1.0), else ``0`` (a rating below the
  threshold is an explicit *negative*). Ratings outside ``[0, rating_max]`` are malformed.
* ``purchase``: 1.0, ``click``: 0.5, ``view``: 0.2 (``value`` does not change these weights).

A row is a *positive* when ``weight > 0``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Final

import pandas as pd

#: Accepted spellings of event types in input files (lower-cased before lookup).
EVENT_TYPE_ALIASES: Final[dict[str, str]] = {
    "view": "view",
    "views": "view",
    "click": "click",
    "clicks": "click",
    # a play of a track or a video is a consumption, as a click on a product page is; so is
    # putting an item in the cart (Retailrocket-style logs: view, addtocart, transaction)
    "play": "click",
    "plays": "click",
    "listen": "click",
    "stream": "click",
    "addtocart": "click",
    "add_to_cart": "click",
    "rating": "rating",
    "rate": "rating",
    "rated": "rating",
    "purchase": "purchase",
    "buy": "purchase",
    "order": "purchase",
    "transaction": "purchase",
}

#: Event types that record what was *shown*, not what the user did: counted as views they
#: would teach every model that being shown is being liked. Rejected with a pointer to where
#: shown items belong (``exposures.parquet``, :mod:`training.data.exposures`).
EXPOSURE_EVENT_TYPES: Final = frozenset({"impression", "impressions", "exposure", "shown"})

EVENT_COLUMNS: Final = ("user_id", "item_id", "event_type", "timestamp", "value", "weight")
ITEM_COLUMNS: Final = ("item_id", "title", "categories", "text", "created_at")


@dataclass(frozen=True)
class MalformedRow:
    """One input row and what happened to it.

    ``line_number`` is the physical 1-based line where the row starts in a CSV file (the
    header is line 1), or the 1-based row number in a Parquet file.
    """

    file: str
    line_number: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line_number}: {self.reason}"


@dataclass
class LoadReport:
    """What loading did: every skipped row with its line number, and counters.

    ``counts`` keys used by the loaders: ``events_read``, ``events_kept``, ``items_read``,
    ``items_kept``, ``exact_duplicates``, ``near_duplicates``, ``duplicate_items``,
    ``unknown_item_events``, ``malformed_events``, ``malformed_items``, ``blank_lines``,
    ``empty_titles``, ``out_of_order_events`` (rows whose timestamp is earlier than the
    previous row of the same user in file order; kept and sorted, only counted).
    """

    #: rows that were not used at all (bad fields, unknown ids, ...)
    malformed: list[MalformedRow] = field(default_factory=list)
    #: rows merged into another row (exact or near duplicates, repeated item ids)
    collapsed: list[MalformedRow] = field(default_factory=list)
    #: rows kept with a field repaired or blanked (e.g. unparseable ``created_at`` -> NaT)
    warnings: list[MalformedRow] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)

    def add_malformed(self, file: str, line_number: int, reason: str) -> None:
        self.malformed.append(MalformedRow(file, int(line_number), reason))

    def add_collapsed(self, file: str, line_number: int, reason: str) -> None:
        self.collapsed.append(MalformedRow(file, int(line_number), reason))

    def add_warning(self, file: str, line_number: int, reason: str) -> None:
        self.warnings.append(MalformedRow(file, int(line_number), reason))

    def by_reason(self) -> Counter[str]:
        """Malformed rows counted by reason prefix (text before the first ':')."""
        return Counter(m.reason.split(":", 1)[0] for m in self.malformed)

    def summary(self, max_rows: int = 20) -> str:
        lines = ["Load report:"]
        for key in sorted(self.counts):
            lines.append(f"  {key}: {self.counts[key]}")
        if self.malformed:
            lines.append(f"  malformed rows: {len(self.malformed)}")
            for reason, n in self.by_reason().most_common():
                lines.append(f"    {reason}: {n}")
            for m in self.malformed[:max_rows]:
                lines.append(f"    {m}")
            if len(self.malformed) > max_rows:
                lines.append(f"    ... {len(self.malformed) - max_rows} more")
        if self.collapsed:
            lines.append(f"  collapsed rows: {len(self.collapsed)}")
            for m in self.collapsed[:max_rows]:
                lines.append(f"    {m}")
            if len(self.collapsed) > max_rows:
                lines.append(f"    ... {len(self.collapsed) - max_rows} more")
        if self.warnings:
            lines.append(f"  rows kept with warnings: {len(self.warnings)}")
            for m in self.warnings[:max_rows]:
                lines.append(f"    {m}")
        for note in self.notes:
            lines.append(f"  note: {note}")
        return "\n".join(lines)


@dataclass
class Dataset:
    """Cleaned events and items plus the report of what loading did."""

    events: pd.DataFrame
    items: pd.DataFrame
    report: LoadReport = field(default_factory=LoadReport)

    @property
    def positives(self) -> pd.DataFrame:
        """Events with ``weight > 0``."""
        return self.events[self.events["weight"] > 0]


def empty_events() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": pd.Series([], dtype=object),
            "item_id": pd.Series([], dtype=object),
            "event_type": pd.Series([], dtype=object),
            "timestamp": pd.Series([], dtype="datetime64[ns, UTC]"),
            "value": pd.Series([], dtype="float64"),
            "weight": pd.Series([], dtype="float64"),
        }
    )
