"""The relay rules of the routes beyond chat, against small real HTTP upstreams: audio
uploads and binary answers through the official SDK, the Responses and Anthropic stream
dialects when an upstream breaks off (an in-band error in the surface's own words, never
``[DONE]``), and a route the engine does not serve."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import msgspec
import openai
import pytest
from aiohttp import web

from tests.conftest import Gateway, pool, serve_aiohttp
from tests.fakes.servers import AiohttpThread
from tests.fakes.upstream import FakeUpstream


@pytest.fixture
def gw(
    fake_upstream: tuple[FakeUpstream, AiohttpThread], gateway_factory: Any
) -> Iterator[Gateway]:
    _, server = fake_upstream
    config = {
        "pools": [
            pool(
                "p",
                ["m", "m-alias"],
                [
                    {
                        "id": "r0",
                        "engine": "openai",
                        "url": server.url,
                        "upstream_model": "m-upstream",
                    }
                ],
            )
        ]
    }
    with gateway_factory(config) as gateway:
        yield gateway


def test_transcription_upload_goes_through_with_the_model_renamed(
    gw: Gateway, fake_upstream: tuple[FakeUpstream, AiohttpThread]
) -> None:
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    audio = b"RIFF" + bytes(range(256)) * 400  # ~100 kB, binary, CRLFs and dashes inside
    result = client.audio.transcriptions.create(model="m-alias", file=("a.wav", audio, "audio/wav"))
    # the upstream parsed the form: every byte of the file, the replica's model name
    assert result.text == f"{len(audio)} bytes for m-upstream"
    fake, _ = fake_upstream
    assert fake.headers[-1]["Content-Type"].startswith("multipart/form-data; boundary=")


def test_upload_errors_are_clear(gw: Gateway) -> None:
    url = gw.url + "/v1/audio/transcriptions"
    no_file = httpx.post(url, files={"model": (None, "m")})
    assert no_file.status_code == 400 and no_file.json()["error"]["param"] == "file"
    unknown = httpx.post(url, files={"model": (None, "zz"), "file": ("a", b"x")})
    assert unknown.status_code == 404
    as_text = httpx.post(url, content=b"x", headers={"Content-Type": "text/plain"})
    assert as_text.status_code == 415  # multipart or JSON only
    truncated = httpx.post(
        url, content=b"--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nm",
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    )  # fmt: skip
    assert truncated.status_code == 400 and "malformed" in truncated.json()["error"]["message"]


def test_speech_is_streamed_as_binary(gw: Gateway) -> None:
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    started = time.monotonic()
    arrivals: list[float] = []
    with client.audio.speech.with_streaming_response.create(
        model="m", voice="alloy", input="hi",
        extra_body={"fake": {"chunks": 4, "delay_s": 0.2}},
    ) as response:  # fmt: skip
        assert response.headers["content-type"] == "audio/mpeg"
        data = b""
        for piece in response.iter_bytes():
            data += piece
            arrivals.append(time.monotonic() - started)
    assert data == b"".join(bytes([i]) * 1000 for i in range(4))
    assert arrivals[0] < 0.5, "the first audio must not wait for the last (no buffering)"


def _typed_stream_app(events: list[bytes], *, close_early: bool) -> web.Application:
    async def answer(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in events:
            await response.write(event)
        if close_early:
            assert request.transport is not None
            request.transport.close()
        else:
            await response.write_eof()
        return response

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": []})

    app = web.Application()
    app.router.add_post("/v1/responses", answer)
    app.router.add_post("/v1/messages", answer)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", models)  # the llamacpp adapter's readiness probe
    return app


def _event(kind: str, **data: Any) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (kind.encode(), msgspec.json.encode({"type": kind, **data}))


RESPONSE_EVENTS = [
    _event("response.created", response={"id": "r"}),
    _event("response.output_text.delta", delta="Hi"),
]
RESPONSE_END = _event(
    "response.completed", response={"usage": {"input_tokens": 2, "output_tokens": 1}}
)
MESSAGE_EVENTS = [
    _event("message_start", message={"usage": {"input_tokens": 3}}),
    _event("content_block_delta", delta={"text": "Hi"}),
]
MESSAGE_END = _event("message_delta", usage={"output_tokens": 1}) + _event("message_stop")
TOKENS_OUT = (
    'tokens_out_total{engine="llamacpp",engine_version="unknown",pool_id="p",replica_id="r0"}'
)


@pytest.mark.parametrize(
    "path,events,end,error_line",
    [
        ("/v1/responses", RESPONSE_EVENTS, RESPONSE_END,
         b'"type":"error","code":"upstream_stream_'),
        ("/v1/messages", MESSAGE_EVENTS, MESSAGE_END,
         b'"type":"error","error":{"type":"api_error"'),
    ],
)  # fmt: skip
@pytest.mark.parametrize("complete", [True, False])
def test_typed_streams_end_in_their_own_dialect(
    gateway_factory: Any, path: str, events: list[bytes], end: bytes, error_line: bytes,
    complete: bool,
) -> None:  # fmt: skip
    sent = [*events, end] if complete else events
    with serve_aiohttp(lambda: _typed_stream_app(sent, close_early=not complete)) as upstream:
        config = {
            "pools": [pool("p", ["m"], [{"id": "r0", "engine": "llamacpp", "url": upstream.url}])]
        }
        with gateway_factory(config) as gw:
            body = {"model": "m", "stream": True, "messages": [], "input": "x", "max_tokens": 2}
            answer = httpx.post(gw.url + path, json=body, timeout=10)
            metrics = httpx.get(gw.url + "/metrics").text
    assert answer.status_code == 200 and b"[DONE]" not in answer.content
    if complete:
        assert answer.content == b"".join(sent)  # byte for byte, nothing added
        assert f"{TOKENS_OUT} 1.0" in metrics
    else:
        assert answer.content.startswith(b"".join(sent))
        tail = answer.content[len(b"".join(sent)) :]
        assert tail.startswith(b"event: error\ndata: ") and error_line in tail


def test_messages_to_an_engine_without_them_is_404_in_anthropic_shape(
    gateway_factory: Any, fake_upstream: tuple[FakeUpstream, AiohttpThread]
) -> None:
    fake, server = fake_upstream
    config = {"pools": [pool("p", ["m"], [{"id": "r0", "engine": "openai", "url": server.url}])]}
    with gateway_factory(config) as gw:
        answer = httpx.post(
            gw.url + "/v1/messages",
            json={"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]},
        )
    assert answer.status_code == 404
    assert answer.json()["type"] == "error"
    assert answer.json()["error"]["type"] == "not_found_error"
    assert answer.json()["error"]["code"] == "endpoint_not_supported"
    assert fake.bodies == []  # never sent


def _worker_app(answers: list[tuple[int, dict[str, Any]]], seen: list[bytes]) -> web.Application:
    """The OpenVINO worker contract's surface, answering from a script."""

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"ok": True, "loaded": True, "device": "NPU", "busy": False})

    async def generate(request: web.Request) -> web.Response:
        seen.append(await request.read())
        status, body = answers.pop(0)
        return web.json_response(body, status=status)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/v1/worker/generate", generate)
    return app


