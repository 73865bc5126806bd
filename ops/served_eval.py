"""``make eval`` with the served system: the gateway's own composition beside the baselines.

``python -m ops.served_eval`` takes the arguments of ``python -m
training.evaluation`` and adds one system, ``pipeline_served``, evaluated on the same split,
fold-in and users as every offline system:

* ``fit(train)``: starts Milvus Lite and tritonserver on free ports (the newest release of the
  model repository), indexes the catalogue with the *training period's* popularity and
  co-occurrence and the training users' profiles through Triton, fits the segments (PCA +
  spherical k-means, ``ops.segments``), starts the gateway;
* ``observe(events)``: sends each test user's fold-in events through ``IngestEvents``, which
  answers once they are applied (read-your-writes), as a backend client would;
* ``recommend(users, k)``: ``Recommend`` over gRPC for 10 items (what NDCG@10 scores, its
  exploration slot included) and for ``k`` (the ranks after 10), nothing excluded by the
  client, users in the order of their fold-in points; before each, the items created since
  the split up to that user's fold-in point go in through ``UpsertItems``, as a catalogue
  service would add them when they are created (no behaviour yet: only content can find
  them). Without that, an item released after the split could never be recommended,
  though users of a catalogue with releases buy mostly new ones.

The offline ``pipeline`` row is the reference composition tuned on validation windows; this
row is what the gateway actually serves with its configured settings. The segments fitted on
the training users are reported beside it: ``segments.json`` and a section of ``eval.md``
(sizes, silhouettes, PCA dimensions and variance, online/offline agreement).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from google.protobuf.timestamp_pb2 import Timestamp
from recsys_client import RecommenderClient

from core.config import Settings, get_settings
from ops.demo import index_dataset
from ops.segments import K_SCAN, SegmentReport
from ops.stack import LocalStack, local_stack
from services.api import pb
from training.data.schema import Dataset

log = logging.getLogger(__name__)
EVENT_TYPES = {
    "view": pb.EVENT_TYPE_VIEW,
    "click": pb.EVENT_TYPE_CLICK,
    "rating": pb.EVENT_TYPE_RATING,
    "purchase": pb.EVENT_TYPE_PURCHASE,
}
INGEST_BATCH = 500  # events per IngestEvents call
SHOWN = 10  # the list a client shows, its exploration slot included: NDCG@10 is scored on it


def to_events(events: pd.DataFrame) -> list[pb.Event]:
    """Dataset event rows as API events (same type, value and time)."""
    out = []
    for row in events.itertuples(index=False):
        stamp = Timestamp()
        stamp.FromDatetime(pd.Timestamp(row.timestamp).to_pydatetime())
        value = float(row.value) if pd.notna(row.value) else 0.0
        out.append(
            pb.Event(
                user_id=str(row.user_id),
                item_id=str(row.item_id),
                event_type=EVENT_TYPES[str(row.event_type)],
                event_time=stamp,
                value=value,
                idempotency_key=f"eval:{row.user_id}:{row.item_id}:{stamp.ToNanoseconds()}",
            )
        )
    return out


def later_items(train: Dataset) -> pd.DataFrame:
    """The items :func:`released` leaves out (created after the training events end), oldest
    first: ``recommend`` upserts them as their creation times pass."""
    kept = set(released(train).items["item_id"])
    later = train.items[~train.items["item_id"].isin(kept)]
    if later.empty:  # no creation times, or none after the split
        return later
    created = pd.to_datetime(later["created_at"], utc=True)
    return later.assign(created_at=created).sort_values("created_at", kind="stable")


def to_items(items: pd.DataFrame) -> list[pb.Item]:
    """Dataset item rows as API items (title, categories, text, creation time)."""
    out = []
    for row in items.itertuples(index=False):
        stamp = Timestamp()
        stamp.FromDatetime(pd.Timestamp(row.created_at).to_pydatetime())
        out.append(
            pb.Item(
                item_id=str(row.item_id),
                title=str(row.title),
                categories=list(row.categories),
                description=str(row.text),
                create_time=stamp,
            )
        )
    return out


def released(train: Dataset) -> Dataset:
    """``train`` with the catalogue as it stood when its events end: items whose creation
    time comes later are left out, as the feature ranker's training replay leaves them out
    (``training.data.candidates``). Indexed early, they would be recommended before they
    existed, and the gateway's clock (its newest item) would run ahead of the split."""
    if "created_at" not in train.items or train.events.empty:
        return train
    created = pd.to_datetime(train.items["created_at"], utc=True)
    touched = train.items["item_id"].isin(train.events["item_id"])  # a creation time too late
    keep = created.isna() | (created <= train.events["timestamp"].max()) | touched
    return dataclasses.replace(train, items=train.items[keep])


