"""Every fault of the scriptable fake upstream, seen from both client surfaces.

For each fault: what the official OpenAI SDK raises or returns, what a task API client
reads from its event stream, that the fake saw the gateway let go where it had to, and
that queue depth, slots in use and running tasks all return to zero.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Gateway, pool
from tests.fakes.servers import AiohttpThread, wait_until
from tests.fakes.upstream import FakeUpstream
from tests.test_tasks_api import read_events, submit

MSG = [{"role": "user", "content": "hi"}]
FIRST_TOKEN_S = 0.25
IDLE_S = 0.5


def fault_config(url: str, **overrides: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "queue_capacity": 16,
        "timeouts": {"first_token_s": FIRST_TOKEN_S, "idle_s": IDLE_S, "total_s": 10},
        "retry": {"attempts": 3, "backoff_base_s": 0.01, "backoff_max_s": 0.05},
        "ejection": {"consecutive_failures": 1000},  # ejection has its own tests
        "max_context_tokens": 4096,
    }
    settings.update(overrides)
    return {
        "pools": [
            pool("p", ["m"], [{"id": "f0", "engine": "openai", "url": url, "slots": 2}], **settings)
        ]
    }


@pytest.fixture
def gw(
    fake_upstream: tuple[FakeUpstream, AiohttpThread], gateway_factory: Any
) -> Iterator[Gateway]:
    with gateway_factory(fault_config(fake_upstream[1].url)) as gateway:
        yield gateway


def sdk(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0, timeout=20)


def assert_nothing_leaked(gw: Gateway, fake: FakeUpstream) -> None:
    assert wait_until(
        lambda: gw.slots_in_use() == 0 and gw.queue_depth() == 0 and fake.active == 0,
        timeout=2,
    ), (gw.slots_in_use(), gw.queue_depth(), fake.active)
    assert gw.state.tasks.active() == 0
    assert all(p.retry.budget.retrying == 0 for p in gw.state.pools.values())


# -- faults before the first byte: an HTTP error after the retries -----------------------
BEFORE_FIRST_BYTE = [
    # fault spec, status the client sees, attempts, task error code, upstream let go
    ({"mode": "status", "status": 500}, 500, 3, "WORKER_RESET", False),
    ({"mode": "status", "status": 502}, 502, 3, "WORKER_RESET", False),
    ({"mode": "status", "status": 503, "retry_after": 0}, 503, 3, "POOL_UNAVAILABLE", False),
    # a Retry-After beyond the request's deadline is passed on at once, not waited out
    ({"mode": "status", "status": 429, "retry_after": 30}, 429, 1, "POOL_UNAVAILABLE", False),
    ({"mode": "reset_before_headers"}, 502, 3, "WORKER_RESET", False),
    ({"mode": "hang"}, 504, 3, "DECODE_TIMEOUT", True),
    ({"mode": "hang_after_headers"}, 504, 3, "DECODE_TIMEOUT", True),
    ({"mode": "error_event", "chunks": 0}, 502, 3, "WORKER_RESET", False),
]


@pytest.mark.parametrize(
    "spec,status,attempts,task_code,let_go",
    BEFORE_FIRST_BYTE,
    ids=[f"{s['mode']}-{s.get('status', '')}" for s, *_ in BEFORE_FIRST_BYTE],
)
def test_fault_before_first_byte(
    gw: Gateway,
    fake_upstream: Any,
    spec: dict[str, Any],
    status: int,
    attempts: int,
    task_code: str,
    let_go: bool,
) -> None:
    fake: FakeUpstream = fake_upstream[0]
    before = len(fake.bodies)
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as caught:
        sdk(gw).chat.completions.create(
            model="m", messages=MSG, stream=True, extra_body={"fake": spec}
        )
    error = caught.value
    assert error.status_code == status
    assert error.response.headers["x-orchgate-attempts"] == str(attempts)
    assert isinstance(error.body, dict) and error.body.get("message")  # OpenAI envelope
    sent = len(fake.bodies) - before
    if spec["mode"] == "reset_before_headers":
        # a drop before any byte looks like a stale keep-alive connection, which the
        # client resends once on a fresh one (backends/http1.py)
        assert attempts <= sent <= 2 * attempts
    else:
        assert sent == attempts
    if status in (429, 503):
        assert error.response.headers["retry-after"]
    if let_go:  # each timed-out attempt closed its upstream connection at once
        assert wait_until(lambda: len(fake.disconnects) == attempts, timeout=2)
        elapsed = time.monotonic() - started
        assert FIRST_TOKEN_S * attempts <= elapsed < FIRST_TOKEN_S * attempts + 1.5
    assert_nothing_leaked(gw, fake)

    task_id = submit(gw, params={"fake": spec}).json()["task_id"]
    events = read_events(gw, task_id)
    assert [name for name, _ in events] == ["error"]
    assert events[0][1]["code"] == task_code
    assert events[0][1]["retriable"] is True
    assert_nothing_leaked(gw, fake)


# -- faults after the first byte: an in-band error, then [DONE] --------------------------
AFTER_FIRST_BYTE = [
    ({"mode": "reset_after", "chunks": 3}, "upstream failed mid-stream", "WORKER_RESET", False),
    ({"mode": "error_event", "chunks": 3}, "engine exploded", "WORKER_RESET", False),
    ({"mode": "llamacpp_error", "chunks": 3}, "slot crashed", "WORKER_RESET", False),
    ({"mode": "no_done", "chunks": 3}, "without [DONE]", "WORKER_RESET", False),
    ({"mode": "drip", "chunks": 4, "delay_s": 5}, "sent nothing for 0.5s", "DECODE_TIMEOUT", True),
]


@pytest.mark.parametrize(
    "spec,message,task_code,let_go",
    AFTER_FIRST_BYTE,
    ids=[s["mode"] for s, *_ in AFTER_FIRST_BYTE],
)
def test_fault_after_first_byte(
    gw: Gateway,
    fake_upstream: Any,
    spec: dict[str, Any],
    message: str,
    task_code: str,
    let_go: bool,
) -> None:
    fake: FakeUpstream = fake_upstream[0]
    before = len(fake.bodies)
    received: list[str | None] = []
    stream = sdk(gw).chat.completions.create(
        model="m", messages=MSG, stream=True, extra_body={"fake": spec}
    )
    with pytest.raises(openai.APIError, match=message.replace("[", r"\[").replace("]", r"\]")):
        for chunk in stream:
            received.append(chunk.choices[0].delta.content)
    # what arrived is exactly what the upstream sent, never retried or spliced
    assert received and received == [f"t{i} " for i in range(len(received))]
    assert len(fake.bodies) - before == 1
    if let_go:
        assert wait_until(lambda: len(fake.disconnects) == 1, timeout=2)
    assert_nothing_leaked(gw, fake)

    task_id = submit(gw, params={"fake": spec}).json()["task_id"]
    events = read_events(gw, task_id)
    names = [name for name, _ in events]
    assert names[0] == "started" and names[-1] == "error" and set(names[1:-1]) == {"token"}
    assert events[-1][1]["code"] == task_code
    assert_nothing_leaked(gw, fake)


def test_raw_stream_ends_with_error_then_done(gw: Gateway) -> None:
    body = {"model": "m", "messages": MSG, "stream": True, "fake": {"mode": "drip", "delay_s": 5}}
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=10) as r:
        events = [e for e in b"".join(r.iter_bytes()).split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    assert b'"code":"upstream_timeout"' in events[-2]


# -- one-shot faults: the retry succeeds and the client never knows ---------------------
# (a non-streaming hang is bounded by total_s alone: test_non_streaming_hang_...)
ONE_SHOT = [
    ({"mode": "status", "status": 500}, True),
    ({"mode": "status", "status": 500}, False),
    ({"mode": "status", "status": 503, "retry_after": 0}, True),
    ({"mode": "status", "status": 503, "retry_after": 0}, False),
    ({"mode": "reset_before_headers"}, True),
    ({"mode": "reset_before_headers"}, False),
    ({"mode": "hang"}, True),
    ({"mode": "error_event", "chunks": 0}, True),
]


@pytest.mark.parametrize(
    "fault,stream",
    ONE_SHOT,
    ids=[f"{f['mode']}-{'stream' if s else 'json'}" for f, s in ONE_SHOT],
)
def test_one_shot_fault_is_retried_transparently(
    gw: Gateway, fake_upstream: Any, fault: dict[str, Any], stream: bool
) -> None:
    fake: FakeUpstream = fake_upstream[0]
    fake.script = [fault]
    response = sdk(gw).chat.completions.with_raw_response.create(
        model="m", messages=MSG, stream=stream
    )
    # a drop before any byte may already be resent by the connection pool (stale keep-alive)
    expected = ("1", "2") if fault["mode"] == "reset_before_headers" else ("2",)
    assert response.headers["x-orchgate-attempts"] in expected
    assert len(fake.bodies) == 2
    parsed = response.parse()
    if stream:
        assert [c.choices[0].delta.content for c in parsed] == ["t0 ", "t1 ", "t2 "]
    else:
        assert parsed.choices[0].message.content == "ok"
    assert_nothing_leaked(gw, fake)


def test_upstream_retry_after_is_honoured_within_the_deadline(
    gw: Gateway, fake_upstream: Any
) -> None:
    fake: FakeUpstream = fake_upstream[0]
    fake.script = [{"mode": "status", "status": 429, "retry_after": 1}]
    started = time.monotonic()
    response = httpx.post(
        gw.url + "/v1/chat/completions", json={"model": "m", "messages": MSG}, timeout=10
    )
    assert response.status_code == 200
    assert response.headers["x-orchgate-attempts"] == "2"
    assert time.monotonic() - started >= 0.95  # the only replica asked for a 1 s pause


def test_non_streaming_hang_is_a_504_at_the_total_deadline(
    fake_upstream: Any, gateway_factory: Any
) -> None:
    fake, server = fake_upstream
    config = fault_config(server.url, timeouts={"total_s": 1.0})
    with gateway_factory(config) as gw:
        started = time.monotonic()
        body = {"model": "m", "messages": MSG, "fake": {"mode": "hang"}}
        response = httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=10)
        elapsed = time.monotonic() - started
        assert response.status_code == 504
        assert response.json()["error"]["type"] == "timeout_error"
        assert response.headers["x-orchgate-attempts"] == "1"  # no time left to retry
        assert 1.0 <= elapsed < 2.0
        assert wait_until(lambda: len(fake.disconnects) == 1, timeout=1)
        assert_nothing_leaked(gw, fake)


def test_refused_replica(gateway_factory: Any) -> None:
    fake = FakeUpstream()
    server = AiohttpThread(fake.app)
    server.start()
    with gateway_factory(fault_config(server.url)) as gw:
        server.stop()  # the port now refuses connections
        with pytest.raises(openai.APIStatusError) as caught:
            sdk(gw).chat.completions.create(model="m", messages=MSG)
        assert caught.value.status_code == 502
        assert "unreachable" in caught.value.message
        # the replica is out at once: the next client is told when to come back
        with pytest.raises(openai.APIStatusError) as caught:
            sdk(gw).chat.completions.create(model="m", messages=MSG)
        assert caught.value.status_code == 503
        assert caught.value.response.headers["retry-after"]
        response = submit(gw)
        assert response.status_code == 503 and response.json()["code"] == "POOL_UNREADY"
        assert gw.slots_in_use() == 0 and gw.queue_depth() == 0
