"""``make demo`` / ``make serve``: the platform end to end on the embedded defaults.

Loads the dataset, exports the models into the Triton repository when it has none, starts
Milvus Lite (the real engine with ``RECSYS_MILVUS_SERVER=engine``), tritonserver and the
gateway, indexes every item and user through Triton, then
asks the gateway for recommendations over gRPC like any client would. ``--serve`` keeps the
stack up until Ctrl-C instead of stopping after the answers.
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import json
import logging
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from recsys_client import RecommenderClient

from core.config import REPO_ROOT, Settings, get_settings
from ops.stack import LocalStack, Ports, local_stack, milvus_data_dir
from services.vectors.store import VectorStore
from training.data import load_dataset
from training.data.schema import Dataset
from training.export.repository import latest_release, servable_models
from training.pretrained import resolve_pretrained

if TYPE_CHECKING:
    from ops.segments import SegmentReport

log = logging.getLogger("demo")


class Steps:
    """Numbered, timed progress lines."""

    def __init__(self, total: int) -> None:
        self.total, self.n, self.t0 = total, 0, time.monotonic()

    def __call__(self, text: str) -> None:
        self.n += 1
        print(
            f"\n[{self.n}/{self.total}] {text}  (t={time.monotonic() - self.t0:.0f}s)", flush=True
        )


def ensure_models(settings: Settings, checkpoint: Path | None) -> None:
    """Export ``checkpoint`` (or the pretrained towers) unless the newest release already is
    exactly that: same source, newer than the checkpoint, same python-backend code."""
    repository = settings.model_repository
    expected = (
        str(checkpoint / "item_tower")
        if checkpoint
        else resolve_pretrained(settings.pretrained_model)
    )
    latest = latest_release(repository)
    if latest and servable_models(repository):
        release = repository / "tokenizer" / str(latest)
        meta = json.loads((release / "release.json").read_text())
        trained_at = (checkpoint / "metrics.json").stat().st_mtime if checkpoint else 0.0
        code_current = all(
            filecmp.cmp(model / "model.py", model / str(latest) / "model.py", shallow=False)
            for model in repository.iterdir()
            if (model / "model.py").exists() and (model / str(latest) / "model.py").exists()
        )
        if meta.get("item_tower") == expected and release.stat().st_mtime >= trained_at:
            if code_current:
                print(f"  serving release {latest} from {expected}")
                return
            print("  the python-backend model code changed: exporting a new release")
    from training.export.__main__ import main as export_main

    args = ["--repository", str(repository)]
    args += ["--checkpoint", str(checkpoint)] if checkpoint else []
    if export_main(args) != 0:
        raise SystemExit("model export failed")


def ensure_fine_tuned(checkpoint: Path, config: str) -> None:
    """A short Ray Train fine-tune on 2 CPU workers when no trained checkpoint exists yet."""
    if (checkpoint / "metrics.json").is_file():
        print(f"  using the fine-tuned checkpoint {checkpoint}")
        return
    print(f"  no checkpoint at {checkpoint}: fine-tuning with Ray Train ({config})", flush=True)
    subprocess.run([sys.executable, "-m", "training.train", "--config", config], check=True)


def index_everything(stack: LocalStack, dataset_path: Path) -> None:
    dataset = load_dataset(dataset_path)
    print(dataset.report.summary(max_rows=5))
    index_dataset(stack, dataset)


def index_dataset(stack: LocalStack, dataset: Dataset, k_scan: Sequence[int] = ()) -> SegmentReport:
    """Every item and user of ``dataset`` through Triton into the stack's Milvus; segments.
    The popularity half-life goes to the stack's event log (started here if it is not up)."""
    from ops.indexing import (
        index_exploration,
        index_half_life,
        index_items,
        index_users,
        release_lengths,
    )
    from ops.segments import fit_segments
    from services.inference.triton_client import TritonClient

    if "nats" not in stack.processes:
        stack.start_nats()
    days = index_half_life(dataset, stack.settings)
    store, triton = VectorStore(stack.settings), TritonClient(stack.settings)
    try:
        store.ensure_collections()
        batch = stack.settings.triton_batch_size
        lengths = release_lengths(stack.settings.model_repository)
        n_items = index_items(dataset, triton, store, batch, half_life_days=days, lengths=lengths)
        share = index_exploration(dataset, store, stack.settings, days)
        n_users = index_users(dataset, triton, store, batch)
        segments = fit_segments(store, stack.settings.segments, k_scan=k_scan)
        if stack.settings.milvus_server == "engine":
            store.flush()  # seal and index: searches then run on HNSW, not growing segments
        print(
            f"  indexed {n_items} items and {n_users} users; {len(segments.sizes)} segments; "
            f"popularity half-life {days:g} days; exploration share "
            f"{stack.settings.exploration_share if share is None else share:g}"
        )
    finally:
        triton.close()
        store.close()
    return segments


