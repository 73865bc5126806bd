"""Settings come from RECSYS_* environment variables with local defaults."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from core.config import Settings


def test_defaults_are_local(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("RECSYS_"):
            monkeypatch.delenv(key)
    s = Settings()
    assert s.grpc_host == "127.0.0.1" and s.grpc_port == 50051
    assert s.milvus_is_lite and s.milvus_uri.endswith("milvus.db")


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_MILVUS_URI", "http://milvus:19530")
    monkeypatch.setenv("RECSYS_RETRIEVAL_WEIGHTS", '{"ann": 2.0}')
    monkeypatch.setenv("RECSYS_MILVUS_TOKEN", "root:secret")
    s = Settings()
    assert not s.milvus_is_lite
    assert s.retrieval_weights == {"ann": 2.0}
    assert "secret" not in repr(s)


def test_bad_values_fail_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_GRPC_PORT", "70000")
    with pytest.raises(ValidationError, match="grpc_port"):
        Settings()


@pytest.mark.parametrize(
    ("changed", "why"),
    [
        ({"grpc_port": 0}, "fixed grpc_port"),
        ({"exposure_sink": "file"}, "exposure_sink=stream"),
    ],
)
def test_several_gateway_processes_need_one_port_and_the_shared_exposure_sink(
    changed: dict[str, object], why: str
) -> None:
    Settings.model_validate({"gateway_processes": 1, **changed})  # one process: fine
    with pytest.raises(ValidationError, match=why):
        Settings.model_validate({"gateway_processes": 2, **changed})
