"""The sequence model's training on a GPU against the CPU, with plain PyTorch (no Ray).

Issue #15 asks that the training function run on a lent GPU machine, which has PyTorch with
CUDA but not Ray, and that the speed-up be reported. What runs is the stage's own task,
model, loss, optimizer, schedule and step (:func:`training.steps.train_epochs`, which the
Ray loop shares), one worker, on each device in turn. Split as :mod:`bench.gpu` is, since
that machine starts bare and takes at most 64 MiB of working tree:

* ``python -m bench.gpu_train pack`` (here): prepares the data as ``make train`` does
  (``training.prepare`` with the local config), the sequence model's item space with its
  content vectors (the pretrained content encoder: the same shape and cost as the item
  tower's vectors ``make train`` gives it), the training sequences, and the wheels of
  pydantic (``training.config`` reads the platform settings) for that machine's Python
  3.12, into ``var/gpu-train-bundle``; it also times the same epochs on this machine
  (``--epochs``, the threads a Ray worker of ``make train`` has).
* ``python -m bench.gpu_train run --bundle var/gpu-train-bundle --out DIR`` (there): the
  same epochs on CUDA, then on that machine's CPU, each device's epoch times (the GPU
  synchronised at each epoch's end) and mean training losses, and the speed-ups against
  both CPUs, into ``DIR/bench_gpu_train.json`` and a printed table. A device that cannot
  run is recorded with its error, not dropped.

On the device tool: ``carry`` names ``var/gpu-train-bundle``; the command starts with
``python3 -m pip install -q --no-index --no-deps --target /tmp/site
var/gpu-train-bundle/wheels/*.whl && export PYTHONPATH=/tmp/site:$PWD``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.util import cpu_model
from core.paths import REPO_ROOT

BUNDLE = REPO_ROOT / "var" / "gpu-train-bundle"
MODEL_DIR = "sequence"
ROWS_FILE = "rows.npz"
MANIFEST = "manifest.json"
WHEELS = "wheels"
#: the platform settings' packages, absent on the GPU machine (its python is 3.12)
PYDANTIC = (
    "pydantic",
    "pydantic-core",
    "pydantic-settings",
    "python-dotenv",
    "annotated-types",
    "typing-inspection",
)
MANYLINUX = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


# --- the bundle ----------------------------------------------------------------------------
def save_rows(rows: Sequence[dict[str, np.ndarray]], path: Path) -> None:
    """Rows of the same keys: each key's arrays concatenated, with every row's length (a
    key of one value a row, such as ``user_positives``, as one array of those values)."""
    keys = sorted(rows[0])
    scalars = [k for k in keys if np.ndim(rows[0][k]) == 0]
    first = next(k for k in keys if k not in scalars)
    arrays: dict[str, Any] = {
        "_lengths": np.array([len(r[first]) for r in rows], dtype=np.int64),
        "_scalars": np.array(scalars, dtype=str),
    }
    for key in keys:
        join = np.stack if key in scalars else np.concatenate
        arrays[key] = join([r[key] for r in rows])
    np.savez_compressed(path, **arrays)


def load_rows(path: Path) -> list[dict[str, np.ndarray]]:
    """The rows :func:`save_rows` wrote."""
    data = np.load(path)
    lengths, scalars = data["_lengths"], set(data["_scalars"].tolist())
    columns = {k: data[k] for k in data.files if not k.startswith("_")}
    ends = np.cumsum(lengths)
    rows = []
    for n, (start, end) in enumerate(zip(ends - lengths, ends, strict=True)):
        rows.append(
            {k: c[n].copy() if k in scalars else c[start:end].copy() for k, c in columns.items()}
        )
    return rows


def pack(cfg: Any, out: Path, epochs: int, wheels: bool = True) -> dict[str, Any]:
    """Write the bundle (module docstring) and time ``epochs`` here; the manifest."""
    from training.models.sequence import SASRec, save_sequence_model
    from training.models.sequence_data import content_vectors
    from training.prepare import prepare_data

    seq = cfg.sequence
    data = prepare_data(cfg)
    space = data.sequence_space
    if space is None or not data.sequence_train:
        raise ValueError("no sequences were prepared (sequence.enabled?)")
    t0 = time.perf_counter()
    vectors = content_vectors(
        data.dataset.items,
        space.item_ids,
        model_dir=seq.content_model or cfg.pretrained_dir(),
        max_seq_len=seq.content_max_seq_len,
        cache=seq.content_cache,
    )
    space = space.with_content(vectors)
    encoded_s = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    save_sequence_model(SASRec(seq, space), out / MODEL_DIR)
    save_rows(data.sequence_train, out / ROWS_FILE)
    if wheels:
        download_wheels(out / WHEELS)
    threads = cfg.cpus_per_worker
    here = run_device(load_task(out), load_rows(out / ROWS_FILE), "cpu", epochs, cfg.seed, threads)
    manifest = {
        "data_dir": str(cfg.data_dir),
        "sequences": len(data.sequence_train),
        "events": int(sum(len(r["items"]) for r in data.sequence_train)),
        "items": space.n_items,
        "content_dim": int(vectors.shape[1]),
        "content_encoded_s": encoded_s,
        "epochs": epochs,
        "seed": cfg.seed,
        "here": {**here, "machine": machine()},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def download_wheels(out: Path) -> None:
    """pydantic and its own needs, at this environment's versions, for CPython 3.12."""
    from importlib.metadata import version

    out.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={version(name)}" for name in PYDANTIC]
    platforms = [arg for p in MANYLINUX for arg in ("--platform", p)]
    target = ["--python-version", "3.12", "--implementation", "cp", *platforms]
    pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    subprocess.run([*pip, *target, "-d", str(out), *pins], check=True)