def show_recommendations(target: str, users: list[str], k: int) -> None:
    with RecommenderClient(target, timeout=10) as client:
        for user in users:
            reply = client.recommend(user, k=k)
            flags = " (cold start)" if reply.cold_start else ""
            flags += f" DEGRADED: {reply.degraded_reason}" if reply.degraded else ""
            print(f"\n  user {user}{flags}  model release {reply.model_version or '-'}")
            for rank, scored in enumerate(reply.items, 1):
                cats = ", ".join(scored.item.categories)
                print(f"   {rank:2d}. {scored.score:6.3f}  {scored.item.title}  [{cats}]")
                print(f"       {scored.reason}")


def main(argv: list[str] | None = None) -> int:
    settings = get_settings()
    parser = argparse.ArgumentParser(prog="python -m ops.demo", description=__doc__)
    parser.add_argument("--users", default="1,42,414,new-user-1", help="comma-separated ids")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=REPO_ROOT / "runs" / "local" / "final",
        help="fine-tuned towers and ranker to serve (trained first when missing)",
    )
    parser.add_argument("--train-config", default="training/configs/local.yaml")
    parser.add_argument(
        "--pretrained", action="store_true", help="serve the pretrained towers, no fine-tune"
    )
    parser.add_argument("--serve", action="store_true", help="keep serving until Ctrl-C")
    parser.add_argument("--keep-index", action="store_true", help="reuse the previous index")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    steps = Steps(7)
    var_dir = settings.var_dir / ("serve" if args.serve else "demo")
    milvus_dir = milvus_data_dir(var_dir, settings.milvus_server)
    fresh = not (args.keep_index or (args.serve and milvus_dir.exists()))
    if fresh:
        shutil.rmtree(milvus_dir, ignore_errors=True)
    steps("models: fine-tuned two-tower and CTR ranker (Ray Train)")
    checkpoint = None if args.pretrained else args.checkpoint
    if checkpoint is not None:
        ensure_fine_tuned(checkpoint, args.train_config)
    steps("models: ONNX export into the Triton repository (parity-checked)")
    ensure_models(settings, checkpoint)
    ports = Ports(gateway=settings.grpc_port) if args.serve else Ports()
    milvus = "the Milvus engine" if settings.milvus_server == "engine" else "Milvus Lite"
    with local_stack(settings, var_dir, ports) as stack:
        steps(
            f"starting {milvus} (port {stack.ports.milvus}) and tritonserver "
            f"(gRPC port {stack.ports.triton_grpc}); logs in {var_dir / 'logs'}"
        )
        stack.start_milvus()
        stack.start_triton()
        steps(f"indexing {settings.data_dir.name} through Triton into Milvus")
        if fresh:
            index_everything(stack, settings.data_dir)
        else:
            print("  reusing the existing index")
        steps(f"starting the gateway on {stack.gateway_target}")
        stack.start_gateway()
        steps("recommendations through the gRPC API")
        show_recommendations(stack.gateway_target, args.users.split(","), args.k)
        if args.serve:
            print(
                f"\nServing on {stack.gateway_target}: try `recsys recommend --target "
                f"{stack.gateway_target} --user 42`. Ctrl-C stops everything.",
                flush=True,
            )
            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            with contextlib.suppress(KeyboardInterrupt):
                stop.wait()
        steps("stopping everything that was started")
    print(f"done in {time.monotonic() - steps.t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
