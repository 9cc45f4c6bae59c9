"""A scriptable OpenAI-compatible upstream for faults real engines can't produce on demand.

Each request is programmed by a ``"fake"`` object in its own JSON body (which the gateway
forwards untouched, so every fault test also proves pass-through):

    {"fake": {"mode": "stream", "chunks": 5, "delay_s": 0.01}}

Modes: ``stream`` / ``json`` (normal answers), ``hang`` (accept, never answer),
``hang_after_headers`` (200 + headers, then nothing), ``status`` (``status``, optional
``retry_after``, ``body``), ``reset_before_headers``, ``reset_after`` (reset after
``chunks`` events), ``error_event`` (in-band error after ``chunks`` events),
``llamacpp_error`` (llama.cpp's ``error:`` line), ``no_done``, ``drip`` (``chunks`` events,
``delay_s`` apart, after a first one at once). A stopped server is "refused".

Faults can also be scripted per replica, whatever the body says: ``fake.script`` is a list
of specs consumed one per request (``fake.script = [{"mode": "status", "status": 503}]``
fails the next request only), so a retry can be seen succeeding.

It records every body it received and every connection that closed before the answer was
complete (``disconnects``: monotonic timestamps), so tests assert the gateway let go.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
from aiohttp import web

_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


def chunk(i: int, content: str, *, finish: str | None = None) -> bytes:
    body = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "fake",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}],
    }
    return b"data: " + _encoder.encode(body) + b"\n\n"


FAKE_PROMPT_TOKENS = 7  # what the fake's usage reports for every prompt


class FakeUpstream:
    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.headers: list[dict[str, str]] = []
        self.disconnects: list[float] = []
        self.script: list[dict[str, Any]] = []
        self.active = 0
        self.peak = 0  # the most requests it held at once
        self.healthy = True
        self.reset_posts = False  # health passes but every request is reset: a sick replica

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.handle)
        app.router.add_post("/v1/completions", self.handle)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_post("/v1/audio/transcriptions", self.transcriptions)
        app.router.add_post("/v1/audio/speech", self.speech)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        return app

    async def health(self, request: web.Request) -> web.Response:
        if self.healthy:
            return web.json_response({"status": "ok"})
        return web.json_response(
            {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}},
            status=503,
        )

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [{"id": "fake", "object": "model", "created": 1, "owned_by": "me"}],
            }
        )

    async def transcriptions(self, request: web.Request) -> web.Response:
        """Reads the multipart form as an engine would: the file's size and the model."""
        self.headers.append(dict(request.headers))
        form = await request.post()
        upload = form.get("file")
        if not isinstance(upload, web.FileField):
            return web.json_response({"error": {"message": "no file"}}, status=400)
        size = len(upload.file.read())
        return web.json_response({"text": f"{size} bytes for {form.get('model')}"})

    async def speech(self, request: web.Request) -> web.StreamResponse:
        """Audio bytes in ``chunks`` pieces, ``delay_s`` apart (a streamed MP3, say)."""
        spec = _decoder.decode(await request.read()).get("fake", {})
        response = web.StreamResponse(headers={"Content-Type": "audio/mpeg"})
        await response.prepare(request)
        for i in range(spec.get("chunks", 3)):
            await response.write(bytes([i]) * 1000)
            await asyncio.sleep(spec.get("delay_s", 0))
        await response.write_eof()
        return response

    async def embeddings(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self.bodies.append(raw)
        return web.json_response(
            {
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
                "model": "fake",
                "usage": {"prompt_tokens": 1, "total_tokens": 1},
            }
        )

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        if self.reset_posts:
            return _reset(request)
        self.bodies.append(raw)
        self.headers.append(dict(request.headers))
        body = _decoder.decode(raw)
        spec: dict[str, Any] = self.script.pop(0) if self.script else (body.get("fake") or {})
        mode = spec.get("mode") or ("stream" if body.get("stream") else "json")
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            return await _MODES.get(mode, _stream)(request, body, spec)
        except (asyncio.CancelledError, ConnectionResetError):
            self.disconnects.append(time.monotonic())
            raise
        finally:
            self.active -= 1


def _reset(request: web.Request) -> web.Response:
    assert request.transport is not None
    request.transport.abort()
    return web.Response()


async def _hang(request: web.Request, body: dict[str, Any], spec: dict[str, Any]) -> Any:
    await asyncio.sleep(3600)


async def _status(request: web.Request, body: dict[str, Any], spec: dict[str, Any]) -> Any:
    await asyncio.sleep(float(spec.get("delay_s", 0)))
    headers = {}
    if "retry_after" in spec:
        headers["Retry-After"] = str(spec["retry_after"])
    payload = spec.get(
        "body",
        {"error": {"message": "fake failure", "code": spec["status"], "type": "server_error"}},
    )
    return web.json_response(payload, status=int(spec["status"]), headers=headers)


async def _reset_before_headers(
    request: web.Request, body: dict[str, Any], spec: dict[str, Any]
) -> Any:
    return _reset(request)


async def _json(request: web.Request, body: dict[str, Any], spec: dict[str, Any]) -> Any:
    await asyncio.sleep(float(spec.get("delay_s", 0)))
    return web.json_response(
        {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 1,
            "model": body.get("model"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "ok"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
    )


_TRAILERS = {
    "error_event": b'data: {"error": {"message": "engine exploded", '
    b'"type": "server_error", "code": 500}}\n\n',
    "llamacpp_error": b'error: {"code": 500, "message": "slot crashed", '
    b'"type": "server_error"}\n\n',
}


async def _stream(request: web.Request, body: dict[str, Any], spec: dict[str, Any]) -> Any:
    mode = spec.get("mode", "stream")
    delay = float(spec.get("delay_s", 0))
    chunks = int(spec.get("chunks", 3))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    if mode == "hang_after_headers":
        await asyncio.sleep(3600)
    for i in range(chunks):
        if i or mode != "drip":
            await asyncio.sleep(delay)
        await response.write(chunk(i, spec.get("text", f"t{i} ")))
    if mode == "reset_after":
        return _reset(request)
    if mode in _TRAILERS:
        await response.write(_TRAILERS[mode])
    elif (body.get("stream_options") or {}).get("include_usage"):  # as vLLM sends it
        usage = {"prompt_tokens": FAKE_PROMPT_TOKENS, "completion_tokens": chunks}
        await response.write(b"data: " + _encoder.encode({"choices": [], "usage": usage}) + b"\n\n")
    if mode != "no_done":
        await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


_MODES = {
    "hang": _hang,
    "status": _status,
    "reset_before_headers": _reset_before_headers,
    "json": _json,
}
