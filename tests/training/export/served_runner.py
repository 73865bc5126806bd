"""The served python-backend runner (``model_repository/item_encoder/model.py``) loaded in
this process, with a stand-in for Triton's ``triton_python_backend_utils``."""

from __future__ import annotations

import sys
import types

import pytest

from bench.variants import served_runner
from training.precision import cpu_has_bf16


def load_runner(monkeypatch: pytest.MonkeyPatch, logs: list[str]) -> types.ModuleType:
    """The runner module; what it logs (warnings and info alike) goes to ``logs``."""
    utils = types.ModuleType("triton_python_backend_utils")
    utils.Logger = types.SimpleNamespace(log_warn=logs.append, log_info=logs.append)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", utils)
    return served_runner()


def tower_atol(fp32: float) -> float:
    """How far a served tower's vector may be from ONNX Runtime's fp32 run of the same graph,
    or from itself in another batch: ``fp32`` where the towers serve fp32, bf16's rounding
    (measured up to 1.3e-3 on MiniLM) where the CPU has bf16 instructions and their configs'
    engine ``auto`` serves them on OpenVINO."""
    return 5e-3 if cpu_has_bf16() else fp32
