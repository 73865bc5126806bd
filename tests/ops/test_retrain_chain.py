"""The loop back from ingested events to a new release and a new index, run as one chain
(README, "From ingested events back to training, a release and the index"):

events on a real nats-server -> ``ops.export_events`` (Ray Data, Parquet) -> ``training.train``
on that export (the ``make train TRAIN_DATA=`` override, a tiny random BERT, local Ray) ->
``python -m training.export --checkpoint`` (release N+1 beside release N) -> a real
tritonserver -> ``python -m ops.indexing --data <export>`` into Milvus Lite ->
``python -m ops.segments``.

Each step is tested on its own elsewhere; here each one consumes what the previous one wrote,
and the checks are what an operator would look at afterwards: Triton serves release N+1,
Milvus holds that release's vectors (ONNX Runtime on its files, not release N's), and user
rows come from the exported events and carry a refitted segment, with no row for a user
deleted before the export.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.config import REPO_ROOT, Settings
from ops.stack import LocalStack, local_stack
from services.api import pb
from services.events.log import EventLog
from tests.nats_server import on_log
from tests.stack_fixtures import repository_sources
from tests.training.export.served_runner import tower_atol

CONFIG = REPO_ROOT / "training" / "configs" / "local.yaml"
T0 = 1_700_000_000  # s
N_ITEMS, N_USERS, PER_USER = 24, 12, 8
KINDS = (pb.EVENT_TYPE_CLICK, pb.EVENT_TYPE_PURCHASE, pb.EVENT_TYPE_VIEW, pb.EVENT_TYPE_RATING)
# alice, whose row is checked field by field: the low rating is a negative (seen, not liked)
ALICE = [
    ("i01", pb.EVENT_TYPE_CLICK, 0.0),
    ("i02", pb.EVENT_TYPE_PURCHASE, 0.0),
    ("i03", pb.EVENT_TYPE_RATING, 2.0),
    ("i04", pb.EVENT_TYPE_CLICK, 0.0),
    ("i01", pb.EVENT_TYPE_VIEW, 0.0),
]


def _event(user: str, item: str, kind: int, at_s: int, value: float = 0.0) -> pb.Event:
    event = pb.Event(user_id=user, item_id=item, event_type=kind, value=value)
    event.event_time.FromSeconds(T0 + at_s)
    return event


def _catalogue(root: Path) -> Path:
    """A generic dataset: the items, and base events only of ``dora`` (deleted later)."""
    root.mkdir()
    genres = ["Action", "Comedy", "Drama", "Sci-Fi"]
    pd.DataFrame(
        {
            "item_id": [f"i{n:02d}" for n in range(N_ITEMS)],
            "title": [f"Item {n}" for n in range(N_ITEMS)],
            "categories": [f"{genres[n % 4]}|{genres[(n // 4) % 4]}" for n in range(N_ITEMS)],
            "description": [f"the {genres[n % 4].lower()} item number {n}" for n in range(N_ITEMS)],
        }
    ).to_csv(root / "items.csv", index=False)
    pd.DataFrame(
        {
            "user_id": ["dora", "dora"],
            "item_id": ["i05", "i06"],
            "event_type": ["purchase", "click"],
            "timestamp": [T0 - 1000, T0 - 900],
        }
    ).to_csv(root / "events.csv", index=False)
    return root


def _stream_events() -> list[pb.Event]:
    """Alice's, dora's and twelve other users' events (distinct items per user, 100 s
    apart: no repeat collapses), interleaved in time so that the time split leaves the
    users some training and some validation events."""
    events = [_event("alice", i, k, 100 * n, v) for n, (i, k, v) in enumerate(ALICE)]
    events += [_event("dora", f"i{n:02d}", pb.EVENT_TYPE_CLICK, 100 * n + 3) for n in (7, 8, 9)]
    for u in range(N_USERS):
        for k in range(PER_USER):
            item = f"i{(3 * u + 5 * k) % N_ITEMS:02d}"
            kind = KINDS[(u + k) % len(KINDS)]
            value = 4.5 if kind == pb.EVENT_TYPE_RATING else 0.0
            events.append(_event(f"u{u:02d}", item, kind, 100 * k + 10 + u, value))
    return events


def _publish_then_delete_dora(settings: Settings) -> None:
    async def work(log: EventLog) -> None:
        await log.publish(_stream_events())
        await log.forget_user("dora", 5.0)  # DeleteUser: purge + tombstone

    on_log(settings, work)


def _onnx(repo: Path, version: int, model: str, texts: list[str]) -> np.ndarray:
    """Release ``version``'s ONNX file run directly, tokenized as its tokenizer model does."""
    import onnxruntime as ort
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(repo / "tokenizer" / str(version) / "tokenizer"))
    tokens = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="np")
    session = ort.InferenceSession(
        str(repo / model / str(version) / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    feeds = {i.name: tokens[i.name].astype(np.int64) for i in session.get_inputs()}
    return np.asarray(session.run(None, feeds)[0])


def _train_overrides(bert: str, root: Path, data: Path) -> list[str]:
    """The smallest run of every required stage (``make train TRAIN_DATA=<data>``)."""
    return [
        f"data_dir={data}",
        f"pretrained_model={bert}",
        f"storage_path={root / 'runs'}",
        f"output_dir={root / 'final'}",
        "name=chain",
        "object_store_memory=200000000",
        "tracking.enabled=false",
        "history_len=5",
        "max_chars=200",
        "retrieval.max_examples=48",
        "retrieval.batch_size=8",
        "retrieval.epochs=1",
        "retrieval.lr=3e-3",
        "retrieval.warmup_ratio=0",
        "retrieval.max_seq_len=32",
        "retrieval.eval_users=8",
        "retrieval.eval_candidates=24",
        "ranker.max_examples=16",
        "ranker.batch_size=8",
        "ranker.epochs=1",
        "ranker.lr=3e-3",
        "ranker.warmup_ratio=0",
        "ranker.max_seq_len=48",
        "ranker.eval_users=8",
        "ranker.mining_candidates=24",
        "ranker.hard_negative_top_k=5",
        "sequence.enabled=false",
        "feature_ranker.enabled=false",
    ]


@pytest.fixture
def chain_stack(tmp_path: Path) -> Iterator[LocalStack]:
    """nats-server and Milvus Lite on free ports, a model repository with no release yet;
    tritonserver is started by the test once the new release is in."""
    repo = tmp_path / "repo"
    repository_sources(repo)
    base = Settings(model_repository=repo, embedding_dim=32, log_level="INFO")
    with local_stack(base, tmp_path / "var") as stack:
        stack.start_nats()
        stack.start_milvus()
        yield stack


@pytest.mark.integration
def test_events_retrain_release_and_reindex_as_one_chain(
    chain_stack: LocalStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    import ops.indexing
    import ops.segments
    from core.config import get_settings
    from core.text import item_texts
    from ops.export_events import export_events
    from services.inference.triton_client import TritonClient
    from services.vectors.store import VectorStore
    from training.config import load_config
    from training.data import load_dataset
    from training.export.__main__ import export_release
    from training.export.__main__ import main as export_main
    from training.pretrained import make_tiny_bert
    from training.train import run

    stack = chain_stack
    repo = stack.settings.model_repository
    bert = make_tiny_bert(tmp_path / "tiny_bert")
    # release N: the towers as they were before this retraining (the untrained BERT)
    assert export_release(repo, bert, bert)["version"] == 1

    # 1. make export-events (with the catalogue's own events: dora's must not come back)
    _publish_then_delete_dora(stack.settings)
    export = tmp_path / "exports" / "events"
    try:
        report = export_events(
            stack.settings, export, items_from=_catalogue(tmp_path / "catalogue"), with_base=True
        )
    finally:
        ray.shutdown()  # make train is another process with its own Ray
    n_stream = len(ALICE) + N_USERS * PER_USER
    assert (report.read, report.tombstoned, report.exported) == (n_stream, 2, n_stream)

    # 2. make train TRAIN_DATA=<export>
    root = tmp_path / "train"
    try:
        metrics = run(load_config(CONFIG, _train_overrides(bert, root, export)))
    finally:
        ray.shutdown()
    assert metrics["data"]["events"] == n_stream and metrics["data"]["items"] == N_ITEMS
    assert metrics["data"]["retrieval_eval_users"] > 0

    # 3. make export CHECKPOINT=<final>: release N+1
    assert export_main(["--checkpoint", str(root / "final"), "--repository", str(repo)]) == 0
    assert (repo / "item_encoder" / "2" / "model.onnx").is_file()
    assert (repo / "ranker" / "2" / "model.onnx").is_file()  # the retrained ranker too

    # 4. tritonserver on the repository; 5. python -m ops.indexing --data <export>
    stack.start_triton()
    client = TritonClient(stack.settings)
    try:
        assert client.model_version("item_embedder") == "2"
        assert client.model_version("user_embedder") == "2"
    finally:
        client.close()
    for name, value in {**stack.env(), "RECSYS_EMBEDDING_DIM": "32"}.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        assert ops.indexing.main(["--data", str(export)]) == 0
        # 6. python -m ops.segments: refit on the new user vectors
        assert ops.segments.main(["-k", "3", "--online-check", "0"]) == 0
    finally:
        get_settings.cache_clear()

    # what the index holds
    dataset = load_dataset(export)
    texts = item_texts(dataset.items)
    strong = {"milvus_item_consistency": "Strong", "milvus_user_consistency": "Strong"}
    store = VectorStore(stack.settings.model_copy(update=strong))
    try:
        assert store.count(store.items.name) == N_ITEMS
        ids = ["i00", "i01", "i07", "i13", "i23"]
        rows = store.get_items(ids, 10.0, with_vectors=True, consistency="Strong")
        stored = np.array([rows[i]["vector"] for i in ids], dtype=np.float32)
        new = _onnx(repo, 2, "item_encoder", [texts[i] for i in ids])
        old = _onnx(repo, 1, "item_encoder", [texts[i] for i in ids])
        assert np.abs(stored - new).max() < tower_atol(1e-4)  # release N+1's encodings
        assert np.abs(stored - old).max() > 1e-2  # ... which retraining did change

        users = {
            r["user_id"]: r["segment"] for r in store.scan(store.users.name, ["user_id", "segment"])
        }
        assert set(users) == {"alice", *(f"u{u:02d}" for u in range(N_USERS))}  # no dora
        assert set(users.values()) <= {"seg-0", "seg-1", "seg-2"}  # every user refitted
        alice = store.get_user("alice", 10.0)
        assert alice is not None
        assert alice["recent_items"] == ["i01", "i04", "i02"]  # positives, newest first
        assert alice["seen_items"] == ["i01", "i04", "i03", "i02"]  # the negative too
        assert alice["history_size"] == len(ALICE)
        (alice_text,) = [t for r, t in ops.indexing.user_rows(dataset) if r["user_id"] == "alice"]
        expected = _onnx(repo, 2, "user_encoder", [alice_text])[0]
        assert np.abs(np.asarray(alice["vector"], np.float32) - expected).max() < tower_atol(1e-4)
    finally:
        store.close()


def test_export_part_files_load_whatever_dtypes_ray_hands_the_writer(tmp_path: Path) -> None:
    """The break the chain found: Ray Data may hand ``_typed`` a batch with pyarrow-backed
    columns; their pandas metadata made the loader read ``timestamp[..][pyarrow]`` and fail
    ("Timestamps already have a timezone") on ``make train TRAIN_DATA=<export>``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ops.export_events import EVENT_SCHEMA, EVENTS_DIR, ITEMS_FILE, _typed
    from training.data import load_dataset

    table = pa.table(
        {
            "user_id": ["alice", "alice"],
            "item_id": ["i01", "i02"],
            "event_type": ["click", "rating"],
            "timestamp": pa.array([T0 * 1000, (T0 + 100) * 1000], pa.timestamp("ms", tz="UTC")),
            "value": [None, 4.5],
        },
        schema=EVENT_SCHEMA,
    )
    batch = table.to_pandas(types_mapper=pd.ArrowDtype)  # as Ray may pass it
    (tmp_path / EVENTS_DIR).mkdir()
    pq.write_table(_typed(batch), tmp_path / EVENTS_DIR / "part-0.parquet")
    pd.DataFrame(
        {"item_id": ["i01", "i02"], "title": ["One", "Two"], "categories": [["A"], ["B"]]}
    ).assign(text="").to_parquet(tmp_path / ITEMS_FILE, index=False)
    events = load_dataset(tmp_path).events.sort_values("timestamp")
    assert [int(t.timestamp()) for t in events["timestamp"]] == [T0, T0 + 100]
    assert list(events["event_type"]) == ["click", "rating"]
