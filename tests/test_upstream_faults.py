"""Faults a real engine can't produce on demand, from the scriptable fake upstream.

For each: what an OpenAI SDK client sees, and that nothing leaks (slots, connections).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Gateway, pool, sick_and_live
from tests.fakes.servers import AiohttpThread, wait_until
from tests.fakes.upstream import FakeUpstream

MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture
def gw(
    fake_upstream: tuple[FakeUpstream, AiohttpThread], gateway_factory: Any
) -> Iterator[Gateway]:
    cfg = {
        "pools": [
            pool(
                "p",
                ["m"],
                [{"id": "f0", "engine": "openai", "url": fake_upstream[1].url, "slots": 2}],
            )
        ]
    }
    with gateway_factory(cfg) as gateway:
        yield gateway


def client_for(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0, timeout=10)


def test_stream_relays_every_event(gw: Gateway) -> None:
    chunks = list(
        client_for(gw).chat.completions.create(
            model="m", messages=MSG, stream=True, extra_body={"fake": {"chunks": 40}}
        )
    )
    assert [c.choices[0].delta.content for c in chunks] == [f"t{i} " for i in range(40)]


@pytest.mark.parametrize("phase", ["hang", "hang_after_headers"])
def test_disconnect_while_waiting_for_first_byte_closes_upstream(
    gw: Gateway, fake_upstream: Any, phase: str
) -> None:
    fake, _ = fake_upstream
    body = {"model": "m", "messages": MSG, "stream": True, "fake": {"mode": phase}}

    def call() -> None:
        try:
            httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=0.5)
        except httpx.TimeoutException:
            pass

    started = time.monotonic()
    call()  # the client gives up after 0.5 s and closes its connection
    assert wait_until(lambda: len(fake.disconnects) == 1, timeout=2), "upstream never saw it"
    assert fake.disconnects[0] - started < 1.5
    assert wait_until(lambda: gw.slots_in_use() == 0, timeout=1)
    assert fake.active == 0


def test_disconnect_while_queued_frees_the_place(gw: Gateway, fake_upstream: Any) -> None:
    fake, _ = fake_upstream
    hang = {"model": "m", "messages": MSG, "fake": {"mode": "hang"}}
    holders = [
        threading.Thread(target=lambda: _post_ignoring_timeout(gw, hang, 1.5)) for _ in range(2)
    ]
    for t in holders:
        t.start()
    assert wait_until(lambda: gw.slots_in_use() == 2)
    queued = threading.Thread(
        target=lambda: _post_ignoring_timeout(gw, {"model": "m", "messages": MSG}, 0.5)
    )
    queued.start()
    assert wait_until(lambda: gw.queue_depth() == 1)
    queued.join()  # the client gave up while queued: its place is freed at once
    assert wait_until(lambda: gw.queue_depth() == 0, timeout=0.5)
    assert gw.slots_in_use() == 2
    for t in holders:
        t.join()
    assert wait_until(lambda: gw.slots_in_use() == 0 and fake.active == 0, timeout=2)


def test_abandoned_streams_leave_no_connection_behind(gw: Gateway) -> None:
    body = {"model": "m", "messages": MSG, "stream": True, "fake": {"chunks": 500, "delay_s": 0.01}}
    for _ in range(10):
        with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=10) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: {"))
    pool = gw.state.pools["p"].replicas[0].backend.pool  # type: ignore[attr-defined]
    # each abandoned stream closed its upstream connection; at most the probes' idle one stays
    assert wait_until(lambda: pool.open_connections <= 1, timeout=3), pool.open_connections


def _post_ignoring_timeout(gw: Gateway, body: dict[str, Any], timeout: float) -> None:
    try:
        httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=timeout)
    except httpx.TimeoutException:
        pass


@pytest.mark.parametrize(
    "mode,expected",
    [
        ("reset_after", "upstream failed mid-stream"),
        ("error_event", "engine exploded"),
        ("llamacpp_error", "slot crashed"),
        ("no_done", "without [DONE]"),
    ],
)
def test_failure_after_first_byte_is_an_in_band_error_then_done(
    gw: Gateway, mode: str, expected: str
) -> None:
    body = {"model": "m", "messages": MSG, "stream": True, "fake": {"mode": mode, "chunks": 3}}
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=10) as r:
        assert r.status_code == 200
        events = [e for e in b"".join(r.iter_bytes()).split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    assert expected.encode() in events[-2] and events[-2].startswith(b'data: {"error"')
    assert sum(e.startswith(b'data: {"id"') for e in events) == 3
    # the SDK raises on the in-band error instead of returning a silently cut reply
    stream = client_for(gw).chat.completions.create(
        model="m", messages=MSG, stream=True, extra_body={"fake": {"mode": mode, "chunks": 3}}
    )
    with pytest.raises(openai.APIError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        for _ in stream:
            pass
    assert wait_until(lambda: gw.slots_in_use() == 0)


def test_error_before_first_event_is_an_http_error(gw: Gateway) -> None:
    body = {
        "model": "m",
        "messages": MSG,
        "stream": True,
        "fake": {"mode": "error_event", "chunks": 0},
    }
    response = httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=10)
    assert response.status_code == 502
    assert response.json()["error"]["message"] == "engine exploded"
    assert response.headers["x-orchgate-attempts"] == "3"


def test_upstream_429_passes_retry_after(gw: Gateway) -> None:
    body = {
        "model": "m",
        "messages": MSG,
        "fake": {"mode": "status", "status": 429, "retry_after": 0},
    }
    response = httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=10)
    assert response.status_code == 429
    assert response.json()["error"]["type"] == "rate_limit_error"
    assert response.headers["retry-after"] == "1"


def test_client_error_is_not_retried(gw: Gateway, fake_upstream: Any) -> None:
    fake, _ = fake_upstream
    before = len(fake.bodies)
    body = {"model": "m", "messages": MSG, "fake": {"mode": "status", "status": 400}}
    response = httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=10)
    assert response.status_code == 400
    assert len(fake.bodies) - before == 1
    assert response.headers["x-orchgate-attempts"] == "1"


def test_failing_replica_fails_over_to_a_live_one(
    fake_upstream: Any, sick_upstream: Any, gateway_factory: Any
) -> None:
    fake, server = fake_upstream
    _, sick_server = sick_upstream
    cfg = {"pools": [pool("p", ["m"], sick_and_live(sick_server.url, server.url))]}
    with gateway_factory(cfg) as gateway:
        response = httpx.post(
            gateway.url + "/v1/chat/completions",
            json={"model": "m", "messages": MSG},
            timeout=10,
        )
        assert response.status_code == 200
        assert response.headers["x-orchgate-replica"] == "live"
        assert response.headers["x-orchgate-attempts"] == "2"
        assert fake.bodies  # the live replica served it
