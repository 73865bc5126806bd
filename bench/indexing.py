"""Item indexing side by side: length-bucketed batches against file-order batches.

Each variant indexes the same catalogue rows (MovieLens' ``movies.csv``, all of it unless the
plan cuts it) through the stack's Triton ``item_embedder`` into its own scratch Milvus
collection, created afresh each round; the batches are those ``ops.indexing.index_rows``
sends (``item_batches``), each embedded and upserted by ``embed_and_upsert`` unless said:

- **file order** (before): batches of 64 in the catalogue's order; Triton's tokenizer pads
  each request to its longest text, so short texts pay for long neighbours;
- **bucketed, estimated lengths**: batches cut from the texts sorted by their word and
  punctuation count (no tokenizer needed: what the indexing jobs fall back to where the
  release's files are not at hand);
- **bucketed, tokenizer lengths**: sorted by the exact token count of the release's own
  ``tokenizer.json`` (what ``python -m ops.indexing``, ``make demo`` and the Ray catalogue
  job use where the model repository is on their disk);
- **the job: tokenizer lengths, upsert overlapped**: the same batches through
  ``index_rows`` itself, which upserts each batch while Triton embeds the next (what
  ``python -m ops.indexing`` and ``make demo`` run); the target row reports this one;
- **the job, the tower served otherwise**: the job again through a twin of the item embedder
  whose encoder serves the release's item tower another way (``bench.variants``): ONNX
  Runtime's fp32 ``model.onnx`` where the release serves anything else (OpenVINO's bf16
  products, the config's ``engine: auto`` on a CPU with bf16 instructions, or the int8
  graph), else the int8 graph; so the served tower and its fp32 or int8 alternative are timed
  side by side on one Triton.

The others take turns batch by batch (who goes first alternates), so that load drift on a
shared machine hits all of them alike; the jobs' passes, whose batches overlap, run whole,
after them in one round and before them in the next, in the opposite order. Items/s is end
to end (Triton, then the Milvus upsert: the items over the time spent in that variant's
batches, or in the job's whole pass); the embed and upsert columns are the same items over
the time spent in each (the jobs' overlap, so their two add up to more than their wall
time); `x file order` is against the file-order batches of the same round. Padded length
and real-token share are computed with the release's tokenizer for the batches each variant
sent (exact, independent of load); the FLOP columns count the same operations for the int8
graph. Every round checks that each variant wrote each item exactly once (else the section
fails); the last column is the largest difference between a variant's vectors and file
order's (for the tower served otherwise: what bf16 or int8 changes).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, cast

import numpy as np

from bench.models import Arch
from bench.tokens import TokenizerSpec
from bench.util import fmt, load_average, table
from core.config import Settings
from core.rows import ItemRow
from ops.indexing import embed_and_upsert, index_rows, item_batches, release_lengths
from services.inference.triton_client import TritonClient
from services.vectors.store import StoreUnavailable, VectorStore


class Twin(NamedTuple):
    """How the release serves its item tower, how the twin does, and the twin's ensemble."""

    served: str  # e.g. "model.onnx, OpenVINO bf16"
    other: str
    ensemble: str


BASELINE = "file order"
JOB = "the job: tokenizer lengths, upsert overlapped"
TWIN_JOB = "the job, the tower served otherwise"
TARGET_ITEMS_PER_S = 500.0
SCRATCH = {
    "items_collection": "bench_indexing_items",
    "users_collection": "bench_indexing_users",
    "segments_collection": "bench_indexing_segments",
}


class _TimedTriton:
    """The Triton client, timing ``embed_items``."""

    def __init__(self, triton: TritonClient) -> None:
        self.triton, self.seconds, self.requests = triton, 0.0, 0

    def embed_items(self, texts: Sequence[str], timeout_s: float) -> np.ndarray:
        t0 = time.perf_counter()
        try:
            return self.triton.embed_items(texts, timeout_s)
        finally:
            self.seconds += time.perf_counter() - t0
            self.requests += 1


class _TimedStore:
    """The Milvus store, timing ``upsert_items`` and keeping a copy of each written vector."""

    def __init__(self, store: VectorStore) -> None:
        self.store, self.seconds = store, 0.0
        self.vectors: dict[str, np.ndarray] = {}
        self.writes = 0

    def upsert_items(self, rows: Sequence[ItemRow], timeout: float = 30.0) -> int:
        for row in rows:
            self.vectors[str(row["item_id"])] = np.asarray(row["vector"], dtype=np.float32)
        self.writes += len(rows)
        t0 = time.perf_counter()
        try:
            return self.store.upsert_items(rows, timeout)
        finally:
            self.seconds += time.perf_counter() - t0