def load_task(bundle: Path) -> Any:
    """The sequence stage's task over the bundle's item space and configuration."""
    from training.models.sequence import load_sequence_model
    from training.tasks.sequence import SequenceTask

    model = load_sequence_model(bundle / MODEL_DIR)
    return SequenceTask(model.cfg, space=model.space)


# --- the run -------------------------------------------------------------------------------
def run_device(
    task: Any,
    rows: list[dict[str, np.ndarray]],
    device: str,
    epochs: int,
    seed: int,
    threads: int | None = None,
) -> dict[str, Any]:
    """``epochs`` of the stage on ``device``: each epoch's seconds, steps and mean loss."""
    from training.steps import train_epochs

    if threads:
        torch.set_num_threads(threads)
    record: dict[str, Any] = {
        "device": device,
        "name": cpu_model() if device == "cpu" else device,
        "threads": torch.get_num_threads(),
        "epochs": [],
    }

    def on_epoch(epoch: int, seconds: float, steps: int, loss: float) -> None:
        record["epochs"].append({"epoch": epoch, "s": seconds, "steps": steps, "loss": loss})
        print(f"[{device}] epoch {epoch + 1}: {seconds:.2f} s, {steps} steps, loss {loss:.4f}")

    try:
        if device == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("CUDA is not available here")
            record["name"] = torch.cuda.get_device_name(0)
        t0 = time.perf_counter()
        train_epochs(task, rows, seed, device=device, epochs=epochs, on_epoch=on_epoch)
        record["total_s"] = time.perf_counter() - t0
    except Exception as exc:  # recorded, not dropped (module docstring)
        record["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    return record


def run(bundle: Path, out: Path, devices: Sequence[str], epochs: int | None) -> dict[str, Any]:
    """The bundle's stage on each of ``devices`` in turn (the manifest's epochs unless
    ``epochs``), written to ``out/bench_gpu_train.json`` with its table, and printed."""
    manifest = json.loads((bundle / MANIFEST).read_text())
    epochs = epochs or int(manifest["epochs"])
    task, rows = load_task(bundle), load_rows(bundle / ROWS_FILE)
    runs = [run_device(task, rows, d, epochs, int(manifest["seed"])) for d in devices]
    result = {
        "manifest": manifest,
        "machine": machine(),
        "torch": torch.__version__,
        "runs": runs,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    out.mkdir(parents=True, exist_ok=True)
    result["table"] = render(result)
    (out / "bench_gpu_train.json").write_text(json.dumps(result, indent=2) + "\n")
    print(result["table"])
    return result


def epoch_s(record: dict[str, Any]) -> float | None:
    """A run's epoch time: the median of its epochs after the first (the first warms up
    kernels and the allocator), or the first where there is one only."""
    times = [e["s"] for e in record.get("epochs", [])]
    if not times:
        return None
    return float(np.median(times[1:] if len(times) > 1 else times))


def render(result: dict[str, Any]) -> str:
    """A row a device, with its speed-up against the CPU of the same machine and against
    the packing machine's epochs (a Ray worker's threads of ``make train``)."""
    here = result["manifest"]["here"]
    cpu_there: dict[str, Any] = next((r for r in result["runs"] if r["device"] == "cpu"), {})
    base_there, base_here = epoch_s(cpu_there), epoch_s(here)
    lines = [
        "| device | threads | s per epoch | last epoch's loss | vs that machine's CPU | "
        "vs the packing machine |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    packing = {**here, "device": "cpu", "name": f"the packing machine ({here['machine']})"}
    for r, there in [*((r, True) for r in result["runs"]), (packing, False)]:
        s = epoch_s(r)
        label = f"{r['device']}: {r.get('name', '')}"
        if s is None:
            lines.append(f"| {label} | | {r.get('error', 'no epochs')} | | | |")
            continue
        vs_there = f"{base_there / s:.1f}x" if base_there and there else ""
        vs_here = f"{base_here / s:.1f}x" if base_here else ""
        loss = r["epochs"][-1]["loss"]
        lines.append(
            f"| {label} | {r['threads']} | {s:.2f} | {loss:.4f} | {vs_there} | {vs_here} |"
        )
    m = result["manifest"]
    head = (
        f"The sequence model, {m['sequences']:,} training sequences ({m['events']:,} events) "
        f"over {m['items']:,} items with {m['content_dim']}-d content vectors, "
        f"{len(here['epochs'])} epoch(s) on each device (the median after the first where "
        f"more); {result['date']}, torch {result['torch']}"
    )
    return head + "\n\n" + "\n".join(lines) + "\n"


def machine() -> str:
    return f"{cpu_model()}, {os.cpu_count()} CPUs"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_train", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)
    p = verbs.add_parser("pack", help="here: the bundle, and the same epochs on this machine")
    p.add_argument("--config", default=str(REPO_ROOT / "training" / "configs" / "local.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", type=Path, default=BUNDLE)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--no-wheels", action="store_true")
    r = verbs.add_parser("run", help="there: the same epochs on CUDA and on that CPU")
    r.add_argument("--bundle", type=Path, default=BUNDLE)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--devices", default="cuda,cpu")
    r.add_argument("--epochs", type=int, default=None)
    args = parser.parse_args(argv)
    if args.verb == "pack":
        from training.config import load_config

        manifest = pack(
            load_config(args.config, args.set), args.out, args.epochs, not args.no_wheels
        )
        print(json.dumps(manifest, indent=2))
        return 0
    result = run(args.bundle, args.out, args.devices.split(","), args.epochs)
    return 0 if all("error" not in r for r in result["runs"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
