"""Triton's own ``perf_analyzer`` against the ensembles, where it can run here.

The binary ships in the ``tritonclient`` wheel (``.venv/bin/perf_analyzer``) but links
``libb64.so.0d`` and ``libcudart.so.12``. The first is bundled (renamed) in the
``nvidia-pytriton`` wheel of the Triton environment, the second in the PyPI package
``nvidia-cuda-runtime-cu12``; both are looked up and put on ``LD_LIBRARY_PATH`` through a
directory of links under ``var/bench``. When one is missing the section says which.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.util import load_average
from core.config import REPO_ROOT

WANTED = {"libb64.so.0d": "libb64*.so.0d", "libcudart.so.12": "libcudart.so.12"}


def _search_roots(var_dir: Path) -> list[Path]:
    roots = [var_dir / "pydeps", Path(sys.prefix)]
    roots += [REPO_ROOT / ".venv-triton", REPO_ROOT / ".venv"]
    return [r for r in roots if r.is_dir()]


def _missing(binary: Path, env: dict[str, str]) -> list[str]:
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, env=env, timeout=30)
    return [line.split()[0] for line in out.stdout.splitlines() if "not found" in line]


def locate(var_dir: Path) -> tuple[Path | None, dict[str, str], list[str]]:
    """The binary, the environment it runs with, and libraries still missing."""
    candidates = [Path(sys.executable).parent / "perf_analyzer", shutil.which("perf_analyzer")]
    binary = next((Path(c) for c in candidates if c and Path(c).is_file()), None)
    if binary is None:
        return None, {}, ["perf_analyzer binary"]
    env = dict(os.environ)
    missing = _missing(binary, env)
    if missing:
        links = var_dir / "lib"
        links.mkdir(parents=True, exist_ok=True)
        for name in missing:
            pattern = WANTED.get(name)
            if pattern is None:
                continue
            for root in _search_roots(var_dir):
                found = next(iter(sorted(root.rglob(pattern))), None)
                if found is not None:
                    link = links / name
                    link.unlink(missing_ok=True)
                    link.symlink_to(found.resolve())
                    break
        env["LD_LIBRARY_PATH"] = f"{links}:{env.get('LD_LIBRARY_PATH', '')}"
        missing = _missing(binary, env)
    return binary, env, missing


def _input_file(path: Path, rows: Sequence[dict[str, str]]) -> Path:
    data = [{k: {"content": [v], "shape": [1]} for k, v in row.items()} for row in rows]
    path.write_text(json.dumps({"data": data}))
    return path


def run_perf_analyzer(
    var_dir: Path,
    grpc_url: str,
    item_texts: Sequence[str],
    pairs: Sequence[tuple[str, str]],
    concurrencies: Sequence[int],
    interval_ms: int,
    timeout_s: float,
) -> dict[str, Any]:
    binary, env, missing = locate(var_dir)
    if binary is None or missing:
        return {
            "obtainable": False,
            "why": f"missing: {', '.join(missing)}",
            "how": "pip install nvidia-cuda-runtime-cu12 (libcudart.so.12); apt-get install "
            "libb64-0d, or the copy bundled in nvidia-pytriton",
        }
    work = var_dir / "perf_analyzer"
    work.mkdir(parents=True, exist_ok=True)
    jobs = {
        "item_embedder": _input_file(work / "items.json", [{"TEXT": t} for t in item_texts]),
        "ranker_scorer": _input_file(
            work / "pairs.json", [{"QUERY": q, "DOCUMENT": d} for q, d in pairs]
        ),
    }
    results: list[dict[str, Any]] = []
    for model, data in jobs.items():
        for concurrency in concurrencies:
            report = work / f"{model}-c{concurrency}.csv"
            argv = [
                str(binary),
                "-m",
                model,
                "-u",
                grpc_url,
                "-i",
                "grpc",
                "-b",
                "1",
                "--input-data",
                str(data),
                "--concurrency-range",
                f"{concurrency}:{concurrency}",
                "--measurement-interval",
                str(interval_ms),
                "--max-trials",
                "5",
                "--stability-percentage",
                "100",  # a shared 2-core machine is never 10 % stable
                "-f",
                str(report),
            ]
            entry: dict[str, Any] = {"model": model, "concurrency": concurrency}
            try:
                proc = subprocess.run(
                    argv, capture_output=True, text=True, env=env, timeout=timeout_s
                )
            except subprocess.TimeoutExpired:
                entry["error"] = f"timed out after {timeout_s:.0f}s"
                results.append(entry)
                continue
            if proc.returncode != 0 or not report.is_file():
                entry["error"] = (proc.stderr or proc.stdout)[-400:]
                results.append(entry)
                continue
            row = next(csv.DictReader(io.StringIO(report.read_text())))
            entry.update(
                {
                    "infer_per_s": float(row["Inferences/Second"]),
                    "p50_ms": float(row["p50 latency"]) / 1000,
                    "p95_ms": float(row["p95 latency"]) / 1000,
                    "p99_ms": float(row["p99 latency"]) / 1000,
                    "server_queue_ms": float(row.get("Server Queue", 0)) / 1000,
                    "server_compute_ms": (
                        float(row.get("Server Compute Input", 0))
                        + float(row.get("Server Compute Infer", 0))
                        + float(row.get("Server Compute Output", 0))
                    )
                    / 1000,
                }
            )
            results.append(entry)
    return {
        "obtainable": True,
        "binary": str(binary),
        "batch_size": 1,
        "measurement_interval_ms": interval_ms,
        "results": results,
        "load_average": load_average(),
    }
