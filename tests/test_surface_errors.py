"""Bad input, auth, CORS and readiness: each gets the right status and the OpenAI envelope.

The upstream is the scriptable fake (a real HTTP server); what is asserted is what a
client sees on the wire.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from gateway.config import ConfigError, config_from_mapping
from tests.conftest import Gateway, pool
from tests.fakes.servers import AiohttpThread
from tests.fakes.upstream import FakeUpstream

TOKEN = "s3cret-token"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
MSG = CHAT["messages"]


def assert_envelope(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    # the OpenAI surface's header; the control plane and the task API emit none (SPEC.md)
    assert bool(response.headers.get("x-request-id")) != response.url.path.startswith("/v1/pools")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["code"] is None or isinstance(error["code"], str)
    if code is not None:
        assert error["code"] == code
    assert "Traceback" not in response.text
    return error


def config(url: str, **server: Any) -> dict[str, Any]:
    return {
        "server": server,
        "pools": [
            pool(
                "p",
                ["m", "m-alias"],
                [{"id": "f0", "engine": "openai", "url": url}],
                queue_capacity=2,
            )
        ],
    }


@pytest.fixture
def gw(
    fake_upstream: tuple[FakeUpstream, AiohttpThread], gateway_factory: Any
) -> Iterator[Gateway]:
    with gateway_factory(config(fake_upstream[1].url, max_body_bytes=4096)) as gateway:
        yield gateway


def post(
    gw: Gateway, body: bytes | dict, path: str = "/v1/chat/completions", **headers: str
) -> httpx.Response:
    if isinstance(body, dict):
        return httpx.post(gw.url + path, json=body, headers=headers, timeout=10)
    return httpx.post(
        gw.url + path,
        content=body,
        timeout=10,
        headers={"content-type": "application/json", **headers},
    )


def test_malformed_json_is_400(gw: Gateway) -> None:
    assert_envelope(post(gw, b'{"model": "m", "messages": ['), 400, "invalid_json")
    assert_envelope(post(gw, b"[1, 2]"), 400, "invalid_json")
    assert_envelope(post(gw, b""), 400, "invalid_json")
    assert_envelope(post(gw, b'{"model": "m", "messages": [], "x": "\xff\xfe"}'), 400)


def test_missing_messages_is_400_naming_the_field(gw: Gateway) -> None:
    error = assert_envelope(post(gw, {"model": "m"}), 400)
    assert error["param"] == "messages"
    error = assert_envelope(post(gw, {"model": "m", "prompt": None}, "/v1/completions"), 400)
    assert error["param"] == "prompt"


def test_wrong_types_are_400(gw: Gateway) -> None:
    error = assert_envelope(post(gw, {"model": 5, "messages": []}), 400)
    assert error["param"] == "model"
    assert_envelope(post(gw, {**CHAT, "stream": "yes"}), 400)
    assert_envelope(post(gw, {**CHAT, "messages": "hi"}), 400)
    error = assert_envelope(post(gw, {**CHAT, "max_tokens": -5}), 400)
    assert error["param"] == "max_tokens"


def test_unknown_model_is_404_model_not_found(gw: Gateway) -> None:
    error = assert_envelope(post(gw, {**CHAT, "model": "gpt-9"}), 404, "model_not_found")
    assert error["param"] == "model"
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    assert info.value.code == "model_not_found"
    assert info.value.request_id


def test_oversize_body_is_413(gw: Gateway) -> None:
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
    assert_envelope(post(gw, big), 413, "request_too_large")

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit holds while streaming
        yield b'{"model": "m", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}]}'

    response = httpx.post(
        gw.url + "/v1/chat/completions",
        content=chunked(),
        timeout=10,
        headers={"content-type": "application/json"},
    )
    assert_envelope(response, 413)


def test_unknown_path_and_wrong_method_use_the_envelope(gw: Gateway) -> None:
    assert_envelope(httpx.get(gw.url + "/v1/nothing-here"), 404)
    wrong = httpx.get(gw.url + "/v1/chat/completions")
    assert_envelope(wrong, 405)
    assert wrong.headers["allow"] == "POST"  # RFC 9110: a 405 says what is allowed
    wrong = httpx.post(gw.url + "/v1/models")
    assert_envelope(wrong, 405)
    assert wrong.headers["allow"] == "GET, HEAD"
    assert "POST" in httpx.get(gw.url + "/v1/config/reload").headers["allow"]


def test_bad_priority_header_is_400(gw: Gateway) -> None:
    error = assert_envelope(post(gw, CHAT, **{"X-Priority": "urgent"}), 400)
    assert error["param"] == "X-Priority"
    assert post(gw, CHAT, **{"X-Priority": "batch"}).status_code == 200


def test_body_passes_through_byte_for_byte(gw: Gateway, fake_upstream: Any) -> None:
    fake, _ = fake_upstream
    raw = (
        b'{"model":"m","messages":[{"role":"user","content":"h\\u00e9"}],'
        b'"tools":[{"type":"function","function":{"name":"f","parameters":{}}}],'
        b'"response_format":{"type":"json_object"},"seed":42,"top_k":5,"min_p":0.1,'
        b'"chat_template_kwargs":{"enable_thinking":false}}'
    )
    assert post(gw, raw).status_code == 200
    assert fake.bodies[-1] == raw


def test_alias_is_rewritten_to_the_canonical_model_only(gw: Gateway, fake_upstream: Any) -> None:
    fake, _ = fake_upstream
    assert post(gw, {**CHAT, "model": "m-alias", "top_k": 3}).status_code == 200
    import msgspec

    sent = msgspec.json.decode(fake.bodies[-1])
    assert sent == {**CHAT, "model": "m", "top_k": 3}


def test_upstream_error_is_normalised(gw: Gateway) -> None:
    body = {
        **CHAT,
        "fake": {
            "mode": "status",
            "status": 400,
            "body": {
                "error": {"code": 400, "message": "bad sampler", "type": "invalid_request_error"}
            },
        },
    }
    error = assert_envelope(post(gw, body), 400)
    assert error == {
        "message": "bad sampler",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
    # vLLM's older flat form, and a non-JSON body
    body["fake"]["body"] = {
        "object": "error",
        "message": "flat",
        "type": "BadRequestError",
        "param": None,
        "code": 400,
    }
    assert assert_envelope(post(gw, body), 400)["message"] == "flat"
    body["fake"] = {"mode": "status", "status": 422, "body": "not json"}
    assert assert_envelope(post(gw, body), 422)["type"] == "invalid_request_error"


def test_embeddings_pass_through(gw: Gateway) -> None:
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    result = client.embeddings.create(model="m", input="hello")
    assert result.data[0].embedding == [0.1, 0.2]


def test_unprefixed_aliases_work(gw: Gateway) -> None:
    assert httpx.get(gw.url + "/models").json()["object"] == "list"
    assert post(gw, CHAT, path="/chat/completions").status_code == 200


# -- auth --------------------------------------------------------------------------------------


@pytest.fixture
def authed(fake_upstream: Any, gateway_factory: Any) -> Iterator[Gateway]:
    cfg = config(fake_upstream[1].url)
    cfg["auth"] = {"token": TOKEN}
    with gateway_factory(cfg) as gateway:
        yield gateway


def test_missing_or_wrong_token_is_401_invalid_api_key_as_openai_answers(
    authed: Gateway,
) -> None:
    for path in ("/v1/models", "/v1/pools/p/health"):
        assert_envelope(httpx.get(authed.url + path), 401, "invalid_api_key")
        assert_envelope(
            httpx.get(authed.url + path, headers={"Authorization": "Bearer no"}),
            401,
            "invalid_api_key",
        )
    assert_envelope(post(authed, CHAT), 401)
    assert_envelope(post(authed, CHAT, Authorization="Basic " + TOKEN), 401)
    assert_envelope(post(authed, CHAT, Authorization="Bearer " + TOKEN + "x"), 401)
    assert post(authed, CHAT, Authorization="Bearer " + TOKEN).status_code == 200
    assert post(authed, CHAT, Authorization="bearer " + TOKEN).status_code == 200
    client = openai.OpenAI(base_url=authed.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):  # what the SDKs raise for OpenAI's 401
        client.models.list()
    client = openai.OpenAI(base_url=authed.url + "/v1", api_key=TOKEN, max_retries=0)
    assert [m.id for m in client.models.list()] == ["m", "m-alias"]


def test_token_never_reaches_the_upstream_or_the_log(authed: Gateway, fake_upstream: Any) -> None:
    fake, _ = fake_upstream
    assert post(authed, CHAT, Authorization="Bearer " + TOKEN).status_code == 200
    assert all("authorization" not in {k.lower() for k in h} for h in fake.headers)
    assert TOKEN not in authed.access_log().decode()


# -- CORS ---------------------------------------------------------------------------------------


def test_cors_is_off_by_default(gw: Gateway) -> None:
    response = httpx.post(
        gw.url + "/v1/chat/completions", json=CHAT, headers={"Origin": "http://ui.example"}
    )
    assert "access-control-allow-origin" not in response.headers


def test_cors_preflight_passes_without_auth_and_allows_stainless_headers(
    fake_upstream: Any, gateway_factory: Any
) -> None:
    cfg = config(fake_upstream[1].url, cors={"allow_origins": ["http://ui.example"]})
    cfg["auth"] = {"token": TOKEN}
    with gateway_factory(cfg) as gateway:
        requested = "authorization, content-type, x-stainless-os, x-stainless-retry-count"
        preflight = httpx.options(
            gateway.url + "/v1/chat/completions",
            headers={
                "Origin": "http://ui.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": requested,
            },
        )
        assert preflight.status_code in (200, 204)
        assert preflight.headers["access-control-allow-origin"] == "http://ui.example"
        allowed = preflight.headers["access-control-allow-headers"].lower()
        assert "x-stainless-os" in allowed and "authorization" in allowed
        response = httpx.post(
            gateway.url + "/v1/chat/completions",
            json=CHAT,
            headers={"Origin": "http://ui.example", "Authorization": "Bearer " + TOKEN},
        )
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "http://ui.example"
        assert "x-request-id" in response.headers["access-control-expose-headers"].lower()


# -- readiness ------------------------------------------------------------------------------------


def test_no_ready_replica_is_503_with_retry_after(fake_upstream: Any, gateway_factory: Any) -> None:
    fake, server = fake_upstream
    fake.healthy = False
    cfg = config(server.url)
    cfg["pools"][0]["replicas"][0]["engine"] = "llamacpp"  # readiness from /health
    with gateway_factory(cfg) as gateway:
        response = post(gateway, CHAT)
        assert_envelope(response, 503, "pool_unavailable")
        assert 1 <= int(response.headers["retry-after"]) <= 120
        health = httpx.get(gateway.url + "/health")
        assert health.status_code == 503 and health.json()["pools"]["p"]["ready"] is False
        assert (
            httpx.get(gateway.url + "/v1/pools/p/health").json()["metrics"]["replicas"][0]["detail"]
            == "Loading model"
        )
        fake.healthy = True  # the model finished loading: served within a probe interval
        from tests.fakes.servers import wait_until

        assert wait_until(lambda: post(gateway, CHAT).status_code == 200, timeout=5)


def test_unreachable_replica_is_503(gateway_factory: Any) -> None:
    from tests.conftest import free_port

    cfg = config(f"http://127.0.0.1:{free_port()}")
    with gateway_factory(cfg) as gateway:
        response = post(gateway, CHAT)
        assert_envelope(response, 503)
        assert response.headers["retry-after"]


def test_models_retrieve_answers_each_name_and_404s_the_rest(gw: Gateway) -> None:
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    for name in ("m", "m-alias"):
        model = client.models.retrieve(name)
        assert model.id == name and model.object == "model" and model.owned_by == "orchgate"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("nope")
    assert caught.value.body["code"] == "model_not_found"  # type: ignore[index]
    assert httpx.get(gw.url + "/models/m").json()["id"] == "m"  # without /v1, like the list
    assert (
        httpx.post(
            gw.url + "/v1/models/m", headers={"content-type": "application/json"}
        ).status_code
        == 405
    )


def test_a_request_without_model_gets_the_default_as_from_a_single_llama_server(
    fake_upstream: tuple[FakeUpstream, AiohttpThread], gateway_factory: Any
) -> None:
    fake, server = fake_upstream
    one = config(server.url)
    with gateway_factory(one) as gw:  # one pool: its canonical model
        for body in ({"messages": MSG}, {"model": None, "messages": MSG}):
            answer = post(gw, body)
            assert answer.status_code == 200, answer.text
            assert b'"model":"m"' in fake.bodies[-1]  # named upstream (vLLM needs it)
    two = config(server.url)
    two["pools"].append(pool("q", ["n"], [{"id": "g0", "engine": "openai", "url": server.url}]))
    with gateway_factory(two) as gw:  # several pools and no default: say which field
        error = assert_envelope(post(gw, {"messages": MSG}), 400)
        assert error["param"] == "model" and "default_model" in error["message"]
    with gateway_factory({**two, "server": {"default_model": "n"}}) as gw:
        assert post(gw, {"messages": MSG}).status_code == 200
        assert b'"model":"n"' in fake.bodies[-1]
    with pytest.raises(ConfigError, match="default_model"):
        config_from_mapping({**two, "server": {"default_model": "gpt-9"}}, env={})