def padding(
    texts: Sequence[str],
    chunks: Sequence[Sequence[int]],
    spec: TokenizerSpec,
    arch: Arch | None = None,
) -> dict[str, float]:
    """Tokens Triton's tokenizer produces for these batches: each padded to its longest text
    (rounded up to ``pad_to_multiple_of`` for a batch under ``exact_padding_from`` texts;
    never past ``max_length``); with ``arch``, the encoder FLOPs of those batches and of the
    same texts without any padding."""
    tokenizer = spec.tokenizer()
    tokenizer.no_padding()
    real = np.array([len(e.ids) for e in tokenizer.encode_batch(list(texts))])
    padded, flops = 0, 0.0
    for chunk in chunks:
        width = spec.width(len(chunk), int(real[list(chunk)].max()))
        padded += width * len(chunk)
        flops += _flops(arch, len(chunk), width) if arch else 0.0
    out = {
        "real_tokens": int(real.sum()),
        "padded_tokens": padded,
        "mean_padded_len": padded / max(len(texts), 1),
        "real_token_share": float(real.sum()) / max(padded, 1),
    }
    if arch:
        out["flops"] = flops
        out["flops_unpadded"] = sum(_flops(arch, 1, int(n)) for n in real)
    return out


def _flops(arch: Arch, batch: int, length: int) -> float:
    """One encoder forward over ``batch`` texts of ``length`` tokens (``bench.models``)."""
    per_token = 2 * arch.weight_entries + 4 * arch.layers * length * arch.hidden
    return float(per_token * batch * length)


def _variants(repository: Path, twin: bool) -> dict[str, dict[str, Any]]:
    exact = release_lengths(repository)
    out: dict[str, dict[str, Any]] = {
        BASELINE: {"bucketed": False, "lengths": None},
        "bucketed, estimated lengths": {"bucketed": True, "lengths": None},
    }
    if exact is not None:
        out["bucketed, tokenizer lengths"] = {"bucketed": True, "lengths": exact}
        out[JOB] = {"bucketed": True, "lengths": exact}
        if twin:
            out[TWIN_JOB] = {"bucketed": True, "lengths": exact}
    return out


def compare(
    settings: Settings,
    rows: Sequence[tuple[ItemRow, str]],
    repository: Path,
    rounds: int,
    batch: int = 64,
    arch: Arch | None = None,
    fp32_peak: float | None = None,
    twin: Twin | None = None,
) -> dict[str, Any]:
    """Every variant over ``rows`` in each of ``rounds`` rounds, batches taking turns; with
    the item tower's ``arch`` and the machine's ``fp32_peak`` (FLOP/s), the FLOP rate of each
    and the items/s that peak would allow. ``twin`` adds the job through the twin ensemble
    that serves the tower otherwise."""
    spec = TokenizerSpec.of_release(repository)
    variants = _variants(repository, twin is not None)
    texts = [text for _, text in rows]
    batches = {name: item_batches(texts, batch, **v) for name, v in variants.items()}
    out: dict[str, Any] = {"items": len(rows), "batch": batch, "rounds": [], "variants": {}}
    if twin is not None and TWIN_JOB in variants:
        out["item_graphs"] = {JOB: twin.served, TWIN_JOB: twin.other}
    if arch is not None and fp32_peak:
        out.update(arch=arch.__dict__, fp32_peak=fp32_peak)
    for name in variants:
        out["variants"][name] = padding(texts, batches[name], spec, arch)
    stores = {
        name: VectorStore(settings.model_copy(update={k: f"{v}_{n}" for k, v in SCRATCH.items()}))
        for n, name in enumerate(variants)
    }
    triton = TritonClient(settings)
    tritons = dict.fromkeys(variants, triton)
    clients = [triton]
    if twin is not None and TWIN_JOB in variants:
        twin_settings = settings.model_copy(update={"triton_item_model": twin.ensemble})
        tritons[TWIN_JOB] = TritonClient(twin_settings)
        clients.append(tritons[TWIN_JOB])
    written: dict[str, dict[str, np.ndarray]] = {}
    try:
        _connect(stores.values())
        for client in clients:
            client.embed_items(texts[: 2 * batch], 120.0)  # warm-up, not timed
        for r in range(rounds):
            entry = _round(
                rows, batches, variants, batch, tritons, stores, first=r % 2, written=written
            )
            out["rounds"].append(entry)
            print(
                f"  round {r + 1}: "
                + ", ".join(f"{k} {v['items_per_s']:.1f} items/s" for k, v in entry.items()),
                flush=True,
            )
    finally:
        for store in stores.values():
            try:
                store.drop_collections()
            except StoreUnavailable as exc:  # reported, never in place of the run's own error
                print(f"  scratch collections of {store.items.name} not dropped: {exc}")
            store.close()
        for client in clients:
            client.close()
    for name, summary in out["variants"].items():
        runs = [entry[name] for entry in out["rounds"]]
        items = sum(run["items"] for run in runs)
        summary["items_per_s"] = items / sum(run["wall_s"] for run in runs)
        summary["embed_items_per_s"] = items / sum(run["embed_s"] for run in runs)
        summary["upsert_items_per_s"] = items / sum(run["upsert_s"] for run in runs)
        summary["x_file_order"] = [run["x_file_order"] for run in runs]
        summary["max_abs_diff_vs_file_order"] = _max_diff(written[name], written[BASELINE])
        if "fp32_peak" in out:
            embed_s = sum(run["embed_s"] for run in runs)
            summary["embed_flops_per_s"] = summary["flops"] * len(runs) / embed_s
            summary["share_of_peak"] = summary["embed_flops_per_s"] / out["fp32_peak"]
            summary["items_per_s_at_peak"] = out["fp32_peak"] * len(rows) / summary["flops"]
    if "fp32_peak" in out:
        unpadded = next(iter(out["variants"].values()))["flops_unpadded"]
        out["items_per_s_at_peak_unpadded"] = out["fp32_peak"] * len(rows) / unpadded
    print(render(out), flush=True)
    return out


