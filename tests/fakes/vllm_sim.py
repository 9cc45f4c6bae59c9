"""A simulator of vLLM's OpenAI-compatible HTTP surface (vLLM cannot run without a GPU).

Reproduces what the gateway's ``vllm`` adapter depends on, as vLLM 0.1x serves it:

* ``GET /health``: 200 with an empty body; 503 once the engine is "dead".
* ``GET /version``: ``{"version": ...}``.
* ``GET /v1/models``: the served model with vLLM's extra fields (``root``, ``max_model_len``).
* ``POST /v1/chat/completions`` / ``/v1/completions``: stream and non-stream, the usage chunk
  only with ``stream_options.include_usage``, ``data: [DONE]``; deterministic text for a
  given ``seed``; errors in vLLM's shape (integer ``code``, ``NotFoundError``/
  ``BadRequestError`` types); an unknown model is a 404.
* ``POST /v1/embeddings``.
* ``GET /metrics``: ``vllm:num_requests_running`` / ``vllm:num_requests_waiting`` gauges,
  which drop when a client disconnects (vLLM aborts the request).
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import msgspec
from aiohttp import web

_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()
WORDS = ["alpha", "beta", "gamma", "delta", "echo", "fox", "golf", "hotel", "india", "juliet"]


class VLLMSimulator:
    def __init__(
        self,
        served_model: str = "Qwen/Qwen2.5-0.5B-Instruct",
        *,
        token_delay_s: float = 0.0,
        max_num_seqs: int = 8,
        version: str = "0.11.2",
    ) -> None:
        self.served_model = served_model
        self.token_delay_s = token_delay_s
        self.max_num_seqs = max_num_seqs
        self.version = version
        self.dead = False
        self.running = 0
        self.waiting = 0
        self.bodies: list[dict[str, Any]] = []
        self.aborted = 0
        self._sem: asyncio.Semaphore | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/version", self.version_route)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/embeddings", self.embeddings)
        return app

    # -- control --------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=503 if self.dead else 200)

    async def version_route(self, request: web.Request) -> web.Response:
        return web.json_response({"version": self.version})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.served_model,
                        "object": "model",
                        "created": int(time.time()),
                        "owned_by": "vllm",
                        "root": self.served_model,
                        "parent": None,
                        "max_model_len": 2048,
                        "permission": [],
                    }
                ],
            }
        )

    async def metrics(self, request: web.Request) -> web.Response:
        label = f'{{engine="0",model_name="{self.served_model}"}}'
        text = (
            "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
            "# TYPE vllm:num_requests_running gauge\n"
            f"vllm:num_requests_running{label} {float(self.running)}\n"
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
            "# TYPE vllm:num_requests_waiting gauge\n"
            f"vllm:num_requests_waiting{label} {float(self.waiting)}\n"
            "# TYPE vllm:kv_cache_usage_perc gauge\n"
            f"vllm:kv_cache_usage_perc{label} 0.0\n"
        )
        return web.Response(text=text, content_type="text/plain")

    # -- errors in vLLM's shape ----------------------------------------------------------
    @staticmethod
    def _error(status: int, message: str, type_: str, param: str | None = None) -> web.Response:
        return web.json_response(
            {"error": {"message": message, "type": type_, "param": param, "code": status}},
            status=status,
        )

    async def _body(self, request: web.Request) -> dict[str, Any] | web.Response:
        try:
            body = _decoder.decode(await request.read())
        except msgspec.DecodeError:
            return self._error(400, "JSON decode error", "BadRequestError")
        if not isinstance(body, dict):
            return self._error(400, "body must be an object", "BadRequestError")
        self.bodies.append(body)
        if body.get("model") != self.served_model:
            return self._error(
                404, f"The model `{body.get('model')}` does not exist.", "NotFoundError", "model"
            )
        return body

    # -- generation ------------------------------------------------------------------------
    def _tokens(self, body: dict[str, Any]) -> list[str]:
        n = int(body.get("max_completion_tokens") or body.get("max_tokens") or 16)
        rng = random.Random(body.get("seed"))
        return [rng.choice(WORDS) + " " for _ in range(n)]

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        if not isinstance(body.get("messages"), list):
            return self._error(400, "messages: Field required", "BadRequestError", "messages")
        return await self._generate(request, body, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        if "prompt" not in body:
            return self._error(400, "prompt: Field required", "BadRequestError", "prompt")
        return await self._generate(request, body, chat=False)

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        return web.json_response(
            {
                "object": "list",
                "model": self.served_model,
                "data": [{"object": "embedding", "index": 0, "embedding": [0.0, 0.5, 1.0]}],
                "usage": {"prompt_tokens": 3, "total_tokens": 3},
            }
        )

    async def _generate(
        self, request: web.Request, body: dict[str, Any], *, chat: bool
    ) -> web.StreamResponse:
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.max_num_seqs)
        self.waiting += 1
        acquired = False
        try:
            await self._sem.acquire()
            acquired = True
            self.waiting -= 1
            self.running += 1
            if body.get("stream"):
                return await self._stream(request, body, chat=chat)
            tokens = self._tokens(body)
            for _ in tokens:
                await asyncio.sleep(self.token_delay_s)
            return web.json_response(self._whole(body, tokens, chat=chat))
        except (asyncio.CancelledError, ConnectionResetError):
            self.aborted += 1
            raise
        finally:
            if acquired:
                self.running -= 1
                self._sem.release()
            else:
                self.waiting -= 1

    def _whole(self, body: dict[str, Any], tokens: list[str], *, chat: bool) -> dict[str, Any]:
        text = "".join(tokens)
        usage = {
            "prompt_tokens": 7,
            "completion_tokens": len(tokens),
            "total_tokens": 7 + len(tokens),
        }
        if chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text, "tool_calls": []},
                "logprobs": None,
                "finish_reason": "length",
                "stop_reason": None,
            }
            return {
                "id": "chatcmpl-sim",
                "object": "chat.completion",
                "created": 1,
                "model": self.served_model,
                "choices": [choice],
                "usage": usage,
                "prompt_logprobs": None,
            }
        return {
            "id": "cmpl-sim",
            "object": "text_completion",
            "created": 1,
            "model": self.served_model,
            "choices": [
                {
                    "index": 0,
                    "text": text,
                    "logprobs": None,
                    "finish_reason": "length",
                    "stop_reason": None,
                }
            ],
            "usage": usage,
        }

    async def _stream(
        self, request: web.Request, body: dict[str, Any], *, chat: bool
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        tokens = self._tokens(body)
        obj = "chat.completion.chunk" if chat else "text_completion"
        base = {"id": "chatcmpl-sim", "object": obj, "created": 1, "model": self.served_model}

        async def emit(payload: dict[str, Any]) -> None:
            await response.write(b"data: " + _encoder.encode(payload) + b"\n\n")

        if chat:
            await emit(
                {
                    **base,
                    "choices": [
                        {
                            "index": 0,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ],
                }
            )
        for i, token in enumerate(tokens):
            await asyncio.sleep(self.token_delay_s)
            last = i == len(tokens) - 1
            if chat:
                choice = {
                    "index": 0,
                    "delta": {"content": token},
                    "logprobs": None,
                    "finish_reason": "length" if last else None,
                }
            else:
                choice = {
                    "index": 0,
                    "text": token,
                    "logprobs": None,
                    "finish_reason": "length" if last else None,
                }
            await emit({**base, "choices": [choice]})
        options = body.get("stream_options") or {}
        if options.get("include_usage"):
            await emit(
                {
                    **base,
                    "choices": [],
                    "usage": {
                        "prompt_tokens": 7,
                        "completion_tokens": len(tokens),
                        "total_tokens": 7 + len(tokens),
                    },
                }
            )
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
