"""GET /metrics after real traffic: the OpenAI SDK and the task API in front of a real
llama-server. Every Home-profile series is there with its exact labels, and its values
match what the clients saw -- token counts included when the client never asked for usage.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Gateway, LlamaServer, pool
from tests.fakes.servers import wait_until
from tests.fakes.upstream import FAKE_PROMPT_TOKENS
from tests.prom import scrape, value
from tests.sse import read_task_events

MODEL = "smollm2-135m"
MESSAGES = [{"role": "user", "content": "Write a long story about a red fox."}]
MAX_TOKENS = 6  # SmolLM2 never finishes a story in 6 tokens: every answer is cut at "length"

REQUIRED = {
    "queue_depth": {"engine", "engine_version", "pool_id", "priority"},
    "tasks_enqueued_total": {"engine", "engine_version", "pool_id", "replica_id", "priority"},
    "tasks_rejected_total": {"engine", "reason"},
    "tokens_in_total": {"engine", "engine_version", "pool_id", "replica_id"},
    "tokens_out_total": {"engine", "engine_version", "pool_id", "replica_id"},
    "model_state": {"model_id", "state"},
}
GPU_SERIES = {"gpu_utilization", "vram_used_bytes"}


@pytest.fixture
def gateway(llama_server: LlamaServer, gateway_factory: Any) -> Iterator[Gateway]:
    config = {
        "pools": [
            pool("chat", [MODEL], [{"id": "llama0", "engine": "llamacpp",
                                    "url": llama_server.url}]),
            # nothing listens there: every request to this pool is refused as unready
            pool("down", ["ghost"], [{"id": "ghost0", "engine": "openai",
                                      "url": "http://127.0.0.1:9"}]),
        ]
    }  # fmt: skip
    with gateway_factory(config) as gw:
        assert wait_until(lambda: gw.state.pools["chat"].queue.is_ready(), timeout=20)
        yield gw


pytestmark = pytest.mark.llamacpp


def test_scrape_after_real_traffic_has_every_series_with_the_right_values(
    gateway: Gateway,
) -> None:
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)
    common: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "max_tokens": MAX_TOKENS}
    prompt_tokens = set()

    # two plain answers, one of them at batch priority
    for headers in ({}, {"X-Priority": "batch"}):
        answer = client.chat.completions.create(**common, extra_headers=headers)
        assert answer.choices[0].finish_reason == "length"
        assert answer.usage is not None and answer.usage.completion_tokens == MAX_TOKENS
        prompt_tokens.add(answer.usage.prompt_tokens)

    # two streams that never asked for usage: the client sees no usage chunk at all ...
    for _ in range(2):
        chunks = list(client.chat.completions.create(**common, stream=True))
        assert all(chunk.choices for chunk in chunks), "a usage-only chunk leaked to the client"
        assert all(chunk.usage is None for chunk in chunks)
        assert chunks[-1].choices[0].finish_reason == "length"

    # ... and one that asked gets exactly the engine's usage chunk
    chunks = list(
        client.chat.completions.create(
            **common, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == MAX_TOKENS
    prompt_tokens.add(chunks[-1].usage.prompt_tokens)
    assert len(prompt_tokens) == 1, "same prompt, same count"
    (prompt,) = prompt_tokens

    # one task through the OrchQueue API
    task = httpx.post(
        gateway.url + "/v1/tasks",
        json={"model_ref": MODEL, "prompt": "Once upon a time", "max_tokens": 5, "seed": 1},
        timeout=10,
    ).json()
    events = read_task_events(gateway.url, task["task_id"], timeout=30)
    assert events[-1][0] == "end"
    task_tokens = events[-1][1]["tokens_out"]

    # two refusals: a pool with no ready replica, on each surface
    refused = httpx.post(gateway.url + "/v1/chat/completions", json={**common, "model": "ghost"})
    assert refused.status_code == 503
    refused = httpx.post(gateway.url + "/v1/tasks", json={"model_ref": "ghost", "prompt": "x"})
    assert refused.status_code == 503

    version = httpx.get(gateway.url + "/v1/pools/chat/health").json()["metrics"]["replicas"][0][
        "engine_version"
    ]
    assert version
    series = scrape(gateway.url)

    for name, labels in REQUIRED.items():
        assert name in series, name
        assert all(set(got) == labels for got, _ in series[name]), (name, series[name])
    assert not GPU_SERIES & series.keys(), "no NVML here: GPU series must be absent"
    assert not [n for n in series if n.startswith("orchgate_")], "extended metrics are off"

    replica = {"engine": "llamacpp", "engine_version": version,
               "pool_id": "chat", "replica_id": "llama0"}  # fmt: skip
    assert value(series, "tasks_enqueued_total", **replica, priority="interactive") == 4 + 1
    assert value(series, "tasks_enqueued_total", **replica, priority="batch") == 1
    assert value(series, "tokens_out_total", **replica) == 5 * MAX_TOKENS + task_tokens
    # the five chat requests exactly; the task's prompt adds its own, unknown to the client
    assert value(series, "tokens_in_total", **replica) > 5 * prompt
    for priority in ("interactive", "batch"):
        assert (
            value(series, "queue_depth", engine="llamacpp", pool_id="chat", priority=priority) == 0
        )
    assert value(series, "queue_depth", engine="llamacpp", pool_id="chat", priority="batch") == 0
    assert value(series, "tasks_rejected_total", engine="openai", reason="pool_unready") == 2
    assert value(series, "model_state", model_id=MODEL, state="Active") == 1
    assert value(series, "model_state", model_id=MODEL, state="Retired") == 0
    assert value(series, "model_state", model_id="ghost", state="Active") == 1

    # the access log carries the same counts, per request
    log = gateway.access_log().decode()
    assert f'"tokens_in":{prompt},"tokens_out":{MAX_TOKENS}' in log


def test_tokens_in_is_exact_without_a_task(gateway: Gateway) -> None:
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)
    answer = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    assert answer.usage is not None
    list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, stream=True))
    series = scrape(gateway.url)
    assert value(series, "tokens_in_total", replica_id="llama0") == 2 * answer.usage.prompt_tokens
    assert value(series, "tokens_out_total", replica_id="llama0") == 2 * 2


def test_queue_full_is_counted_by_reason(fake_upstream: Any, gateway_factory: Any) -> None:
    _, server = fake_upstream
    replica = {"id": "f0", "engine": "openai", "url": server.url, "slots": 1}
    config = {"pools": [pool("p", ["m"], [replica], queue_capacity=0)]}
    with gateway_factory(config) as gw:
        assert wait_until(lambda: gw.state.pools["p"].queue.is_ready(), timeout=10)
        slow = {"model": "m", "messages": MESSAGES, "stream": True,
                "fake": {"mode": "drip", "chunks": 3, "delay_s": 0.5}}  # fmt: skip
        with httpx.stream("POST", gw.url + "/v1/chat/completions", json=slow, timeout=10) as held:
            assert held.status_code == 200
            refused = httpx.post(
                gw.url + "/v1/chat/completions", json={"model": "m", "messages": MESSAGES}
            )
            assert refused.status_code == 429
            b"".join(held.iter_bytes())
        series = scrape(gw.url)
    assert value(series, "tasks_rejected_total", engine="openai", reason="queue_full") == 1
    assert value(series, "tasks_enqueued_total", replica_id="f0", priority="interactive") == 1


def test_extended_metrics_are_opt_in_and_count_what_happened(
    fake_upstream: Any, gateway_factory: Any
) -> None:
    fake, server = fake_upstream
    replica = {"id": "f0", "engine": "openai", "url": server.url, "slots": 4}
    config = {
        "metrics": {"extended": True},
        "pools": [pool("p", ["m"], [replica], retry={"backoff_base_s": 0.01})],
    }
    with gateway_factory(config) as gw:
        assert wait_until(lambda: gw.state.pools["p"].queue.is_ready(), timeout=10)
        url = gw.url + "/v1/chat/completions"
        stream = {"model": "m", "messages": MESSAGES, "stream": True}
        for _ in range(3):
            assert httpx.post(url, json=stream).status_code == 200
        fake.script.append({"mode": "status", "status": 503, "retry_after": 0})
        assert httpx.post(url, json={"model": "m", "messages": MESSAGES}).status_code == 200
        broken = {**stream, "fake": {"mode": "reset_after", "chunks": 2}}
        assert b"upstream_stream_error" in httpx.post(url, json=broken).content
        series = scrape(gw.url)
    ids = {"pool_id": "p", "replica_id": "f0"}
    assert value(series, "orchgate_time_to_first_byte_seconds_count", **ids) == 5
    assert value(series, "orchgate_request_duration_seconds_count", **ids) == 5
    assert value(series, "orchgate_request_duration_seconds_bucket", **ids, le="+Inf") == 5
    assert value(series, "orchgate_retries_total", pool_id="p") == 1
    assert value(series, "orchgate_upstream_errors_total", **ids, kind="overloaded") == 1
    assert value(series, "orchgate_upstream_errors_total", **ids, kind="upstream_stream_error") == 1
    assert value(series, "orchgate_ejections_total", **ids) == 0
    assert value(series, "orchgate_slots_in_use", **ids) == 0
    # streams that did not ask for usage were still counted, from the fake's usage chunk
    assert value(series, "tokens_in_total", replica_id="f0") >= 3 * FAKE_PROMPT_TOKENS