def test_worker_answers_pass_through_and_device_failures_are_not_retried(
    gateway_factory: Any,
) -> None:
    payload = {
        "job": "title",
        "text": "A title",
        "json": None,
        "timing_ms": {"total": 12},
        "npu_busy_delta_us": 840,
        "npu_busy_before_us": 1,
        "npu_busy_after_us": 841,
    }
    device = {"error": "npu busy time did not advance", "npu_busy_delta_us": 0}
    bounds = {"error": "max_new_tokens must be between 1 and 256"}
    seen: list[bytes] = []
    answers = [(200, payload), (503, device), (500, {"error": "generation failed"}), (400, bounds)]
    with serve_aiohttp(lambda: _worker_app(answers, seen)) as worker:
        replicas = [{"id": "npu", "engine": "openvino", "url": worker.url}]
        with gateway_factory({"pools": [pool("npu", ["qwen"], replicas)]}) as gw:
            url = gw.url + "/v1/worker/generate"
            job = {"job": "title", "input": "x"}
            replies = [httpx.post(url, json=job, timeout=10) for _ in range(4)]
    assert [(r.status_code, r.json()) for r in replies] == [
        (200, payload),
        (503, device),
        (500, {"error": "generation failed"}),
        (400, bounds),
    ]
    assert len(seen) == 4  # one generation per call: nothing retried
    assert all(r.headers["x-orchgate-attempts"] == "1" for r in replies[1:])


def test_engine_native_top_level_routes_need_an_engine_that_has_them(gw: Gateway) -> None:
    """``/completion`` and its kin are llama-server's: on an ``openai`` pool they are a 404
    that names the route, before admission (no slot, no attempt)."""
    for path in ("/completion", "/infill", "/apply-template"):
        answer = httpx.post(gw.url + path, json={"prompt": "x"}, timeout=5)
        assert answer.status_code == 404, path
        error = answer.json()["error"]
        assert error["code"] == "endpoint_not_supported" and path in error["message"]
    assert httpx.post(gw.url + "/completion", json={"model": "zz"}).status_code == 404
    assert gw.slots_in_use() == 0
