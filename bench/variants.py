"""Serving experiments: the gateway against a changed copy of the release.

The copy is hard-linked from the exported repository (no weights duplicated); only the files
that change are replaced, never written through a link. The knob is one the served
``model.py`` already reads: ``onnx_file``, which graph the ranker's ONNX Runtime session
loads. Triton is restarted on the same ports with the copy; the gateway reconnects by itself.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ops.stack import LocalStack, gateway_serving


@dataclass(frozen=True)
class Variant:
    name: str
    ranker_graph: Path | None = None  # served instead of the ranker's model.onnx


def _replace(path: Path, text: str) -> None:
    path.unlink()  # break the hard link first: the original must not change
    path.write_text(text)


def variant_repository(repository: Path, variant: Variant, out: Path) -> Path:
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(
        repository,
        out,
        copy_function=os.link,
        ignore=lambda d, names: [n for n in names if n == "__pycache__"],
    )
    if variant.ranker_graph is not None:
        versions = [p for p in (out / "ranker").iterdir() if p.name.isdigit()]
        for version in versions:
            os.link(variant.ranker_graph, version / "model.variant.onnx")
        config = out / "ranker" / "config.pbtxt"
        text = config.read_text()
        entry = '{ key: "onnx_file", value: { string_value: "model.variant.onnx" } },'
        _replace(config, text.replace("parameters [", "parameters [\n  " + entry, 1))
    return out


def serve(stack: LocalStack, repository: Path, timeout: float = 240.0) -> None:
    """Restart Triton on ``repository`` and wait until the gateway serves again."""
    proc = stack.processes.pop("triton", None)
    if proc is not None:
        proc.stop()
    stack.settings = stack.settings.model_copy(update={"model_repository": repository})
    stack.start_triton(timeout=timeout)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if gateway_serving(stack.gateway_target):
                time.sleep(3 * stack.settings.readiness_poll_s)  # ranker status refreshed too
                return
        except Exception:  # the gateway answers NOT_SERVING or not at all meanwhile
            pass
        time.sleep(0.5)
    raise RuntimeError("gateway did not serve again after the Triton restart")