def _connect(stores: Iterable[VectorStore], attempts: int = 4, pause_s: float = 3.0) -> None:
    """Each scratch store's collections, a few attempts each: the stack's Milvus Lite server,
    a Python process, once missed the 5 s connect timeout while other jobs loaded both
    cores (a fresh-clone ``make test`` beside a ``make demo``), which failed the section."""
    for store in stores:
        for attempt in range(attempts):
            try:
                store.ensure_collections()
                break
            except StoreUnavailable:
                if attempt == attempts - 1:
                    raise
                time.sleep(pause_s)


def _round(
    rows: Sequence[tuple[ItemRow, str]],
    batches: dict[str, list[list[int]]],
    variants: dict[str, dict[str, Any]],
    batch: int,
    tritons: dict[str, TritonClient],
    stores: dict[str, VectorStore],
    first: int,
    written: dict[str, dict[str, np.ndarray]],
) -> dict[str, Any]:
    """One pass of every variant over ``rows``: one batch of each in turn, and the jobs'
    whole passes after them (``first`` 0) or before them in the opposite order (1)."""
    names = list(batches)
    timed = {name: (_TimedTriton(tritons[name]), _TimedStore(stores[name])) for name in names}
    wall = dict.fromkeys(names, 0.0)
    done = dict.fromkeys(names, 0)
    for store in stores.values():
        store.drop_collections()
        store.ensure_collections()
    load = load_average()

    def job(name: str) -> None:
        t0 = time.perf_counter()
        triton_t, store_t = cast(TritonClient, timed[name][0]), cast(VectorStore, timed[name][1])
        done[name] = index_rows(rows, triton_t, store_t, batch, **variants[name])
        wall[name] = time.perf_counter() - t0

    jobs = [name for name in (JOB, TWIN_JOB) if name in names]
    if first:
        for name in reversed(jobs):
            job(name)
    turns = [name for name in names if name not in jobs]
    for step in range(max(len(batches[name]) for name in turns)):
        for name in turns if (step + first) % 2 == 0 else turns[::-1]:
            if step >= len(batches[name]):
                continue
            chunk = [rows[i] for i in batches[name][step]]
            t0 = time.perf_counter()
            done[name] += embed_and_upsert(
                chunk, cast(TritonClient, timed[name][0]), cast(VectorStore, timed[name][1])
            )
            wall[name] += time.perf_counter() - t0
    if not first:
        for name in jobs:
            job(name)
    entry: dict[str, Any] = {}
    for name in names:
        triton_t, store_t = timed[name]
        stored = stores[name].count(stores[name].items.name)
        _check(name, done[name], stored, store_t, rows)
        written[name] = store_t.vectors
        entry[name] = {
            "items": done[name],
            "wall_s": wall[name],
            "embed_s": triton_t.seconds,
            "upsert_s": store_t.seconds,
            "requests": triton_t.requests,
            "items_per_s": done[name] / wall[name],
            "load_average": [load, load_average()],
        }
    for name in names:
        entry[name]["x_file_order"] = entry[name]["items_per_s"] / entry[BASELINE]["items_per_s"]
    return entry


