"""The next-items protocol: the same fold-in point, targets in the near future."""

from __future__ import annotations

import pandas as pd

from tests.training.evaluation.conftest import rating_events
from training.data.schema import Dataset
from training.evaluation.protocol import NEXT_ITEMS, make_split, next_targets

DAY = 86400


def test_next_items_are_the_next_ten_unseen_positives_ties_kept() -> None:
    # positives one day apart; i10 and i11 share i9's second; one seen item, one negative
    rows = [("u", f"i{n}", n * DAY, 1.0) for n in range(13)]
    rows[10] = ("u", "i10", 9 * DAY, 1.0)  # the 10th unseen positive ...
    rows[11] = ("u", "i11", 9 * DAY, 1.0)  # ... and the 11th in the same second
    rows.append(("u", "neg", 2 * DAY, 0.0))
    later = rating_events(rows).sort_values("timestamp", kind="stable")
    nxt, window = next_targets(later, {"i0"}, pd.Timestamp(0, unit="s", tz="UTC"))
    assert NEXT_ITEMS == 10
    # i0 seen, neg negative: i1..i10 are the next ten, i11 ties the 10th, i12 is later
    assert nxt == {f"i{n}" for n in range(1, 12)}
    assert "i12" not in nxt and "neg" not in nxt
    assert window == {f"i{n}" for n in range(1, 13)}  # all within 30 days of day 0


def test_window_counts_from_the_fold_in_point() -> None:
    later = rating_events([("u", "a", 10 * DAY, 1.0), ("u", "b", 45 * DAY, 1.0)])
    nxt, window = next_targets(later, set(), pd.Timestamp(5 * DAY, unit="s", tz="UTC"))
    assert nxt == {"a", "b"}
    assert window == {"a"}  # b is 40 days after the anchor


def test_split_gives_both_protocols_the_same_users() -> None:
    train = [("w", f"t{n}", n, 1.0) for n in range(10)] + [("x", "t0", 5, 1.0)]
    test = [("w", f"s{n}", 1000 + n * DAY, 1.0) for n in range(15)]  # warm user
    test += [("c", f"s{n}", 1000 + n * DAY, 1.0) for n in range(5)]  # new user, cold
    test += [("c", "far", 1000 + 200 * DAY, 1.0)]
    events = rating_events(train + test)
    items = pd.DataFrame(
        {
            "item_id": sorted(set(events["item_id"])),
            "title": "t",
            "categories": [[] for _ in set(events["item_id"])],
            "text": "",
            "created_at": pd.NaT,
        }
    )
    sp = make_split(Dataset(events, items), cutoff="1970-01-01 00:16:00", fold_in=3)
    assert set(sp.next_items) == set(sp.targets) == {"w", "c"}
    # w: s0..s2 revealed, the next ten are s3..s12, the long horizon is s3..s14
    assert sp.next_items["w"] == {f"s{n}" for n in range(3, 13)}
    assert sp.targets["w"] == {f"s{n}" for n in range(3, 15)}
    # c: s0..s2 revealed (fold-in point day 2): s3, s4 and far; within 30 days: s3, s4
    assert sp.next_items["c"] == {"s3", "s4", "far"}
    assert sp.next_window["c"] == {"s3", "s4"}
    slices = sp.slices(cold_max_events=3)
    assert set(slices["next_items_cold"]) == {"c"}
    assert set(slices["next_items_warm"]) == {"w"}
    assert set(slices["warm"]) == {"w"} and set(slices["cold_start"]) == {"c"}
