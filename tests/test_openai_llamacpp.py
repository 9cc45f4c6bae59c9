"""The official OpenAI SDK against orchgate in front of a real llama-server with SmolLM2.

The SDK must not be able to tell the gateway from the backend: same shapes, same streams,
same determinism; plus a request id on every response and a freed slot when a client
walks away mid-stream.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Gateway, LlamaServer, pool
from tests.fakes.servers import wait_until

pytestmark = pytest.mark.llamacpp

MODEL = "smollm2-135m"
MESSAGES = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture
def gateway(llama_server: LlamaServer, gateway_factory: Any) -> Iterator[Gateway]:
    config = {
        "pools": [
            pool(
                "chat",
                [MODEL, "smol"],
                [{"id": "llama0", "engine": "llamacpp", "url": llama_server.url + "/v1"}],
            )
        ]
    }
    with gateway_factory(config) as gw:
        yield gw


@pytest.fixture
def client(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)


def test_models_list_has_every_model_and_alias(client: openai.OpenAI) -> None:
    page = client.models.list()
    ids = [m.id for m in page.data]
    assert ids == [MODEL, "smol"]
    assert all(m.object == "model" and m.owned_by for m in page.data)


def test_models_carry_the_engines_context_and_capabilities(
    gateway: Gateway, client: openai.OpenAI
) -> None:
    """What chat UIs filter on, from llama-server's ``/props``: a slot's context (``-c``
    over ``-np``), chat (the GGUF has a chat template), no tools (its template takes
    none), no vision (no projector)."""
    assert wait_until(lambda: gateway.state.pools["chat"].queue.is_ready(), timeout=10)
    for model in client.models.list().data:
        extra = model.model_extra or {}
        assert extra["context_length"] == 1024, extra
        assert extra["capabilities"] == ["chat", "completions"], extra
    one = httpx.get(f"{gateway.url}/v1/models/smol").json()
    assert one["context_length"] == 1024 and one["root"] == MODEL


def test_slots_discovered_from_props(gateway: Gateway, llama_server: LlamaServer) -> None:
    health = httpx.get(f"{gateway.url}/v1/pools/chat/health").json()
    replica = health["metrics"]["replicas"][0]
    assert health["ready"] is True and health["draining"] is False
    assert replica["slots"] == llama_server.slots  # from /props total_slots, not config
    assert replica["engine_version"]


def test_chat_non_stream(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0
    )
    completion = raw.parse()
    assert raw.headers["x-request-id"]
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content
    assert completion.usage is not None and 0 < completion.usage.completion_tokens <= 12


def test_chat_via_alias(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model="smol", messages=MESSAGES, max_tokens=4)
    assert completion.choices[0].message.content is not None


def test_chat_stream_without_usage_has_no_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=8, stream=True, temperature=0
        )
    )
    assert chunks, "no chunks"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert all(c.choices for c in chunks), "a usage-only chunk appeared without include_usage"
    assert all(c.usage is None for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text.strip()


def test_chat_stream_with_include_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None and last.usage.completion_tokens == 8
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_is_relayed_event_for_event_and_ends_with_done(
    gateway: Gateway, llama_server: LlamaServer
) -> None:
    """Byte-level: the gateway's SSE has exactly the events the backend sent."""
    body = {
        "model": MODEL,
        "messages": MESSAGES,
        "max_tokens": 10,
        "stream": True,
        "seed": 7,
        "temperature": 0.8,
    }

    def events(url: str) -> list[bytes]:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            raw = b"".join(r.iter_bytes())
        return [e for e in raw.split(b"\n\n") if e]

    via_gateway = events(gateway.url)
    direct = events(llama_server.url)
    assert via_gateway[-1] == b"data: [DONE]"
    assert len(via_gateway) == len(direct)

    def content(evts: list[bytes]) -> list[bytes]:  # ids and timings differ per request
        return [e.split(b'"created"')[0] for e in evts]

    assert content(via_gateway) == content(direct)


def test_completions_non_stream_and_stream(client: openai.OpenAI) -> None:
    completion = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=6)
    assert completion.choices[0].text
    pieces = list(
        client.completions.create(model=MODEL, prompt="The sky is", max_tokens=6, stream=True)
    )
    assert "".join(p.choices[0].text for p in pieces if p.choices)


def test_fixed_seed_gives_identical_text(client: openai.OpenAI) -> None:
    def run() -> str:
        completion = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Write a short poem."}],
            max_tokens=24,
            temperature=1.0,
            seed=1234,
        )
        return completion.choices[0].message.content or ""

    first, second = run(), run()
    assert first and first == second


def test_unknown_fields_pass_through(client: openai.OpenAI) -> None:
    # llama.cpp extras (top_k, n_probs) and OpenAI fields the gateway never reads
    completion = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=4,
        seed=3,
        extra_body={"top_k": 1, "n_probs": 2, "cache_prompt": False},
    )
    assert completion.choices[0].message.content is not None


def test_client_walking_away_mid_stream_frees_the_llamacpp_slot(
    gateway: Gateway, llama_server: LlamaServer
) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Count to one thousand."}],
        "max_tokens": 2000,
        "stream": True,
        "temperature": 0,
        "ignore_eos": True,
    }
    with httpx.stream(
        "POST", gateway.url + "/v1/chat/completions", json=body, timeout=30
    ) as response:
        received = 0
        lines = response.iter_lines()  # keep a reference: a dropped iterator closes the stream
        for line in lines:
            if line.startswith("data: {"):
                received += 1
            if received >= 5:
                break
        assert llama_server.busy_slots() == 1
    # the client is gone: the gateway must close upstream and llama-server free the slot
    assert wait_until(lambda: llama_server.busy_slots() == 0, timeout=5), "slot still busy"
    assert wait_until(lambda: gateway.slots_in_use() == 0, timeout=2)


def test_request_id_is_echoed_and_propagated(gateway: Gateway) -> None:
    r = httpx.post(
        gateway.url + "/v1/chat/completions",
        headers={"X-Request-Id": "abc-123"},
        json={"model": MODEL, "messages": MESSAGES, "max_tokens": 2},
        timeout=30,
    )
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "abc-123"
    r = httpx.post(
        gateway.url + "/v1/chat/completions",
        json={"model": "nope", "messages": MESSAGES},
        timeout=30,
    )
    assert r.status_code == 404 and len(r.headers["x-request-id"]) == 32


def test_concurrent_streams_all_complete(client: openai.OpenAI, gateway: Gateway) -> None:
    results: list[str] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            chunks = client.chat.completions.create(
                model=MODEL, messages=MESSAGES, max_tokens=6, stream=True
            )
            results.append("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(results) == 8
    assert wait_until(lambda: gateway.slots_in_use() == 0, timeout=2)


def test_bad_requests_the_engine_answers_with_5xx_never_take_the_pool_down(
    gateway: Gateway, client: openai.OpenAI
) -> None:
    """llama-server answers embeddings without ``--embeddings`` with 501: that is the
    request's error. Passed on once (not retried), never counted against the replica: a
    stream of them leaves the only replica serving everyone else."""
    for _ in range(12):  # the default ejection threshold is far below this
        with pytest.raises(openai.APIStatusError) as caught:
            client.embeddings.create(model=MODEL, input="hello")
        assert caught.value.status_code == 501
        assert caught.value.response.headers["x-orchgate-attempts"] == "1"
        assert "embeddings" in str(caught.value.body)
    replica = httpx.get(f"{gateway.url}/v1/pools/chat/health").json()["metrics"]["replicas"][0]
    assert replica["ready"] is True and replica["ejections"] == 0, replica
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)
    assert reply.choices[0].message.content is not None
