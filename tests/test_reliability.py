"""Retry policy, retry budget, client-retry damping and outlier ejection, over real HTTP."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import httpx
import pytest

from backends.errors import (
    BackendFailed,
    BackendOverloaded,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
    BackendUnservable,
    error_from_status,
)
from policies.admission import AdmissionQueue
from policies.health import Ejector, counts_as_failure
from policies.retry import RetryBudget, RetryPolicy, client_retry_count
from tests.conftest import pool, sick_and_live
from tests.fakes.servers import wait_until
from tests.test_fault_matrix import fault_config
from tests.test_policies import replica as make_replica

MSG = [{"role": "user", "content": "hi"}]
ALWAYS_500 = {"mode": "status", "status": 500}


def post(url: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=20)


@pytest.mark.parametrize(
    "status,retried",
    [(400, False), (401, False), (404, False), (422, False), (408, True), (409, True),
     (429, True), (500, True), (502, True), (503, True), (504, True)],
)  # fmt: skip
def test_which_upstream_statuses_are_retried(
    fake_upstream: Any, gateway_factory: Any, status: int, retried: bool
) -> None:
    fake, server = fake_upstream
    with gateway_factory(fault_config(server.url)) as gw:
        body = {"model": "m", "messages": MSG, "fake": {"mode": "status", "status": status}}
        response = post(gw.url, body)
        assert response.status_code == status
        assert response.headers["x-orchgate-attempts"] == ("3" if retried else "1")
        assert len(fake.bodies) == (3 if retried else 1)


@pytest.mark.parametrize("client_retries,attempts", [("0", 3), ("1", 2), ("2", 1), ("7", 1)])
def test_a_retrying_client_gets_fewer_gateway_retries(
    fake_upstream: Any, gateway_factory: Any, client_retries: str, attempts: int
) -> None:
    fake, server = fake_upstream
    with gateway_factory(fault_config(server.url)) as gw:
        body = {"model": "m", "messages": MSG, "fake": ALWAYS_500}
        response = post(gw.url, body, **{"x-stainless-retry-count": client_retries})
        assert response.headers["x-orchgate-attempts"] == str(attempts)
        assert len(fake.bodies) == attempts


def test_retry_budget_keeps_a_dead_backend_from_being_hammered(
    fake_upstream: Any, gateway_factory: Any
) -> None:
    """16 concurrent requests fail at once; the budget (ratio 0, minimum 1) lets one retry
    be in flight at a time instead of 32 retries."""
    fake, server = fake_upstream
    config = fault_config(
        server.url,
        retry={"attempts": 3, "backoff_base_s": 0.01, "budget_ratio": 0, "budget_min": 1},
    )
    config["pools"][0]["replicas"][0]["slots"] = 16
    with gateway_factory(config) as gw:
        body = {"model": "m", "messages": MSG, "fake": {**ALWAYS_500, "delay_s": 0.3}}
        results: list[httpx.Response] = []
        threads = [
            threading.Thread(target=lambda: results.append(post(gw.url, body))) for _ in range(16)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        attempts = [int(r.headers["x-orchgate-attempts"]) for r in results]
        assert all(r.status_code == 500 for r in results)
        assert sum(attempts) == len(fake.bodies)
        assert sum(attempts) <= 16 + 4, attempts  # without the budget: 48
        budget = gw.state.pools["p"].retry.budget
        assert budget.refused >= 12 and budget.retrying == 0


def _replica_view(gw: Any, replica_id: str) -> dict[str, Any]:
    health = httpx.get(gw.url + "/v1/pools/p/health", timeout=5).json()
    return next(r for r in health["metrics"]["replicas"] if r["id"] == replica_id)


@pytest.mark.slow  # waits out real, doubling cooldowns
def test_consecutive_failures_eject_for_a_growing_cooldown(
    fake_upstream: Any, sick_upstream: Any, gateway_factory: Any
) -> None:
    live, live_server = fake_upstream
    _, sick_server = sick_upstream
    config = {
        "pools": [
            pool(
                "p",
                ["m"],
                sick_and_live(sick_server.url, live_server.url),
                health_interval_s=0.1,
                retry={"attempts": 3, "backoff_base_s": 0.01},
                ejection={"consecutive_failures": 2, "cooldown_s": 0.6, "max_cooldown_s": 5},
            )
        ]
    }
    with gateway_factory(config) as gw:
        body = {"model": "m", "messages": MSG}
        # each request fails once on "sick" (most free slots) and is served by "live"
        for _ in range(2):
            response = post(gw.url, body)
            assert response.status_code == 200
            assert response.headers["x-orchgate-replica"] == "live"
        view = _replica_view(gw, "sick")
        assert view["ready"] is False and view["ejections"] == 1
        assert "ejected for 0.6s after 2 consecutive failures" in view["detail"]
        # while ejected, requests go straight to the live replica
        response = post(gw.url, body)
        assert response.headers["x-orchgate-attempts"] == "1"
        # a passing probe after the cooldown brings it back ...
        assert wait_until(lambda: _replica_view(gw, "sick")["ready"], timeout=2)
        # ... and the next ejection lasts twice as long
        for _ in range(2):
            assert post(gw.url, body).status_code == 200
        view = _replica_view(gw, "sick")
        assert view["ejections"] == 2 and "ejected for 1.2s" in view["detail"]
        ejected_at = time.monotonic()
        assert wait_until(lambda: _replica_view(gw, "sick")["ready"], timeout=3)
        assert time.monotonic() - ejected_at >= 1.0


def test_ejection_policy_unit() -> None:
    now = [100.0]
    replica = make_replica("r0", 1)
    queue = AdmissionQueue([replica], capacity=1, queue_timeout_s=1)
    ejector = Ejector(
        queue, consecutive_failures=3, cooldown_s=10, max_cooldown_s=25, clock=lambda: now[0]
    )
    assert ejector.record_failure(replica) is None
    assert ejector.record_failure(replica) is None
    assert ejector.record_failure(replica) == 10 and not replica.ready
    assert ejector.record_failure(replica) is None  # already out: no stacking
    cooldowns = []
    for _ in range(3):
        now[0] = replica.ejected_until + 1
        replica.failures = 0
        cooldowns.append([ejector.record_failure(replica) for _ in range(3)][-1])
    assert cooldowns == [20, 25, 25]  # doubles, capped at max_cooldown_s
    now[0] = replica.ejected_until + 26  # clean for longer than the cap: forgiven
    assert [ejector.record_failure(replica) for _ in range(3)][-1] == 10


def test_what_counts_against_a_replica() -> None:
    def status(code: int) -> Any:
        return error_from_status(code, b"", replica_id="r", engine="e", retry_after=None)

    assert counts_as_failure(BackendUnavailable("x"))  # transport failures and timeouts
    assert counts_as_failure(BackendTimeout("x"))
    assert counts_as_failure(BackendFailed("upstream dropped the request"))
    # a well-formed answer, whatever its status, says the replica is alive: the probe decides
    assert not counts_as_failure(status(500))
    assert not counts_as_failure(status(502))
    assert not counts_as_failure(status(503))  # alive and busy (or loading: probes know)
    assert not counts_as_failure(status(429))
    assert not counts_as_failure(status(400))
    assert isinstance(status(429), BackendOverloaded)
    assert isinstance(status(422), BackendRejected)
    # what the engine says is the request's fault is passed on, never retried elsewhere
    llama_501 = (
        b'{"error":{"code":501,"message":"This server does not support embeddings. Start it '
        b'with `--embeddings`","type":"not_supported_error"}}'
    )
    llama_image = (
        b'{"error":{"code":500,"message":"image input is not supported - hint: if this is '
        b'unexpected, you may need to provide the mmproj","type":"server_error"}}'
    )
    for status_code, raw in ((501, llama_501), (500, llama_image), (501, b"")):
        error = error_from_status(status_code, raw, replica_id="r", engine="e", retry_after=None)
        assert isinstance(error, BackendUnservable) and not error.retryable, raw
        assert error.status == status_code and not counts_as_failure(error)
    generic = error_from_status(
        500, b'{"error": "boom"}', replica_id="r", engine="e", retry_after=None
    )
    assert isinstance(generic, BackendFailed) and generic.retryable  # another replica may serve


def test_budget_and_damping_units() -> None:
    in_flight = [10]
    budget = RetryBudget(0.2, 1, lambda: in_flight[0])
    assert [budget.try_acquire() for _ in range(3)] == [True, True, False]
    in_flight[0] = 0
    budget.release()
    budget.release()
    assert budget.try_acquire() and not budget.try_acquire()  # the minimum still holds
    policy = RetryPolicy(attempts=3, backoff_base_s=0.1, backoff_max_s=1, budget=budget)
    assert [policy.attempts_for(n) for n in range(4)] == [3, 2, 1, 1]
    assert client_retry_count(b"2") == 2 and client_retry_count(b"x") == 0
    assert client_retry_count(None) == 0 and client_retry_count(b"-3") == 0
    for attempt in range(1, 8):
        ceiling = min(1, 0.1 * 2 ** (attempt - 1))
        assert ceiling / 2 <= policy.backoff_s(attempt) <= ceiling


def test_retries_never_cross_the_first_byte(fake_upstream: Any, gateway_factory: Any) -> None:
    """A stream that fails after its first event is not retried: one upstream request."""
    fake, server = fake_upstream
    with gateway_factory(fault_config(server.url)) as gw:
        body = {"model": "m", "messages": MSG, "stream": True}
        body["fake"] = {"mode": "reset_after", "chunks": 1}
        with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=10) as r:
            assert r.headers["x-orchgate-attempts"] == "1"
            raw = b"".join(r.iter_bytes())
        assert raw.count(b'"content":"t0 "') == 1 and raw.endswith(b"data: [DONE]\n\n")
        assert len(fake.bodies) == 1


def test_idle_limit_ignores_a_client_that_reads_slowly() -> None:
    """Silence only counts while the gateway waits for the upstream: when the consumer
    stops reading (back-pressure), the upstream is paused, not timed out."""
    from backends.base import Limits
    from backends.http1 import Http1Pool

    async def scenario() -> bytes:
        payload = b"x" * (1024 * 1024)

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (4 * len(payload)))
            for _ in range(4):
                writer.write(payload)
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        http = Http1Pool(f"http://127.0.0.1:{port}", connect_timeout_s=1)
        loop = asyncio.get_running_loop()
        limits = Limits(first_byte_s=0.2, idle_s=0.2, deadline=loop.time() + 10)
        response = await http.request(http.build(b"GET", b"/", b""), limits)
        received = b""
        while (data := await response.next_chunk()) is not None:
            received += data
            if len(received) < len(payload):
                await asyncio.sleep(0.6)  # a slow reader: 3x the idle limit
        await response.aclose()
        server.close()
        return received

    assert len(asyncio.run(scenario())) == 4 * 1024 * 1024
