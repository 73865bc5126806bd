"""Small helpers shared by the benchmark sections: bounded loops, quantiles, load average,
a Triton model's config parameters."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # imported where used: a GPU machine runs bench.gpu without pydantic
    from core.config import Settings

_PARAM = re.compile(r'key:\s*"(\w+)",\s*value:\s*\{\s*string_value:\s*"([^"]*)"\s*\}')


def config_parameters(model_dir: Path) -> dict[str, str]:
    """A Triton model's ``parameters`` (string values) from its ``config.pbtxt``."""
    return dict(_PARAM.findall((model_dir / "config.pbtxt").read_text()))


def precision(backend: str) -> str:
    """The peak a backend's row is compared with: ``int8``, ``bf16`` or ``fp32``."""
    return next((p for p in ("int8", "bf16") if backend.endswith(p)), "fp32")


def publish(result: dict[str, Any], text: str, path: Path) -> None:
    """Print a bench's table and write its figures, the table with them, to ``path``."""
    result["table"] = text
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(text)


#: a bundle's weights for a lent GPU machine: half the bytes, so that they travel
FP16_WEIGHTS = "model_fp16.safetensors"


def copy_weights(
    source: Path, weights: str, target: Path, out_weights: str, half: bool, files: Sequence[str]
) -> None:
    """Copy a model directory's ``files``, its floating-point weights (``weights``, a
    safetensors file) cast to fp16 or back to fp32 as ``out_weights``."""
    import shutil

    from safetensors.torch import load_file, save_file

    target.mkdir(parents=True, exist_ok=True)
    for name in files:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
    tensors = load_file(str(source / weights))
    save_file(
        {
            k: (v.half() if half else v.float()) if v.is_floating_point() else v
            for k, v in tensors.items()
        },
        str(target / out_weights),
        metadata={"format": "pt"},
    )


@contextlib.contextmanager
def engine_settings(prefix: str) -> Iterator[Settings]:
    """The settings of a local stack of a bench's own running the real Milvus engine (in a
    temporary directory named ``prefix``), stopped after."""
    from core.config import Settings
    from ops.stack import local_stack

    with (
        tempfile.TemporaryDirectory(prefix=prefix) as tmp,
        local_stack(Settings(), Path(tmp)) as stack,
    ):
        stack.start_milvus(engine=True)
        yield stack.settings


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` says."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (what else was running while we measured)."""
    return [round(x, 2) for x in os.getloadavg()]


def quantiles(values: Sequence[float], qs: Sequence[float] = (50, 95, 99)) -> dict[str, float]:
    """``{"p50": ..., "p95": ..., "p99": ...}`` in the unit of ``values``; NaN when empty."""
    if not len(values):
        return {f"p{q:g}": float("nan") for q in qs}
    arr = np.asarray(values, dtype=np.float64)
    return {f"p{q:g}": float(np.percentile(arr, q)) for q in qs}


@dataclass
class Bounded:
    """Run ``fn`` until ``max_iters`` calls or ``max_seconds`` have passed (at least once)."""

    max_iters: int
    max_seconds: float
    warmup: int = 1
    times: list[float] = field(default_factory=list)

    def run(self, fn: Callable[[], Any]) -> Bounded:
        for _ in range(self.warmup):
            fn()
        start = time.perf_counter()
        while len(self.times) < self.max_iters:
            t0 = time.perf_counter()
            fn()
            self.times.append(time.perf_counter() - t0)
            if time.perf_counter() - start >= self.max_seconds:
                break
        return self

    @property
    def total(self) -> float:
        return float(sum(self.times))

    @property
    def mean(self) -> float:
        return self.total / max(len(self.times), 1)


def fmt(value: float, digits: int = 1) -> str:
    """A number for a Markdown table: ``-`` for NaN/None."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    return f"{value:,.{digits}f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
