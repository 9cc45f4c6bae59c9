"""The routes beyond chat, through orchgate in front of a real llama-server (SmolLM2):
the Responses API and Anthropic's messages with their official SDKs, stream and not;
the tokenizer, rerank and native routes; the engine-native passthrough; llama.cpp's
``timings``; and a route a pool does not serve, refused before admission.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.conftest import ADMIN, Gateway, LlamaServer, pool

pytestmark = pytest.mark.llamacpp

MODEL = "smollm2-135m"
TOKEN = "route-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def gateway(llama_server: LlamaServer, gateway_factory: Any) -> Iterator[Gateway]:
    config = {
        "server": {"default_model": MODEL},
        "auth": {"token": TOKEN},
        "pools": [
            pool(
                "chat",
                [MODEL, "smol"],
                [{"id": "llama0", "engine": "llamacpp", "url": llama_server.url}],
            ),
            pool(  # the same engine, declared to serve chat only
                "narrow",
                ["narrow"],
                [
                    {
                        "id": "llama1",
                        "engine": "llamacpp",
                        "url": llama_server.url,
                        "endpoints": ["/v1/chat/completions"],
                    }
                ],
            ),
        ],
    }
    with gateway_factory(config) as gw:
        yield gw


@pytest.fixture
def client(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=TOKEN, max_retries=0)


def test_responses_create_non_stream(client: openai.OpenAI) -> None:
    raw = client.responses.with_raw_response.create(
        model=MODEL, input="Name a colour.", max_output_tokens=8
    )
    response = raw.parse()
    assert raw.headers["x-request-id"] and raw.headers["x-orchgate-replica"] == "llama0"
    assert response.status == "completed" and response.output_text
    assert response.usage is not None and 0 < response.usage.output_tokens <= 8


def test_responses_stream_ends_with_completed_and_no_done(
    client: openai.OpenAI, gateway: Gateway, llama_server: LlamaServer
) -> None:
    # (the SDK's responses.stream() helper needs output_index/content_index, which this
    # llama-server's events lack -- direct as through orchgate -- so: plain stream=True)
    # greedy, so that direct and through orchgate the engine writes the same events
    events = list(
        client.responses.create(
            model="smol", input="Say hi.", max_output_tokens=6, stream=True, temperature=0
        )
    )
    types = [event.type for event in events]
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert "response.output_text.delta" in types
    direct = openai.OpenAI(base_url=llama_server.url + "/v1", api_key="x", max_retries=0)
    direct_types = [
        e.type
        for e in direct.responses.create(
            model="x", input="Say hi.", max_output_tokens=6, stream=True, temperature=0
        )
    ]
    assert types == direct_types
    body = {"model": MODEL, "input": "Say hi.", "max_output_tokens": 4, "stream": True}
    raw = httpx.post(gateway.url + "/v1/responses", json=body, headers=AUTH, timeout=30)
    assert raw.status_code == 200 and b"[DONE]" not in raw.content
    assert b'"error"' not in raw.content  # no false truncation error either
    metrics = httpx.get(gateway.url + "/metrics").text
    assert 'tokens_in_total{engine="llamacpp"' in metrics


def test_anthropic_sdk_messages_with_x_api_key(gateway: Gateway) -> None:
    client = anthropic.Anthropic(base_url=gateway.url, api_key=TOKEN, max_retries=0)
    message = client.messages.create(
        model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "Hello"}]
    )
    assert message.type == "message" and message.content[0].type == "text"
    assert message.usage.output_tokens > 0
    with client.messages.stream(
        model=MODEL, max_tokens=6, messages=[{"role": "user", "content": "Hello"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.stop_reason in ("max_tokens", "end_turn")
    count = client.messages.count_tokens(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}]
    )
    assert count.input_tokens > 0


def test_anthropic_errors_are_anthropic_envelopes(gateway: Gateway) -> None:
    client = anthropic.Anthropic(base_url=gateway.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as caught:
        client.messages.create(
            model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "x"}]
        )
    assert caught.value.body["type"] == "error"  # type: ignore[index]
    assert caught.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    client = anthropic.Anthropic(base_url=gateway.url, api_key=TOKEN, max_retries=0)
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(
            model="nope", max_tokens=4, messages=[{"role": "user", "content": "x"}]
        )
    bad = httpx.post(gateway.url + "/v1/messages", json={"model": MODEL}, headers=AUTH)
    assert bad.status_code == 400
    assert bad.json()["error"] == {
        "message": "missing required field 'messages'",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "invalid_request",
    }


def test_stream_keeps_llamacpp_timings_on_the_finish_chunk(gateway: Gateway) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 3,
        "stream": True,
    }
    raw = httpx.post(gateway.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=30)
    events = [e for e in raw.content.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    assert b'"choices":[]' not in raw.content  # the hidden usage chunk stays hidden
    assert b'"timings"' in events[-2] and b'"finish_reason":"length"' in events[-2]


def test_tokenize_detokenize_and_native_completion(gateway: Gateway) -> None:
    tokens = httpx.post(
        gateway.url + "/tokenize", json={"model": MODEL, "content": "hello world"}, headers=AUTH
    )
    assert tokens.status_code == 200, tokens.text
    ids = tokens.json()["tokens"]
    assert ids and all(isinstance(i, int) for i in ids)
    text = httpx.post(gateway.url + "/detokenize", json={"tokens": ids}, headers=AUTH)
    assert text.json()["content"].strip() == "hello world"  # no model: the default pool
    native = httpx.post(
        gateway.url + "/completions",
        json={"model": MODEL, "prompt": "Once", "n_predict": 3, "stream": True},
        headers=AUTH,
        timeout=30,
    )
    # llama-server's own handler: its own fields, its own stream end (no [DONE] added)
    assert native.status_code == 200 and b'"stop":true' in native.content
    assert b"[DONE]" not in native.content and b'"error"' not in native.content


def test_rerank_without_reranking_is_the_engines_answer_and_no_ejection(
    gateway: Gateway,
) -> None:
    body = {"model": MODEL, "query": "colour", "documents": ["red", "car"]}
    for _ in range(4):
        answer = httpx.post(gateway.url + "/v1/rerank", json=body, headers=AUTH)
        assert answer.status_code == 501
        assert answer.headers["x-orchgate-attempts"] == "1"  # never retried
        assert answer.json()["error"]["type"] == "not_supported_error"  # llama.cpp's own
    health = httpx.get(gateway.url + "/v1/pools/chat/health", headers=AUTH).json()
    assert health["ready"] is True


def test_a_route_the_pool_does_not_serve_is_404_before_admission(gateway: Gateway) -> None:
    body = {"model": "narrow", "input": "hi"}
    answer = httpx.post(gateway.url + "/v1/responses", json=body, headers=AUTH)
    assert answer.status_code == 404
    error = answer.json()["error"]
    assert error["code"] == "endpoint_not_supported" and "/v1/responses" in error["message"]
    metrics = httpx.get(gateway.url + "/metrics").text
    assert 'pool_id="narrow",priority="interactive",replica_id="llama1"} 0.0' in metrics


def test_upstream_passthrough_reaches_listed_native_routes_only(gateway: Gateway) -> None:
    url = gateway.url + f"/upstream/{MODEL}"
    completion = httpx.post(
        url + "/completion", json={"prompt": "Once", "n_predict": 2}, headers=AUTH, timeout=30
    )
    assert completion.status_code == 200 and "content" in completion.json()
    assert completion.headers["x-orchgate-replica"] == "llama0"
    props = httpx.get(url + "/props", headers=AUTH)
    assert props.status_code == 403  # introspection: the admin token
    props = httpx.get(url + "/props", headers=ADMIN)
    assert props.status_code == 200 and "total_slots" in props.json()
    for path in ("/slots/0?action=save", "/slots/0", "/nowhere"):
        refused = httpx.post(url + path, json={"filename": "x"}, headers=ADMIN)
        assert refused.status_code == 404, path
    # POST /props would change the server's settings: reads only
    assert httpx.post(url + "/props", json={}, headers=ADMIN).status_code == 405
    assert httpx.get(gateway.url + "/upstream/nope/props", headers=ADMIN).status_code == 404
    assert httpx.post(url + "/completion", json={"prompt": "x"}).status_code == 401


def test_llama_servers_own_post_routes_at_the_top_level(gateway: Gateway) -> None:
    """A client written for one llama-server calls its routes without a model: they reach
    the default pool's engine, admitted like any request (llama.cpp's server suite)."""
    completion = httpx.post(
        gateway.url + "/completion", json={"prompt": "Once", "n_predict": 2}, headers=AUTH,
        timeout=30,
    )  # fmt: skip
    assert completion.status_code == 200 and "content" in completion.json()
    assert completion.headers["x-orchgate-replica"] == "llama0"
    messages = [{"role": "user", "content": "hi"}]
    template = httpx.post(gateway.url + "/apply-template", json={"messages": messages},
                          headers=AUTH)  # fmt: skip
    assert template.status_code == 200 and "<|im_start|>" in template.json()["prompt"]
    counted = httpx.post(
        gateway.url + "/v1/chat/completions/input_tokens", json={"messages": messages},
        headers=AUTH,
    )  # fmt: skip
    assert counted.status_code == 200 and counted.json()["input_tokens"] > 3
    # X-Api-Key is a credential on every data route, as llama-server takes it
    keyed = httpx.post(gateway.url + "/completion", json={"prompt": "A", "n_predict": 1},
                       headers={"X-Api-Key": TOKEN}, timeout=30)  # fmt: skip
    assert keyed.status_code == 200
    assert httpx.post(gateway.url + "/completion", json={"prompt": "A"}).status_code == 401
    assert httpx.get(gateway.url + "/completion", headers=AUTH).status_code == 405


def test_context_overflow_is_llamacpps_own_error_with_its_numbers(gateway: Gateway) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "word " * 3000}]}
    answer = httpx.post(gateway.url + "/v1/chat/completions", json=body, headers=AUTH,
                        timeout=60)  # fmt: skip
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["type"] == "exceed_context_size_error"
    assert error["n_prompt_tokens"] > error["n_ctx"] > 0
    assert error["code"] is None  # llama.cpp's integer status: typed clients want a string


def test_rerank_accepts_tei_texts(gateway: Gateway) -> None:
    body = {"model": MODEL, "query": "colour", "texts": ["red", "car"]}
    answer = httpx.post(gateway.url + "/rerank", json=body, headers=AUTH)
    assert answer.status_code == 501  # the engine's verdict (no --reranking), not a 400 here
    missing = httpx.post(gateway.url + "/rerank", json={"model": MODEL, "query": "q"},
                         headers=AUTH)  # fmt: skip
    assert (
        missing.status_code == 400
        and "'documents' or 'texts'" in missing.json()["error"]["message"]
    )
