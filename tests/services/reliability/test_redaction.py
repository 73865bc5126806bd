"""Client-visible failure text names the failed component only; retry hints carry jitter."""

from __future__ import annotations

from services.inference.triton_client import InferenceUnavailable
from services.reliability.redaction import public_degraded, public_unavailable
from services.reliability.retry_info import JITTER, PUSHBACK_KEY, jittered, retry_trailers
from services.vectors.store import StoreSchemaError, StoreUnavailable

INTERNAL = "10.3.7.9"


def test_unavailable_messages_hide_addresses_and_exception_text() -> None:
    cases = {
        StoreUnavailable(f"Milvus at http://{INTERNAL}:19530: <_InactiveRpcError ...>"): "vector",
        StoreSchemaError(f"collection items at {INTERNAL}: dim mismatch"): "vector",
        InferenceUnavailable(f"triton {INTERNAL}:8001: connection refused"): "model server",
        RuntimeError(f"socket {INTERNAL} closed"): "a dependency",
    }
    for exc, start in cases.items():
        message = public_unavailable(exc)
        assert message.startswith(start) and INTERNAL not in message and "retry" in message


def test_degraded_reasons_keep_the_component_only() -> None:
    reasons = [
        f"milvus unavailable: get_user: Milvus at http://{INTERNAL}:19530: refused",
        "feature ranker unavailable: triton not ready",
        f"milvus unavailable: search: {INTERNAL} timed out",
    ]
    assert public_degraded(reasons) == "milvus unavailable; feature ranker unavailable"
    assert public_degraded([]) == ""


def test_retry_hints_are_jittered_upwards_and_pushed_back() -> None:
    assert jittered(1.0, rand=lambda: 0.0) == 1.0
    assert jittered(1.0, rand=lambda: 1.0) == 1.0 + JITTER
    samples = {jittered(0.5) for _ in range(50)}
    assert len(samples) > 1 and all(0.5 <= s <= 0.5 * (1 + JITTER) for s in samples)
    trailers = dict(retry_trailers(8, "busy", 0.25))
    assert trailers[PUSHBACK_KEY] == trailers["retry-after-ms"] == "250"
