"""Two training stages on a GPU against the CPU, with plain PyTorch (no Ray).

Issue #15 asks that the training function run on a lent GPU machine, which has PyTorch with
CUDA but not Ray, and that the speed-up be reported. What runs is the stage's own task,
model, loss, optimizer, schedule and step (:func:`training.steps.train_epochs`, which the
Ray loop shares), one worker, on each device in turn: the sequence model, and the two BERT
towers fine-tuned on behaviour text (where a GPU should matter most). Split as
:mod:`bench.gpu` is, since that machine starts bare and takes at most 64 MiB of working tree
(so one bundle a call):

* ``python -m bench.gpu_train pack [--stage retrieval]`` (here): prepares the data as
  ``make train`` does (``training.prepare`` with the local config) and writes the stage's
  bundle: for the sequence stage its untrained model's configuration and item space with the
  content vectors (the pretrained content encoder's: the same shape and cost as the item
  tower's vectors ``make train`` gives it) and its training sequences; for the towers their
  settings, examples and the pretrained BERT with fp16 weights (widened back there); with
  either, the wheels of pydantic (``training.config`` reads the platform settings) for that
  machine's Python 3.12. It also times the same epochs here (``--epochs``, on the threads a
  Ray worker of ``make train`` has).
* ``python -m bench.gpu_train run --bundle DIR --out OUT`` (there): the same epochs on CUDA,
  then on that machine's CPU, each device's epoch times (the GPU synchronised at each
  epoch's end) and mean training losses, and the speed-ups against both CPUs, into
  ``OUT/bench_gpu_train.json`` and a printed table. A device that cannot run is recorded
  with its error, not dropped.

On the device tool: ``carry`` names the bundle; the command starts with ``python3 -m pip
install -q --no-index --no-deps --target /tmp/site BUNDLE/wheels/*.whl && export
PYTHONPATH=/tmp/site:$PWD``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.util import FP16_WEIGHTS, copy_weights, cpu_model
from core.paths import REPO_ROOT

BUNDLE = REPO_ROOT / "var" / "gpu-train-bundle"
STAGES = ("sequence", "retrieval")
MODEL_DIR = "sequence"  # the sequence stage: its untrained model's directory (item space)
ROWS_FILE = "rows.npz"  # the sequence stage's training sequences
TEXT_ROWS = "rows.json"  # the retrieval stage's (behaviour text, item text) examples
STAGE_CONFIG = "stage_config.json"
BERT_DIR = "bert"  # the retrieval stage's pretrained BERT, its weights in fp16
BERT_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)
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


def pack(
    cfg: Any, out: Path, epochs: int, wheels: bool = True, stage: str = "sequence"
) -> dict[str, Any]:
    """Write the bundle of ``stage`` (module docstring) and time ``epochs`` here; the
    manifest."""
    from training.prepare import prepare_data

    if stage not in STAGES:
        raise ValueError(f"stage {stage!r}: one of {', '.join(STAGES)}")
    data = prepare_data(cfg)
    out.mkdir(parents=True, exist_ok=True)
    packed = _pack_sequence(cfg, data, out) if stage == "sequence" else _pack_text(cfg, data, out)
    if wheels:
        download_wheels(out / WHEELS)
    manifest = {"stage": stage, "data_dir": str(cfg.data_dir), **packed}
    manifest.update(epochs=epochs, seed=cfg.seed)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    with tempfile.TemporaryDirectory(prefix="gpu-train-") as work:
        task, rows, pretrained = load_stage(out, Path(work))
        here = run_device(task, rows, "cpu", epochs, cfg.seed, cfg.cpus_per_worker, pretrained)
    manifest["here"] = {**here, "machine": machine()}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _pack_sequence(cfg: Any, data: Any, out: Path) -> dict[str, Any]:
    """The sequence stage's untrained model (its configuration and item space with the
    content vectors) and its training sequences."""
    from training.models.sequence import SASRec, save_sequence_model
    from training.models.sequence_data import content_vectors

    seq = cfg.sequence
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
    torch.manual_seed(cfg.seed)
    save_sequence_model(SASRec(seq, space), out / MODEL_DIR)
    save_rows(data.sequence_train, out / ROWS_FILE)
    return {
        "sequences": len(data.sequence_train),
        "events": int(sum(len(r["items"]) for r in data.sequence_train)),
        "items": space.n_items,
        "content_dim": int(vectors.shape[1]),
        "content_encoded_s": encoded_s,
    }


def _pack_text(cfg: Any, data: Any, out: Path) -> dict[str, Any]:
    """The retrieval stage's configuration, examples and pretrained BERT (fp16 weights)."""
    pretrained = Path(cfg.pretrained_dir())
    copy_weights(pretrained, "model.safetensors", out / BERT_DIR, FP16_WEIGHTS, True, BERT_FILES)
    (out / STAGE_CONFIG).write_text(json.dumps(dataclasses.asdict(cfg.retrieval)))
    (out / TEXT_ROWS).write_text(json.dumps(data.retrieval_train))
    return {
        "examples": len(data.retrieval_train),
        "bert": f"{pretrained.parent.name}/{pretrained.name}",
        "batch_size": cfg.retrieval.batch_size,
        "max_seq_len": cfg.retrieval.max_seq_len,
    }