def _check(
    name: str, done: int, stored: int, store: _TimedStore, rows: Sequence[tuple[ItemRow, str]]
) -> None:
    """Every item written exactly once, and the collection holds them all."""
    ids = {str(row["item_id"]) for row, _ in rows}
    if not store.writes == done == len(rows) or set(store.vectors) != ids or stored != len(ids):
        raise AssertionError(
            f"{name}: {store.writes} writes of {len(store.vectors)} ids, {stored} stored, "
            f"for {len(rows)} rows"
        )


def _max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    if set(a) != set(b):
        raise AssertionError("the variants wrote different item ids")
    return max((float(np.abs(a[k] - b[k]).max()) for k in a), default=0.0)


def target_variant(section: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The job's own variant where measured (the release had a tokenizer), else the
    fastest bucketed one (end to end)."""
    bucketed = {k: v for k, v in section.get("variants", {}).items() if k != BASELINE}
    if not bucketed or "items_per_s" not in next(iter(bucketed.values())):
        return None
    name = JOB if JOB in bucketed else max(bucketed, key=lambda k: bucketed[k]["items_per_s"])
    return name, bucketed[name]


def baseline_items_per_s(results: dict[str, Any]) -> float:
    """File-order items/s of a run's results (NaN when not measured)."""
    variants = results.get("indexing", {}).get("variants", {})
    return float(variants.get(BASELINE, {}).get("items_per_s", float("nan")))


def describe() -> str:
    """This module's description as Markdown paragraphs (for ``BENCHMARKS.md``)."""
    paragraphs = []
    for paragraph in (__doc__ or "").split("\n\n")[1:]:
        entries = re.split(r"\n(?=- )", paragraph.strip())
        paragraphs.append("\n".join(" ".join(e.split()) for e in entries).replace("``", "`"))
    return "\n\n".join(paragraphs)


def render(section: dict[str, Any]) -> str:
    """The table of ``BENCHMARKS.md``: one row per variant; FLOP columns when measured."""
    peak = "fp32_peak" in section
    rows = []
    graphs = section.get("item_graphs", {})
    for name, v in section["variants"].items():
        runs = [entry[name] for entry in section["rounds"]]
        flops = (
            [
                fmt(v["embed_flops_per_s"] / 1e9, 1),
                f"{v['share_of_peak']:.0%}",
                fmt(v["items_per_s_at_peak"], 0),
            ]
            if peak
            else []
        )
        rows.append(
            [
                f"{name} ({graphs[name]})" if name in graphs else name,
                len(runs),
                fmt(v["items_per_s"], 1),
                fmt(v["embed_items_per_s"], 1),
                fmt(v["upsert_items_per_s"], 0),
                fmt(v["mean_padded_len"], 1),
                f"{v['real_token_share']:.0%}",
                *flops,
                "/".join(f"{x:.2f}" for x in v["x_file_order"]),
                f"{v['max_abs_diff_vs_file_order']:.1e}",
                "/".join(str(run["load_average"][0][0]) for run in runs),
            ]
        )
    headers = [
        "batches",
        "rounds",
        "items/s",
        "embed items/s",
        "upsert items/s",
        "padded len",
        "real tokens",
        *(["embed GFLOP/s", "of fp32 peak", "items/s at peak"] if peak else []),
        "x file order (per round)",
        "max abs diff vs file order",
        "load",
    ]
    return table(headers, rows)


def ceiling(section: dict[str, Any]) -> str:
    """What the measured fp32 peak allows at all: a sentence, or ``""`` when not measured."""
    if "fp32_peak" not in section:
        return ""
    a = section["arch"]
    real = next(iter(section["variants"].values()))["real_tokens"] / section["items"]
    return (
        f"FLOPs/token = 2 x W + 4 x layers x L x d (W = {a['weight_entries']:,}, "
        f"{a['layers']} layers, d = {a['hidden']}, L = padded length). At the fp32 GEMM "
        f"peak measured right before ({section['fp32_peak'] / 1e9:.1f} GFLOP/s) the item "
        f"tower could embed at most {section['items_per_s_at_peak_unpadded']:.0f} items/s "
        f"of this catalogue even with no padding at all (mean {real:.1f} real tokens per "
        "item); `items/s at peak` is that bound for the batches as sent."
    )
