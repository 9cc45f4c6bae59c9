"""OrchQueue v1 over real HTTP against the scriptable fake upstream: event order and
shapes, admission order, backpressure, race-free cancel, and nothing left behind."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import msgspec
import pytest

from tests.conftest import Gateway, pool
from tests.fakes.servers import AiohttpThread, wait_until
from tests.fakes.upstream import FakeUpstream
from tests.sse import parse_task_frames, read_task_events


def cfg(url: str, *, slots: int = 1, capacity: int = 8, **tasks: Any) -> dict[str, Any]:
    return {
        "tasks": tasks,
        "pools": [
            pool(
                "p",
                ["m"],
                [{"id": "f0", "engine": "openai", "url": url, "slots": slots}],
                queue_capacity=capacity,
                max_context_tokens=4096,
            )
        ],
    }


@pytest.fixture
def gw(
    fake_upstream: tuple[FakeUpstream, AiohttpThread], gateway_factory: Any
) -> Iterator[Gateway]:
    with gateway_factory(cfg(fake_upstream[1].url, slots=2)) as gateway:
        yield gateway


def submit(gw: Gateway, **body: Any) -> httpx.Response:
    body.setdefault("model_ref", "m")
    body.setdefault("prompt", "hello")
    return httpx.post(gw.url + "/v1/tasks", json=body, timeout=10)


def read_events(gw: Gateway, task_id: str) -> list[tuple[str, dict[str, Any]]]:
    return read_task_events(gw.url, task_id)


def test_submit_stream_end_with_exact_shapes(gw: Gateway, fake_upstream: Any) -> None:
    fake, _ = fake_upstream
    r = submit(gw, prompt="hi", max_tokens=5, seed=9, params={"fake": {"chunks": 5}})
    assert r.status_code == 202
    body = r.json()
    assert set(body) == {"task_id", "queue_position", "predicted_start_ms", "backoff_ms"}
    assert all(
        isinstance(body[k], int) for k in ("queue_position", "predicted_start_ms", "backoff_ms")
    )
    events = read_events(gw, body["task_id"])
    names = [name for name, _ in events]
    assert names == ["started"] + ["token"] * 5 + ["end"]
    assert set(events[0][1]) == {"queue_position", "predicted_start_ms"}
    assert [data for name, data in events if name == "token"] == [
        {"t": f"t{i} ", "i": i} for i in range(5)
    ]
    end = events[-1][1]
    assert end["tokens_out"] == 5 and isinstance(end["decode_time_ms"], int)
    sent = msgspec.json.decode(fake.bodies[-1])
    assert sent["prompt"] == "hi" and sent["seed"] == 9 and sent["stream"] is True
    assert sent["max_tokens"] == 5 and sent["model"] == "m"
    view = httpx.get(f"{gw.url}/v1/tasks/{body['task_id']}").json()
    assert view["state"] == "completed" and view["tokens_out"] == 5


def test_tokens_before_attach_are_not_lost_and_replays_are_identical(gw: Gateway) -> None:
    task_id = submit(gw, params={"fake": {"chunks": 20}}).json()["task_id"]
    assert wait_until(
        lambda: httpx.get(f"{gw.url}/v1/tasks/{task_id}").json()["state"] == "completed"
    )
    first, second = read_events(gw, task_id), read_events(gw, task_id)
    assert first == second and len(first) == 22


def test_messages_convenience_and_client_task_id(gw: Gateway, fake_upstream: Any) -> None:
    fake, _ = fake_upstream
    r = submit(gw, task_id="my-task-1", prompt=None, messages=[{"role": "user", "content": "hey"}])
    assert r.status_code == 202 and r.json()["task_id"] == "my-task-1"
    assert read_events(gw, "my-task-1")[-1][0] == "end"
    assert msgspec.json.decode(fake.bodies[-1])["messages"][0]["content"] == "hey"
    duplicate = submit(gw, task_id="my-task-1")
    assert duplicate.status_code == 409 and duplicate.json()["code"] == "INVALID_PARAMS"


@pytest.mark.parametrize(
    "body,needle",
    [
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "priority": "urgent"}, "priority"),
        ({"prompt": "x", "ctx": 10_000}, "context limit"),
        ({"prompt": "x" * 20_000, "max_tokens": 10}, "exceeds the context"),
        ({"prompt": "x", "max_tokens": 5000}, "exceeds the context"),
        ({"prompt": None}, "exactly one of"),
        ({"prompt": "x", "inputs": ["y"]}, "exactly one of"),
        ({"prompt": "x", "model_ref": "nope"}, "unknown model_ref"),
        ({"prompt": "x", "engine": "vllm"}, "does not match"),
        ({"prompt": "x", "workload": "embedding"}, "not served"),
        ({"prompt": "x", "workload": "dance"}, "workload"),
        ({"prompt": "x", "deadline_ms": -1}, "deadline_ms"),
    ],
)
def test_invalid_params(gw: Gateway, body: dict[str, Any], needle: str) -> None:
    r = submit(gw, **body)
    assert r.status_code == 400
    envelope = r.json()
    assert envelope["code"] == "INVALID_PARAMS" and needle in envelope["message"]
    assert isinstance(envelope["engine"], str)


def test_malformed_body_and_unknown_ids(gw: Gateway) -> None:
    r = httpx.post(
        gw.url + "/v1/tasks",
        content=b"{nope",
        timeout=5,
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["code"] == "INVALID_PARAMS"
    for method, path in [
        ("GET", "/v1/tasks/none"),
        ("GET", "/v1/tasks/none/stream"),
        ("POST", "/v1/tasks/none/cancel"),
    ]:
        r = httpx.request(method, gw.url + path, timeout=5)
        assert r.status_code == 404 and r.json()["code"] == "NOT_FOUND"


def test_cancel_answers(gw: Gateway) -> None:
    task_id = submit(gw, params={"fake": {"mode": "hang"}}).json()["task_id"]
    assert httpx.post(f"{gw.url}/v1/tasks/{task_id}/cancel").status_code == 204
    assert httpx.post(f"{gw.url}/v1/tasks/{task_id}/cancel").status_code == 204  # idempotent
    events = read_events(gw, task_id)
    assert events[-1] == (
        "end",
        {
            "tokens_out": 0,
            "decode_time_ms": events[-1][1]["decode_time_ms"],
            "decode_ms": events[-1][1]["decode_ms"],
            "cancelled": True,
        },
    )
    done = submit(gw, params={"fake": {"chunks": 1}}).json()["task_id"]
    read_events(gw, done)
    r = httpx.post(f"{gw.url}/v1/tasks/{done}/cancel")
    assert r.status_code == 409 and "already completed" in r.json()["message"]
    assert wait_until(lambda: gw.slots_in_use() == 0)


def test_interactive_before_batch_fifo_within_priority(
    fake_upstream: Any, gateway_factory: Any
) -> None:
    fake, server = fake_upstream
    with gateway_factory(cfg(server.url, slots=1)) as gw:
        holder = submit(gw, prompt="hold", params={"fake": {"chunks": 1, "delay_s": 0.5}})
        assert holder.status_code == 202
        assert wait_until(lambda: gw.slots_in_use() == 1)
        order = [
            ("b1", "batch"),
            ("i1", "interactive"),
            ("b2", "batch"),
            ("i2", "interactive"),
            ("b3", "batch"),
        ]
        positions = []
        for name, priority in order:
            r = submit(gw, prompt=name, priority=priority, params={"fake": {"chunks": 1}})
            positions.append(r.json()["queue_position"])
        # OpenAI requests share the same queue: X-Priority batch waits behind interactive
        assert positions == [1, 1, 3, 2, 5]
        assert gw.queue_depth() == 5
        assert wait_until(lambda: gw.queue_depth() == 0 and gw.slots_in_use() == 0, timeout=10)
        served = [msgspec.json.decode(b)["prompt"] for b in fake.bodies]
        assert served == ["hold", "i1", "i2", "b1", "b2", "b3"]


def test_openai_requests_share_the_queue_and_priority(
    fake_upstream: Any, gateway_factory: Any
) -> None:
    fake, server = fake_upstream
    with gateway_factory(cfg(server.url, slots=1)) as gw:
        submit(gw, prompt="hold", params={"fake": {"chunks": 1, "delay_s": 0.4}})
        assert wait_until(lambda: gw.slots_in_use() == 1)
        threads = []
        for name, priority in [("b", "batch"), ("i", "interactive")]:
            body = {"model": "m", "messages": [{"role": "user", "content": name}]}
            t = threading.Thread(
                target=httpx.post,
                args=(gw.url + "/v1/chat/completions",),
                kwargs={"json": body, "headers": {"X-Priority": priority}, "timeout": 10},
            )
            t.start()
            threads.append(t)
            expected = len(threads)
            assert wait_until(lambda: gw.queue_depth() == expected)  # noqa: B023
        for t in threads:
            t.join()
        order = [
            msgspec.json.decode(b).get("messages", [{}])[0].get("content") for b in fake.bodies[1:]
        ]
        assert order == ["i", "b"]


def test_full_queue_is_429_on_both_surfaces_with_backoff_headers(
    fake_upstream: Any, gateway_factory: Any
) -> None:
    fake, server = fake_upstream
    with gateway_factory(cfg(server.url, slots=1, capacity=1)) as gw:
        hang = {"fake": {"mode": "hang"}}
        first = submit(gw, params=hang).json()["task_id"]
        second = submit(gw, params=hang).json()["task_id"]
        assert gw.queue_depth() == 1
        r = submit(gw, params=hang)
        assert r.status_code == 429
        body = r.json()
        assert body["code"] == "ADMISSION_REJECT" and body["retriable"] is True
        assert body["engine"] == "openai" and body["retry_after_ms"] > 0
        assert "policy_label" not in body
        assert 1 <= int(r.headers["retry-after"]) <= 120
        assert (
            r.headers["x-backoff-ms"] == r.headers["retry-after-ms"] == str(body["retry_after_ms"])
        )
        o = httpx.post(
            gw.url + "/v1/chat/completions",
            timeout=5,
            json={"model": "m", "messages": [{"role": "user", "content": "x"}]},
        )
        assert o.status_code == 429
        assert o.json()["error"]["type"] == "rate_limit_error"
        assert o.json()["error"]["code"] == "queue_full"
        assert int(o.headers["retry-after"]) >= 1 and int(o.headers["retry-after-ms"]) > 0
        for task_id in (first, second):
            assert httpx.post(f"{gw.url}/v1/tasks/{task_id}/cancel").status_code == 204
        assert wait_until(lambda: gw.queue_depth() == 0 and gw.slots_in_use() == 0)
        assert wait_until(lambda: fake.active == 0)


@pytest.mark.slow  # measures a service rate over seconds
def test_retry_after_tracks_the_observed_service_rate(
    fake_upstream: Any, gateway_factory: Any
) -> None:
    fake, server = fake_upstream

    def retry_after_after(service_s: float) -> int:
        with gateway_factory(cfg(server.url, slots=1, capacity=1)) as gw:
            for _ in range(2):  # teach the pool its service time
                task_id = submit(gw, params={"fake": {"chunks": 1, "delay_s": service_s}}).json()[
                    "task_id"
                ]
                read_events(gw, task_id)
            hold = [
                submit(gw, params={"fake": {"mode": "hang"}}).json()["task_id"] for _ in range(2)
            ]
            r = submit(gw)
            assert r.status_code == 429
            for task_id in hold:
                httpx.post(f"{gw.url}/v1/tasks/{task_id}/cancel")
            return int(r.headers["retry-after"])

    fast, slow = retry_after_after(0.01), retry_after_after(1.6)
    assert fast == 1
    assert slow >= 3  # two places ahead x ~1.6 s on one slot


def test_pool_unready_is_503(fake_upstream: Any, gateway_factory: Any) -> None:
    fake, server = fake_upstream
    fake.healthy = False
    config = cfg(server.url)
    config["pools"][0]["replicas"][0]["engine"] = "llamacpp"
    with gateway_factory(config) as gw:
        r = submit(gw)
        assert r.status_code == 503 and r.json()["code"] == "POOL_UNREADY"
        assert r.headers["retry-after"]


@pytest.mark.parametrize(
    "mode,code", [("reset_after", "WORKER_RESET"), ("error_event", "WORKER_RESET")]
)
def test_upstream_failure_mid_task_is_an_error_event(gw: Gateway, mode: str, code: str) -> None:
    task_id = submit(gw, params={"fake": {"mode": mode, "chunks": 3}}).json()["task_id"]
    events = read_events(gw, task_id)
    assert [n for n, _ in events] == ["started", "token", "token", "token", "error"]
    error = events[-1][1]
    assert error["code"] == code and error["engine"] == "openai" and error["retriable"] is True
    assert httpx.get(f"{gw.url}/v1/tasks/{task_id}").json()["state"] == "failed"


def test_upstream_client_error_before_start_is_an_error_event(gw: Gateway) -> None:
    task_id = submit(gw, params={"fake": {"mode": "status", "status": 400}}).json()["task_id"]
    events = read_events(gw, task_id)
    assert events == [
        (
            "error",
            {
                "code": "INVALID_PARAMS",
                "message": "fake failure",
                "engine": "openai",
                "retriable": False,
            },
        )
    ]


@pytest.mark.slow  # hundreds of cancel races
def test_cancel_in_a_tight_loop_never_yields_a_token_after_the_ack(
    fake_upstream: Any, gateway_factory: Any
) -> None:
    fake, server = fake_upstream
    rng = random.Random(7)
    with gateway_factory(cfg(server.url, slots=2, capacity=16)) as gw:
        with httpx.Client(base_url=gw.url, timeout=10) as client:
            for _ in range(100):
                task_id = client.post(
                    "/v1/tasks",
                    json={
                        "model_ref": "m",
                        "prompt": "x",
                        "params": {"fake": {"chunks": 400, "delay_s": 0}},
                    },
                ).json()["task_id"]
                time.sleep(rng.choice([0, 0, 0.001, 0.003, 0.01]))
                assert client.post(f"/v1/tasks/{task_id}/cancel").status_code in (204, 409)
                acked = client.get(f"/v1/tasks/{task_id}").json()
                events = read_events(gw, task_id)
                names = [n for n, _ in events]
                if acked["state"] == "completed":
                    continue  # finished before the cancel landed: a 409, not a cancel
                assert names[-1] == "end" and events[-1][1]["cancelled"] is True
                assert names.count("token") == acked["tokens_out"]
                assert "token" not in names[names.index("end") :]
        assert wait_until(lambda: gw.slots_in_use() == 0 and gw.queue_depth() == 0)
        assert wait_until(lambda: fake.active == 0, timeout=3)


@pytest.mark.slow  # a thousand requests
def test_thousand_mixed_requests_leave_nothing_behind(
    fake_upstream: Any, gateway_factory: Any
) -> None:
    fake, server = fake_upstream
    with gateway_factory(cfg(server.url, slots=4, capacity=64)) as gw:
        statuses = asyncio.run(_mixed_load(gw.url, 1000, concurrency=32))
        assert statuses.get(500, 0) == 0 and sum(statuses.values()) == 1000
        assert wait_until(lambda: gw.queue_depth() == 0 and gw.slots_in_use() == 0, timeout=5)
        assert wait_until(lambda: fake.active == 0, timeout=5)
        assert gw.state.tasks.active() == 0


async def _mixed_load(url: str, total: int, *, concurrency: int) -> dict[int, int]:
    rng = random.Random(1234)
    statuses: dict[int, int] = {}
    sem = asyncio.Semaphore(concurrency)
    chat = {
        "model": "m",
        "messages": [{"role": "user", "content": "x"}],
        "fake": {"chunks": 10, "delay_s": 0.002},
    }

    async def one(client: httpx.AsyncClient, kind: int) -> None:
        async with sem:
            status = 0
            try:
                if kind == 0:  # streaming client that walks away early
                    async with client.stream(
                        "POST", "/v1/chat/completions", json={**chat, "stream": True}
                    ) as r:
                        status = r.status_code
                        async for _ in r.aiter_bytes():
                            if rng.random() < 0.5:
                                break
                elif kind == 1:  # non-stream with a client timeout
                    r = await client.post(
                        "/v1/chat/completions", json=chat, timeout=rng.choice([0.005, 5.0])
                    )
                    status = r.status_code
                else:  # task, sometimes cancelled, sometimes streamed to the end
                    r = await client.post(
                        "/v1/tasks",
                        json={
                            "model_ref": "m",
                            "prompt": "x",
                            "params": {"fake": {"chunks": 10, "delay_s": 0.002}},
                        },
                    )
                    status = r.status_code
                    if status == 202:
                        task_id = r.json()["task_id"]
                        if kind == 2:
                            await asyncio.sleep(rng.random() * 0.02)
                            await client.post(f"/v1/tasks/{task_id}/cancel")
                        else:
                            async with client.stream("GET", f"/v1/tasks/{task_id}/stream") as s:
                                async for _ in s.aiter_bytes():
                                    pass
            except httpx.TimeoutException:
                status = 499
            statuses[status] = statuses.get(status, 0) + 1

    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(base_url=url, timeout=10, limits=limits) as client:
        await asyncio.gather(*(one(client, rng.randrange(4)) for _ in range(total)))
    return statuses


def test_finished_tasks_are_evicted(fake_upstream: Any, gateway_factory: Any) -> None:
    fake, server = fake_upstream
    with gateway_factory(cfg(server.url, slots=2, max_finished=3)) as gw:
        ids = []
        for _ in range(6):
            task_id = submit(gw, params={"fake": {"chunks": 1}}).json()["task_id"]
            read_events(gw, task_id)
            ids.append(task_id)
        assert wait_until(lambda: len(gw.state.tasks) <= 4)
        assert httpx.get(f"{gw.url}/v1/tasks/{ids[0]}").status_code == 404
        assert httpx.get(f"{gw.url}/v1/tasks/{ids[-1]}").status_code == 200


def test_task_routes_require_the_token(fake_upstream: Any, gateway_factory: Any) -> None:
    config = cfg(fake_upstream[1].url)
    config["auth"] = {"token": "tok"}
    with gateway_factory(config) as gw:
        r = httpx.post(gw.url + "/v1/tasks", json={"prompt": "x"})
        assert r.status_code == 401 and r.json()["code"] == "UNAUTHORIZED"
        r = httpx.post(
            gw.url + "/v1/tasks", json={"prompt": "x"}, headers={"Authorization": "Bearer bad"}
        )
        assert r.status_code == 401 and r.json()["code"] == "UNAUTHORIZED"
        r = httpx.post(
            gw.url + "/v1/tasks",
            json={"prompt": "x", "params": {"fake": {"chunks": 1}}},
            headers={"Authorization": "Bearer tok"},
        )
        assert r.status_code == 202


def test_the_task_and_control_surfaces_emit_no_correlation_header(gw: Gateway) -> None:
    """Home profile §5 (SPEC.md): x-request-id is the OpenAI surface's, nobody else's."""
    answers = [
        httpx.post(gw.url + "/v1/tasks", json={"prompt": "x", "params": {"fake": {}}}),
        httpx.get(gw.url + "/v1/tasks/nope"),
        httpx.get(gw.url + "/v1/status"),
        httpx.get(gw.url + "/health"),
        httpx.post(gw.url + "/v1/tasks", content=b"{", headers={"content-type": "text/plain"}),
    ]
    for answer in answers:
        assert "x-request-id" not in answer.headers, (answer.request.url, answer.headers)
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}], "fake": {}}
    assert httpx.post(gw.url + "/v1/chat/completions", json=chat).headers["x-request-id"]
    assert httpx.get(gw.url + "/v1/nothing").headers["x-request-id"]


def test_llama_orch_contract_decisions(gw: Gateway) -> None:
    """SPEC.md: unknown task fields are accepted and ignored, ``ctx: 0`` means the default,
    every error envelope names an engine (a string)."""
    extra = {"prompt": "x", "params": {"fake": {}}, "ctx": 0, "some_future_field": {"a": 1}}
    accepted = httpx.post(gw.url + "/v1/tasks", json=extra)
    assert accepted.status_code == 202, accepted.text
    refused = httpx.post(gw.url + "/v1/tasks", json={"prompt": 5})
    assert refused.status_code == 400 and isinstance(refused.json()["engine"], str)
    missing = httpx.get(gw.url + "/v1/tasks/nope")
    assert missing.status_code == 404 and missing.json()["engine"] == "orchgate"


def test_a_reconnecting_client_resumes_after_its_last_event_id(gw: Gateway) -> None:
    """Every event carries ``id: n`` (dense from 1); a client that loses the stream and
    reconnects with ``Last-Event-ID: n`` gets event n + 1 onwards: together exactly the
    events of one uninterrupted read, none lost, none twice -- mid-run and after the end."""
    spec = {"fake": {"chunks": 30, "delay_s": 0.02}}
    task_id = submit(gw, prompt="hi", max_tokens=30, params=spec).json()["task_id"]
    url = f"{gw.url}/v1/tasks/{task_id}/stream"
    first = b""
    with httpx.stream("GET", url, timeout=20) as response:  # leaves after a few events
        for chunk in response.iter_bytes():
            first += chunk
            if first.count(b"event: token") >= 3 and first.endswith(b"\n\n"):
                break
    seen = parse_task_frames(first)
    last_id = seen[-1][0]
    assert last_id >= 4 and seen[0][0] == 1
    with httpx.stream("GET", url, headers={"Last-Event-ID": str(last_id)}, timeout=20) as rest:
        resumed = parse_task_frames(b"".join(rest.iter_bytes()))
    assert resumed[0][0] == last_id + 1 and resumed[-1][1] == "end"
    whole = parse_task_frames(httpx.get(url, timeout=20).content)
    assert seen + resumed == whole
    assert [d["i"] for _, name, d in whole if name == "token"] == list(range(30))
    # after the end: only what follows, or nothing at all
    tail = httpx.get(url, headers={"Last-Event-ID": str(len(whole) - 1)}, timeout=5)
    assert parse_task_frames(tail.content) == whole[-1:]
    assert httpx.get(url, headers={"Last-Event-ID": str(len(whole))}, timeout=5).content == b""
    bad = httpx.get(url, headers={"Last-Event-ID": "seven"}, timeout=5)
    assert bad.status_code == 400 and bad.json()["code"] == "INVALID_PARAMS"
