"""Per-client rate limits and bounded concurrency, through a real gRPC server."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from core.config import Settings
from services.api import pb, pb_grpc
from services.reliability.auth import hash_key
from services.reliability.concurrency import effective_in_flight, max_concurrent_rpcs
from services.reliability.ratelimit import TokenBuckets
from services.reliability.retry_info import DETAILS_KEY, RetryInfo, Status, retry_delay_ms
from tests.services.reliability.conftest import running_server

Code = grpc.StatusCode


def _call(
    stub: pb_grpc.RecommenderServiceStub, key: str = "", timeout: float = 5
) -> grpc.RpcError | grpc.StatusCode:
    """The call's error, or ``OK``."""
    metadata = (("x-api-key", key),) if key else ()
    try:
        stub.Recommend(pb.RecommendRequest(user_id="u"), metadata=metadata, timeout=timeout)
    except grpc.RpcError as exc:
        return exc
    return Code.OK


def test_token_bucket_refills() -> None:
    now = [100.0]
    buckets = TokenBuckets(rate=2.0, burst=3, clock=lambda: now[0])
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == 0.5  # one token back after 1/rate
    assert buckets.take("b") == 0.0  # clients are independent
    now[0] += 0.5
    assert buckets.take("a") == 0.0
    assert buckets.take("a", rate=0) == 0.0  # 0 = unlimited


def test_rate_limit_rejects_with_retry_info(base_settings: Settings) -> None:
    settings = base_settings.model_copy(update={"rate_limit_rps": 2.0, "rate_limit_burst": 2})
    with running_server(settings) as (target, _), grpc.insecure_channel(target) as channel:
        stub = pb_grpc.RecommenderServiceStub(channel)
        assert _call(stub) == Code.OK
        assert _call(stub) == Code.OK
        err = _call(stub)
        assert isinstance(err, grpc.RpcError)
        assert err.code() == Code.RESOURCE_EXHAUSTED
        assert "retry after" in err.details()
        trailers = err.trailing_metadata()
        delay = retry_delay_ms(trailers)
        assert delay is not None and 0 < delay <= 600  # 1/rate, plus up to 20 % jitter
        status = Status.FromString(dict(trailers)[DETAILS_KEY])
        info = RetryInfo()
        assert status.code == Code.RESOURCE_EXHAUSTED.value[0]
        assert status.details[0].Unpack(info)
        assert info.retry_delay.ToMilliseconds() == delay
        time.sleep(delay / 1000 + 0.05)
        assert _call(stub) == Code.OK


def test_rate_limit_is_per_client_key(base_settings: Settings) -> None:
    keys = {
        hash_key("a"): {"client": "a", "scopes": ["read"], "rate_limit_rps": 1},
        hash_key("b"): {"client": "b", "scopes": ["read"]},
    }
    settings = base_settings.model_copy(
        update={"auth_mode": "api_key", "api_keys": json.dumps(keys), "rate_limit_rps": 100.0}
    )
    settings = Settings.model_validate(settings.model_dump())  # api_keys -> SecretStr
    with running_server(settings) as (target, _), grpc.insecure_channel(target) as channel:
        stub = pb_grpc.RecommenderServiceStub(channel)
        assert _call(stub, "a") == Code.OK
        err = _call(stub, "a")  # a's own limit: 1/s
        assert isinstance(err, grpc.RpcError) and err.code() == Code.RESOURCE_EXHAUSTED
        assert [_call(stub, "b") for _ in range(5)] == [Code.OK] * 5


def test_overload_queues_briefly_then_sheds(base_settings: Settings) -> None:
    settings = base_settings.model_copy(
        update={"grpc_workers": 8, "max_in_flight": 2, "max_queue_wait_s": 0.1}
    )
    with running_server(settings) as (target, servicer), grpc.insecure_channel(target) as channel:
        servicer.delay = 0.6
        stub = pb_grpc.RecommenderServiceStub(channel)
        started = time.monotonic()
        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(lambda _: _call(stub), range(6)))
        elapsed = time.monotonic() - started
        codes = [r if r == Code.OK else r.code() for r in results]
        assert codes.count(Code.OK) == 2, codes
        assert codes.count(Code.RESOURCE_EXHAUSTED) == 4, codes
        shed = [r for r in results if r != Code.OK]
        assert all(retry_delay_ms(r.trailing_metadata()) for r in shed)
        assert servicer.peak == 2
        assert elapsed < 2.0


def test_short_bursts_wait_for_a_slot_instead_of_failing(base_settings: Settings) -> None:
    settings = base_settings.model_copy(
        update={"grpc_workers": 8, "max_in_flight": 2, "max_queue_wait_s": 2.0}
    )
    with running_server(settings) as (target, servicer), grpc.insecure_channel(target) as channel:
        servicer.delay = 0.05
        stub = pb_grpc.RecommenderServiceStub(channel)
        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(lambda _: _call(stub), range(12)))
        assert results == [Code.OK] * 12
        assert servicer.peak <= 2


def test_queue_wait_is_bounded_by_the_deadline(base_settings: Settings) -> None:
    settings = base_settings.model_copy(
        update={"grpc_workers": 4, "max_in_flight": 1, "max_queue_wait_s": 5.0}
    )
    with running_server(settings) as (target, servicer), grpc.insecure_channel(target) as channel:
        servicer.delay = 1.0
        stub = pb_grpc.RecommenderServiceStub(channel)
        with ThreadPoolExecutor(2) as pool:
            slow = pool.submit(_call, stub)
            time.sleep(0.2)
            started = time.monotonic()
            err = _call(stub, timeout=0.3)
            waited = time.monotonic() - started
            assert slow.result() == Code.OK
        assert isinstance(err, grpc.RpcError) and err.code() == Code.DEADLINE_EXCEEDED
        assert waited < 0.8


def test_server_limits_are_consistent() -> None:
    settings = Settings(grpc_workers=16, max_in_flight=40, max_pending_rpcs=16)
    assert effective_in_flight(settings) == 15  # a thread stays free for queued calls
    assert max_concurrent_rpcs(settings) == 32
