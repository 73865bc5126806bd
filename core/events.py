"""Behaviour events and the implicit-feedback rule, the same offline and online.

Training data and events ingested by the gateway go through one :class:`ImplicitRule`, so a
profile updated online and one indexed from the training period weigh behaviour alike:

* ``rating``: ``weight = value / rating_max`` when ``value >= rating_threshold`` (3.5 on the
  5-star MovieLens scale, so 3.5 -> 0.7, 4 -> 0.8, 5 -> 1.0), else ``0`` (a rating below the
  threshold is an explicit *negative*).
* ``purchase``: 1.0, ``click``: 0.5, ``view``: 0.2 (``value`` does not change these weights).

A row is a *positive* when ``weight > 0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import pandas as pd

EVENT_TYPES: Final = ("view", "click", "rating", "purchase")


@dataclass(frozen=True)
class ImplicitRule:
    """Turns an event into an implicit-feedback weight in [0, 1] (see module docstring)."""

    rating_max: float = 5.0
    rating_threshold: float = 3.5
    view: float = 0.2
    click: float = 0.5
    purchase: float = 1.0

    def weights(self, event_type: pd.Series, value: pd.Series) -> pd.Series:
        """Vectorised weights for aligned ``event_type`` / ``value`` columns."""
        out = pd.Series(0.0, index=event_type.index, dtype="float64")
        out[event_type == "view"] = self.view
        out[event_type == "click"] = self.click
        out[event_type == "purchase"] = self.purchase
        is_rating = event_type == "rating"
        v = value.astype("float64")
        positive = is_rating & (v >= self.rating_threshold)
        out[positive] = (v[positive] / self.rating_max).clip(0.0, 1.0)
        out[is_rating & ~positive] = 0.0
        return out