class ServedGateway:
    """The running gateway as an evaluation system (see the module docstring)."""

    name = "pipeline_served"

    def __init__(self, settings: Settings, var_dir: Path, timeout_s: float = 30.0) -> None:
        self.settings = settings
        self.var_dir = var_dir
        self.timeout_s = timeout_s  # the call deadline: generous, quality is measured here
        self._exit = contextlib.ExitStack()
        self._client: RecommenderClient | None = None
        self.segments: SegmentReport | None = None
        self._later = pd.DataFrame()  # items not created yet at the split, oldest first
        self._fold_in: dict[str, pd.Timestamp] = {}  # each user's newest observed event

    def fit(self, train: Dataset) -> None:
        shutil.rmtree(self.var_dir, ignore_errors=True)
        # Read-your-writes for the whole call deadline: each fold-in batch is applied by the
        # profile worker before the next Recommend, as the offline systems see it; and, as
        # theirs, the gateway's popularity and co-occurrence stay as fitted (indexed): other
        # test users' fold-in events, some after a user's fold-in point, do not move them.
        settings = self.settings.model_copy(
            update={"ingest_wait_applied_s": self.timeout_s, "aggregates_refresh_s": 0.0}
        )
        stack: LocalStack = self._exit.enter_context(local_stack(settings, self.var_dir))
        stack.start_milvus()
        stack.start_triton()
        self.segments = index_dataset(stack, released(train), k_scan=K_SCAN)
        self._later = later_items(train)
        stack.start_gateway()
        self._client = self._exit.enter_context(
            RecommenderClient(stack.gateway_target, timeout=self.timeout_s)
        )

    @property
    def client(self) -> RecommenderClient:
        if self._client is None:
            raise RuntimeError("fit() starts the stack first")
        return self._client

    def observe(self, events: pd.DataFrame) -> None:
        for user, at in events.groupby("user_id")["timestamp"].max().items():
            self._fold_in[str(user)] = max(at, self._fold_in.get(str(user), at))
        api_events = to_events(events.sort_values("timestamp"))
        for start in range(0, len(api_events), INGEST_BATCH):
            reply = self.client.ingest(api_events[start : start + INGEST_BATCH])
            log.info("ingested %d (%d duplicates)", reply.accepted_count, reply.duplicate_count)

    def recommend(
        self, user_ids: Sequence[str], k: int, exclude_seen: bool = True
    ) -> dict[str, list[str]]:
        """Every user's list (one call with all users, as the runner makes it: the items
        created so far stay, so a later call's earlier users would see items from after
        their fold-in points). Its first :data:`SHOWN` items are the answer to a client
        asking for that many, the rest the answer for ``k`` beyond them: the exploration
        slots are a list's last ones, so the top 10 of an answer for 20 has none."""
        out = {}
        start = pd.Timestamp.min.tz_localize("UTC")
        for user in sorted(user_ids, key=lambda u: (self._fold_in.get(str(u), start), str(u))):
            self._create_items(self._fold_in.get(str(user), start))
            shown = self._answer(user, min(SHOWN, k))
            out[user] = (
                shown + [i for i in self._answer(user, k) if i not in shown][: k - len(shown)]
            )
        return out

    def _answer(self, user: str, k: int) -> list[str]:
        reply = self.client.recommend(user, k=k)
        if reply.degraded:
            log.warning("user %s: degraded answer: %s", user, reply.degraded_reason)
        return [scored.item.item_id for scored in reply.items]

    def _create_items(self, until: pd.Timestamp) -> None:
        """Upsert the items created up to ``until`` that are not in the catalogue yet."""
        if self._later.empty:
            return
        due = self._later[self._later["created_at"] <= until]
        if due.empty:
            return
        self._later = self._later.iloc[len(due) :]
        batch = self.settings.max_items_per_call
        for start in range(0, len(due), batch):
            self.client.upsert_items(to_items(due.iloc[start : start + batch]))
        log.info("created %d items up to %s", len(due), until)

    def close(self) -> None:
        self._exit.close()


def main(argv: Sequence[str] | None = None) -> int:
    from training.evaluation.__main__ import main as evaluate

    settings = get_settings()
    served = ServedGateway(settings, settings.var_dir / "eval-served")
    try:
        code = evaluate(argv, extra_systems=[served])
    finally:
        served.close()
    if served.segments is not None:
        out = argparse.ArgumentParser(add_help=False)
        out.add_argument("--out", type=Path, default=Path("reports/eval"))
        write_segments(served.segments, out.parse_known_args(argv)[0].out)
    return code


def write_segments(report: SegmentReport, out: Path) -> list[Path]:
    """``segments.json`` and a "User segments" section appended to ``eval.md``."""
    out.mkdir(parents=True, exist_ok=True)
    js = out / "segments.json"
    js.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    section = ["", "## User segments (served stack, training users)", "", *report.markdown()]
    md = out / "eval.md"
    with md.open("a") as fh:
        fh.write("\n".join(section) + "\n")
    print("\n".join(section))
    return [js, md]


if __name__ == "__main__":
    sys.exit(main())
