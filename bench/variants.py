"""Serving experiments: the gateway against a changed copy of the release.

The copy is hard-linked from the exported repository (no weights duplicated); only the files
that change are replaced, never written through a link. The knobs are ones the served
``model.py`` already reads: ``onnx_file``, which graph it loads (the ranker's; or the item
tower's), and ``engine``, what runs it; the item tower's are served by a twin
``item_embedder_twin`` beside the release's own, so that both answer on one Triton. Triton
is restarted on the same ports with the copy; the gateway reconnects by itself.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import time
import types
from dataclasses import dataclass
from pathlib import Path

from bench.util import config_parameters
from core.config import REPO_ROOT
from ops.stack import LocalStack, gateway_serving

ITEM_TWIN = "item_embedder_twin"  # the twin item embedder's ensemble
RUNNER = REPO_ROOT / "model_repository" / "item_encoder" / "model.py"
FP32 = ("model.onnx", "onnxruntime")  # ONNX Runtime's fp32 graph: (onnx_file, engine)


@dataclass(frozen=True)
class Variant:
    name: str
    ranker_graph: Path | None = None  # served instead of the ranker's model.onnx
    item_twin: tuple[str, str] | None = None  # (onnx_file, engine) the twin item encoder serves


def _replace(path: Path, text: str) -> None:
    path.unlink()  # break the hard link first: the original must not change
    path.write_text(text)


def served_graph(model_dir: Path) -> str:
    """The ONNX file a python-backend model's CPU config serves (its ``onnx_file``)."""
    return config_parameters(model_dir).get("onnx_file", "model.onnx")


def served_engine(model_dir: Path) -> str:
    """What a python-backend model's CPU config runs its graph with (its ``engine``)."""
    return config_parameters(model_dir).get("engine", "onnxruntime")


ENGINES = {"onnxruntime": "ONNX Runtime fp32", "openvino-bf16": "OpenVINO bf16"}


def served_runner() -> types.ModuleType:
    """The served python-backend runner (``model_repository/item_encoder/model.py``, which
    the towers and rankers link to) as a module outside Triton: its engines, so that a
    benchmark runs a graph as it is served."""
    spec = importlib.util.spec_from_file_location("served_runner_model", RUNNER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def openvino_bf16() -> bool:
    """Whether OpenVINO runs bf16 products on this CPU (what the runner's ``auto`` asks)."""
    return served_runner().bf16_unavailable() is None


def item_tower_served(model_dir: Path) -> tuple[str, str]:
    """(onnx_file, engine) of the item encoder here, ``auto`` resolved as the served runner
    resolves it (unless its probe finds bf16 too far from fp32: then it logs so)."""
    graph, engine = served_graph(model_dir), served_engine(model_dir)
    if engine == "auto":
        engine = "openvino-bf16" if openvino_bf16() else "onnxruntime"
    return graph, engine


def served_label(served: tuple[str, str]) -> str:
    """``"model.onnx, OpenVINO bf16"``."""
    return f"{served[0]}, {ENGINES[served[1]]}"


def _with_parameter(config: str, key: str, value: str) -> str:
    """``config`` with its parameter ``key`` set to ``value`` (replaced, or added first)."""
    entry = re.compile(rf'\{{ key: "{key}", value: \{{ string_value: "[^"]+" \}} \}},?\n\s*')
    line = f'{{ key: "{key}", value: {{ string_value: "{value}" }} }},\n  '
    return entry.sub("", config).replace("parameters [\n  ", "parameters [\n  " + line, 1)


def _with_graph(config: str, graph: str) -> str:
    return _with_parameter(config, "onnx_file", graph)


def _item_twin(out: Path, served: tuple[str, str]) -> None:
    """``item_encoder_twin`` (the release's item encoder serving the graph ``served`` names
    with its engine) and ``item_embedder_twin`` (the tokenizer, then it), hard-linked beside
    the originals."""
    encoder = "item_encoder"
    for name in (encoder, "item_embedder"):
        twin = out / f"{name}_twin"
        shutil.copytree(out / name, twin, copy_function=os.link, ignore=_no_cache)
        text = (twin / "config.pbtxt").read_text()
        text = text.replace(f'name: "{name}"', f'name: "{twin.name}"')
        if name == encoder:
            text = _with_parameter(_with_graph(text, served[0]), "engine", served[1])
        else:
            text = text.replace(f'model_name: "{encoder}"', f'model_name: "{encoder}_twin"')
        _replace(twin / "config.pbtxt", text)


def _no_cache(directory: str, names: list[str]) -> list[str]:
    return [n for n in names if n == "__pycache__"]


def variant_repository(repository: Path, variant: Variant, out: Path) -> Path:
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(
        repository,
        out,
        copy_function=os.link,
        ignore=_no_cache,
    )
    if variant.ranker_graph is not None:
        versions = [p for p in (out / "ranker").iterdir() if p.name.isdigit()]
        for version in versions:
            os.link(variant.ranker_graph, version / "model.variant.onnx")
        config = out / "ranker" / "config.pbtxt"
        _replace(config, _with_graph(config.read_text(), "model.variant.onnx"))
    if variant.item_twin is not None:
        _item_twin(out, variant.item_twin)
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
