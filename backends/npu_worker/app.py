"""The worker's HTTP surface: the contract's routes and a bounded OpenAI chat route.

Logs method, path, status and timings only: never input or output text.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
from litestar import Litestar, Request, Response, get, post
from litestar.exceptions import HTTPException
from litestar.response import Stream

from backends.npu_worker.jobs import (
    DEFAULT_MAX_NEW_TOKENS,
    JSON_JOBS,
    MAX_INPUT_CHARS,
    MAX_NEW_TOKENS,
    SYSTEM_PROMPTS,
    InvalidJob,
    Job,
    check_input,
    check_max_new_tokens,
    parse_json_output,
    resolve_job,
)
from backends.npu_worker.pipeline import Generation, Generator, read_busy_time

log = logging.getLogger("orchgate.npu_worker")
_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


def _error(status: int, message: str, **extra: Any) -> Response[dict[str, Any]]:
    return Response({**extra, "error": message}, status_code=status)


async def _json_body(request: Request[Any, Any, Any]) -> dict[str, Any]:
    try:
        body = _decoder.decode(await request.body())
    except msgspec.DecodeError:
        raise InvalidJob("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidJob("the body must be a JSON object")
    return body


def generation_payload(
    gen: Generator, job: Job, result: Generation, load_ms: float, total_ms: float
) -> dict[str, Any]:
    config = gen.config
    return {
        "model": config.model_id,
        "device": config.device,
        "device_actual": config.device,
        "job": job.value,
        "text": result.text,
        "json": parse_json_output(result.text) if job in JSON_JOBS else None,
        "timing_ms": {
            "load": round(load_ms, 2),
            "initial_load": round(gen.initial_load_ms or 0.0, 2),
            "generate": round(result.generate_ms, 2),
            "total": round(total_ms, 2),
        },
        "npu_busy_delta_us": result.busy_delta_us,
        "npu_busy_before_us": result.busy_before_us,
        "npu_busy_after_us": result.busy_after_us,
        "cache_dir": config.cache_dir,
    }


async def run_job(gen: Generator, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """One contract job: ``(status, payload)``. Shared by HTTP and the CLI."""
    try:
        job = resolve_job(body.get("job"))
        text = check_input(body.get("input"))
        max_new = check_max_new_tokens(body.get("max_new_tokens"), DEFAULT_MAX_NEW_TOKENS[job])
    except InvalidJob as exc:
        return 400, {"error": str(exc)}
    started = time.perf_counter()
    try:
        load_ms = await gen.load()
        messages = [
            {"role": "system", "content": SYSTEM_PROMPTS[job]},
            {"role": "user", "content": text},
        ]
        result = await gen.generate(messages, None, max_new_tokens=max_new)
    except Exception as exc:  # noqa: BLE001 - the runtime's errors become a JSON answer
        return 500, {"error": f"generation failed: {type(exc).__name__}: {exc}"}
    payload = generation_payload(gen, job, result, load_ms, (time.perf_counter() - started) * 1000)
    if gen.config.device == "NPU" and not (result.busy_delta_us or 0) > 0:
        payload["error"] = "NPU busy time did not increase: the generation did not run on the NPU"
        return 503, payload
    return 200, payload


def _chat_bounds(body: dict[str, Any]) -> tuple[list[dict[str, str]], int, bool, bool]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidJob("messages must be a non-empty array")
    clean: list[dict[str, str]] = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise InvalidJob("each message needs a string content")
        clean.append({"role": str(message.get("role", "user")), "content": message["content"]})
    if sum(len(m["content"]) for m in clean) > MAX_INPUT_CHARS:
        raise InvalidJob(f"messages exceed {MAX_INPUT_CHARS} characters")
    max_new, stream, usage = _openai_bounds(body)
    return clean, max_new, stream, usage


def _openai_bounds(body: dict[str, Any]) -> tuple[int, bool, bool]:
    """``max_tokens`` (in OpenAI's terms), ``stream`` and ``include_usage`` of a body."""
    # max_completion_tokens wins when it is set (null means "not set", as before)
    name = (
        "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    )
    max_new = check_max_new_tokens(body.get(name), MAX_NEW_TOKENS, name=name)
    options = body.get("stream_options") or {}
    usage = bool(isinstance(options, dict) and options.get("include_usage"))
    return max_new, bool(body.get("stream")), usage


def _completion_bounds(body: dict[str, Any]) -> tuple[str, int, bool, bool]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise InvalidJob("prompt must be a non-empty string (one prompt per request)")
    if len(prompt) > MAX_INPUT_CHARS:
        raise InvalidJob(f"prompt exceeds {MAX_INPUT_CHARS} characters")
    return (prompt, *_openai_bounds(body))


def create_worker_app(gen: Generator, *, bind: str) -> Litestar:  # noqa: C901 - route table
    model_entry = {
        "id": gen.config.model_id,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "openvino",
    }

    @get("/healthz")
    async def healthz() -> dict[str, Any]:
        cache = gen.config.cache_dir
        return {
            "ok": True,
            "model": gen.config.model_id,
            "model_path": gen.config.model_path,
            "device": gen.config.device,
            "cache_dir": cache,
            "cache_exists": bool(cache and Path(cache).exists()),
            "loaded": gen.loaded,
            "initial_load_ms": gen.initial_load_ms,
            "busy_time_us": read_busy_time(gen.config.busy_time_path)
            if gen.config.device == "NPU"
            else None,
            "max_input_chars": MAX_INPUT_CHARS,
            "jobs": sorted(j.value for j in Job),
            "bind": bind,
            "busy": gen.busy,
        }

    @get(["/models", "/v1/models"])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_entry]}

    async def job_route(request: Request[Any, Any, Any], job: str | None) -> Response[Any]:
        try:
            body = await _json_body(request)
        except InvalidJob as exc:
            return _error(400, str(exc))
        if job is not None:
            body["job"] = job
        status, payload = await run_job(gen, body)
        return Response(payload, status_code=status)

    @post("/v1/worker/generate", status_code=200)
    async def generate(request: Request[Any, Any, Any]) -> Response[Any]:
        return await job_route(request, None)

    @post("/v1/worker/extract-memory-candidates", status_code=200)
    async def memory(request: Request[Any, Any, Any]) -> Response[Any]:
        return await job_route(request, Job.MEMORY_CANDIDATE.value)

    @post("/v1/worker/condense-notification", status_code=200)
    async def notification(request: Request[Any, Any, Any]) -> Response[Any]:
        return await job_route(request, Job.NOTIFICATION.value)

    async def openai_route(request: Request[Any, Any, Any], text: bool) -> Response[Any] | Stream:
        """Chat (``messages``) or text completion (a raw ``prompt``, no chat template)."""
        messages: list[dict[str, str]] | None = None
        prompt: str | None = None
        try:
            body = await _json_body(request)
            if text:
                prompt, max_new, stream, usage = _completion_bounds(body)
            else:
                messages, max_new, stream, usage = _chat_bounds(body)
        except InvalidJob as exc:
            return _openai_error(str(exc))
        seed, temperature = _sampling(body)
        await gen.load()
        if stream:
            return Stream(
                _stream(gen, messages, prompt, max_new, usage, seed, temperature),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        result = await gen.generate(
            messages, prompt, max_new_tokens=max_new, seed=seed, temperature=temperature
        )
        return Response(_completion(gen.config.model_id, result, max_new, text=text))

    @post("/v1/chat/completions", status_code=200)
    async def chat(request: Request[Any, Any, Any]) -> Response[Any] | Stream:
        return await openai_route(request, text=False)

    @post("/v1/completions", status_code=200)
    async def completions(request: Request[Any, Any, Any]) -> Response[Any] | Stream:
        return await openai_route(request, text=True)

    def not_found(_: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
        if exc.status_code == 404:
            return _error(404, "not found")
        return _error(exc.status_code, str(exc.detail))

    app = Litestar(
        route_handlers=[healthz, models, generate, memory, notification, chat, completions],
        exception_handlers={HTTPException: not_found},
        logging_config=None,
        openapi_config=None,
    )
    return app


class RequireToken:
    """ASGI wrapper: every route but ``/healthz`` needs ``Authorization: Bearer <token>``
    (a worker reachable off loopback). Compared in constant time."""

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self._digest = hashlib.sha256(token.encode()).digest()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] != "/healthz":
            presented = b""
            for name, value in scope["headers"]:
                if name == b"authorization":
                    presented = value.partition(b" ")[2].strip()
            if not hmac.compare_digest(hashlib.sha256(presented).digest(), self._digest):
                body = (
                    b'{"error":{"message":"missing or invalid bearer token",'
                    b'"type":"authentication_error","param":null,"code":"invalid_api_key"}}'
                )
                await send(
                    {
                        "type": "http.response.start",
                        "status": 401,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


class AccessLog:
    """ASGI wrapper logging method, path, status and duration: never bodies or headers."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def timed_send(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            log.info(
                '{"method": "%s", "path": "%s", "status": %d, "ms": %.1f}',
                scope["method"],
                scope["path"],
                status,
                (time.perf_counter() - started) * 1000,
            )


def _openai_error(message: str) -> Response[Any]:
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": None}
    return Response({"error": error}, status_code=400)


def _sampling(body: dict[str, Any]) -> tuple[int | None, float | None]:
    """The sampling fields the worker honours: ``seed`` and ``temperature``."""
    seed = body.get("seed") if isinstance(body.get("seed"), int) else None
    temperature = body.get("temperature")
    return seed, float(temperature) if isinstance(temperature, int | float) else None


def _chunk(model: str, cid: str, delta: dict[str, Any] | str, finish: str | None) -> bytes:
    """A chat chunk (``delta`` a dict) or a text-completion chunk (``delta`` the text)."""
    text = isinstance(delta, str)
    choice: dict[str, Any] = (
        {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish}
        if text
        else {"index": 0, "delta": delta, "finish_reason": finish}
    )
    body = {
        "id": cid,
        "object": "text_completion" if text else "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }
    return b"data: " + _encoder.encode(body) + b"\n\n"


def _usage(result: Generation) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.tokens,
        "total_tokens": result.prompt_tokens + result.tokens,
    }


def _finish(result: Generation, max_new: int) -> str:
    return "length" if result.tokens >= max_new else "stop"


def _completion(
    model: str, result: Generation, max_new: int, *, text: bool = False
) -> dict[str, Any]:
    choice: dict[str, Any] = (
        {"index": 0, "text": result.text, "logprobs": None}
        if text
        else {"index": 0, "message": {"role": "assistant", "content": result.text}}
    )
    return {
        "id": ("cmpl-" if text else "chatcmpl-") + os.urandom(12).hex(),
        "object": "text_completion" if text else "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{**choice, "finish_reason": _finish(result, max_new)}],
        "usage": _usage(result),
    }


async def _stream(
    gen: Generator,
    messages: list[dict[str, str]] | None,
    prompt: str | None,
    max_new: int,
    usage: bool,
    seed: int | None,
    temperature: float | None,
) -> AsyncIterator[bytes]:
    """Token pieces as they come, as chat chunks (``messages``) or text-completion chunks
    (``prompt``); a client that leaves sets ``cancel`` (StreamingStatus CANCEL in the
    pipeline) and the lock is held until the pipeline has stopped."""
    text = prompt is not None
    model = gen.config.model_id
    cid = ("cmpl-" if text else "chatcmpl-") + os.urandom(12).hex()

    def piece(content: str) -> dict[str, Any] | str:
        return content if text else {"content": content}

    queue: asyncio.Queue[str] = asyncio.Queue()
    cancel = threading.Event()
    task = asyncio.create_task(
        gen.generate(
            messages,
            prompt,
            max_new_tokens=max_new,
            on_text=queue.put_nowait,
            cancel=cancel,
            seed=seed,
            temperature=temperature,
        )
    )
    try:
        if not text:
            yield _chunk(model, cid, {"role": "assistant", "content": ""}, None)
        while True:
            getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                yield _chunk(model, cid, piece(getter.result()), None)
                continue
            getter.cancel()
            while not queue.empty():
                yield _chunk(model, cid, piece(queue.get_nowait()), None)
            break
        result = task.result()
        yield _chunk(model, cid, piece("") if text else {}, _finish(result, max_new))
        if usage:
            body: dict[str, Any] = {
                "id": cid,
                "object": "text_completion" if text else "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
                "choices": [],
                "usage": _usage(result),
            }
            yield b"data: " + _encoder.encode(body) + b"\n\n"
        yield b"data: [DONE]\n\n"
    finally:
        cancel.set()
        if not task.done():
            await asyncio.shield(asyncio.wait({task}))