def download_wheels(out: Path) -> None:
    """pydantic and its own needs, at this environment's versions, for CPython 3.12."""
    from importlib.metadata import version

    out.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={version(name)}" for name in PYDANTIC]
    platforms = [arg for p in MANYLINUX for arg in ("--platform", p)]
    target = ["--python-version", "3.12", "--implementation", "cp", *platforms]
    pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    subprocess.run([*pip, *target, "-d", str(out), *pins], check=True)


def load_stage(bundle: Path, work: Path) -> tuple[Any, list[Any], str]:
    """The bundle's task, its training rows and the BERT directory it starts from ("" for
    the sequence stage), restored under ``work``."""
    manifest = json.loads((bundle / MANIFEST).read_text())
    if manifest["stage"] == "sequence":
        from training.models.sequence import load_sequence_model
        from training.tasks.sequence import SequenceTask

        model = load_sequence_model(bundle / MODEL_DIR)
        return SequenceTask(model.cfg, space=model.space), load_rows(bundle / ROWS_FILE), ""
    from training.config import RetrievalConfig
    from training.tasks.retrieval import RetrievalTask

    bert = work / BERT_DIR
    copy_weights(bundle / BERT_DIR, FP16_WEIGHTS, bert, "model.safetensors", False, BERT_FILES)
    cfg = RetrievalConfig(**json.loads((bundle / STAGE_CONFIG).read_text()))
    return RetrievalTask(cfg), json.loads((bundle / TEXT_ROWS).read_text()), str(bert)


# --- the run -------------------------------------------------------------------------------
def run_device(
    task: Any,
    rows: list[dict[str, np.ndarray]],
    device: str,
    epochs: int,
    seed: int,
    threads: int | None = None,
    pretrained: str = "",
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
        train_epochs(task, rows, seed, device, epochs, on_epoch, pretrained)
        record["total_s"] = time.perf_counter() - t0
    except Exception as exc:  # recorded, not dropped (module docstring)
        record["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    return record


def run(bundle: Path, out: Path, devices: Sequence[str], epochs: int | None) -> dict[str, Any]:
    """The bundle's stage on each of ``devices`` in turn (the manifest's epochs unless
    ``epochs``), written to ``out/bench_gpu_train.json`` with its table, and printed."""
    manifest = json.loads((bundle / MANIFEST).read_text())
    epochs, seed = epochs or int(manifest["epochs"]), int(manifest["seed"])
    with tempfile.TemporaryDirectory(prefix="gpu-train-") as work:
        task, rows, pretrained = load_stage(bundle, Path(work))
        runs = [run_device(task, rows, d, epochs, seed, None, pretrained) for d in devices]
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
    if m["stage"] == "sequence":
        what = (
            f"The sequence model, {m['sequences']:,} training sequences ({m['events']:,} "
            f"events) over {m['items']:,} items with {m['content_dim']}-d content vectors"
        )
    else:
        what = (
            f"The two towers from {m['bert']}, {m['examples']:,} examples in batches of "
            f"{m['batch_size']} of up to {m['max_seq_len']} tokens"
        )
    head = (
        f"{what}, {len(here['epochs'])} epoch(s) on each device (the median after the first "
        f"where more); {result['date']}, torch {result['torch']}"
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
    p.add_argument("--stage", choices=STAGES, default="sequence")
    p.add_argument("--no-wheels", action="store_true")
    r = verbs.add_parser("run", help="there: the same epochs on CUDA and on that CPU")
    r.add_argument("--bundle", type=Path, default=BUNDLE)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--devices", default="cuda,cpu")
    r.add_argument("--epochs", type=int, default=None)
    args = parser.parse_args(argv)
    if args.verb == "pack":
        from training.config import load_config

        cfg = load_config(args.config, args.set)
        manifest = pack(cfg, args.out, args.epochs, not args.no_wheels, args.stage)
        print(json.dumps(manifest, indent=2))
        return 0
    result = run(args.bundle, args.out, args.devices.split(","), args.epochs)
    return 0 if all("error" not in r for r in result["runs"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
