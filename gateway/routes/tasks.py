"""OrchQueue v1 task API: ``POST /v1/tasks``, ``GET /v1/tasks/{id}``,
``GET /v1/tasks/{id}/stream``, ``POST /v1/tasks/{id}/cancel``.

Errors use the task envelope ``{code, message, engine, retriable?, retry_after_ms?}``,
never the OpenAI one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import Request, Response, Router, get, post
from litestar.exceptions import HTTPException
from litestar.response import Stream

from backends.base import Endpoint
from gateway.errors import TOO_DEEP, GatewayError, backoff_headers
from gateway.pools import PoolRuntime
from gateway.state import GatewayState
from gateway.tasks import CancelOutcome, Task, TaskBook, TaskRequest, Workload
from policies.admission import AdmissionError, PoolUnready, QueueFull

_decoder = msgspec.json.Decoder(TaskRequest)
_CHARS_PER_TOKEN = 4  # a conservative prompt-size estimate without a tokenizer


# the envelope's "engine" is always a string (SPEC.md); before a pool is known, the gateway
# itself answered
GATEWAY_ENGINE = "orchgate"


class TaskError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        engine: str = GATEWAY_ENGINE,
        retriable: bool | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body: dict[str, Any] = {"code": code, "message": message, "engine": engine}
        self.headers: dict[str, str] = {}
        if retriable is not None:
            self.body["retriable"] = retriable
        if retry_after_s is not None:
            self.headers = backoff_headers(retry_after_s)
            self.body["retry_after_ms"] = int(self.headers["X-Backoff-Ms"])


def _invalid(message: str, engine: str = GATEWAY_ENGINE) -> TaskError:
    return TaskError(400, "INVALID_PARAMS", message, engine=engine, retriable=False)


_AUTH_CODES = {401: "UNAUTHORIZED", 403: "FORBIDDEN", 404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}


def task_error_body(error: GatewayError) -> dict[str, Any]:
    """A gateway-level error (auth, routing, limits) in the task API's envelope."""
    status = error.status
    code = _AUTH_CODES.get(status, "INVALID_PARAMS" if status < 500 else "INTERNAL")
    return {"code": code, "message": error.message, "engine": GATEWAY_ENGINE}


def _render(_: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    if isinstance(exc, TaskError):
        return Response(exc.body, status_code=exc.status, headers=exc.headers)
    if isinstance(exc, GatewayError):
        return Response(task_error_body(exc), status_code=exc.status, headers=exc.headers)
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    code = _AUTH_CODES.get(status, "INVALID_PARAMS" if status < 500 else "INTERNAL")
    message = str(exc.detail) if isinstance(exc, HTTPException) else "internal gateway error"
    return Response(
        {"code": code, "message": message, "engine": GATEWAY_ENGINE}, status_code=status
    )


def _resolve_pool(state: GatewayState, req: TaskRequest) -> PoolRuntime:
    name = req.model_ref or req.model
    if name is None:  # the OpenAI surface's rule: server.default_model, or the only pool
        try:
            name = state.default_model()
        except GatewayError:
            raise _invalid("model_ref is required: the gateway serves several pools") from None
    pool_id = state.models.pool_for(name)
    if pool_id is None and ":" in name:  # "hf:org/repo", "file:/path": try the bare name
        pool_id = state.models.pool_for(name.split(":", 1)[1])
    if pool_id is None:
        raise _invalid(f"unknown model_ref {name!r}; see GET /v1/models")
    return state.pools[pool_id]


def _payload(
    req: TaskRequest, pool: PoolRuntime, max_tokens: int
) -> tuple[dict[str, Any], Endpoint, int]:
    """The upstream body (without ``model``), its endpoint and the prompt's size in chars."""
    given = [f for f in ("prompt", "inputs", "messages") if getattr(req, f) is not None]
    if len(given) != 1:
        raise _invalid("exactly one of prompt, inputs or messages is required", pool.engine)
    payload: dict[str, Any] = dict(req.params or {})
    for reserved in ("model", "stream", "prompt", "messages", "max_tokens", "seed"):
        payload.pop(reserved, None)
    _guard_params(payload, pool)
    payload.update(max_tokens=max_tokens, stream=True)
    if req.seed is not None:
        payload["seed"] = req.seed
    if req.messages is not None:
        payload["messages"] = req.messages
        size = sum(len(str(m.get("content", ""))) for m in req.messages)
        return payload, Endpoint.CHAT, size
    prompt = req.prompt if req.prompt is not None else "\n".join(req.inputs or [])
    if not prompt:
        raise _invalid("the prompt is empty", pool.engine)
    payload["prompt"] = prompt
    return payload, Endpoint.COMPLETIONS, len(prompt)


# token budgets under other names, which engines honour beside max_tokens: the task's
# budget is max_tokens alone, so the context guard below holds
_OTHER_BUDGETS = ("max_completion_tokens", "n_predict", "max_new_tokens")


def _guard_params(params: dict[str, Any], pool: PoolRuntime) -> None:
    for name in _OTHER_BUDGETS:
        if name in params:
            raise _invalid(f"params.{name}: set the budget with max_tokens", pool.engine)
    n = params.get("n", 1)
    if n != 1 or isinstance(n, bool):
        raise _invalid("params.n: a task streams exactly one choice (n = 1)", pool.engine)


def _guard_context(req: TaskRequest, pool: PoolRuntime, max_tokens: int, prompt_chars: int) -> None:
    limit = pool.config.max_context_tokens
    ctx = req.ctx or limit  # 0 means the default, as llama-orch's own clients send it
    if ctx > limit:
        raise _invalid(f"ctx {ctx} exceeds the pool's context limit of {limit} tokens", pool.engine)
    needed = prompt_chars // _CHARS_PER_TOKEN + max_tokens
    if needed > ctx:
        raise _invalid(
            f"prompt (~{prompt_chars // _CHARS_PER_TOKEN} tokens) plus max_tokens "
            f"{max_tokens} exceeds the context of {ctx} tokens",
            pool.engine,
        )


def _last_event_id(request: Request[Any, Any, Any]) -> int:
    """``Last-Event-ID`` (what an SSE client sends when it reconnects): the id of the last
    event it has; the stream resumes after it."""
    raw = request.headers.get("last-event-id")
    if raw is None or raw == "":
        return 0
    if not raw.isdigit() or len(raw) > 9:
        raise _invalid("Last-Event-ID must be the id of an event of this task (a number)")
    return int(raw)


async def _view(book: TaskBook, task_id: str) -> dict[str, Any]:
    if book.get(task_id) is None and book.remote is not None:  # a task another gateway ran
        view = await book.remote.view(task_id)
        if view is not None:
            return view
    return _lookup(book, task_id).view()


async def _frames(book: TaskBook, task_id: str, after: int) -> AsyncIterator[bytes]:
    if book.get(task_id) is None and book.remote is not None:
        frames = await book.remote.frames(task_id, after)
        if frames is not None:
            return frames
    return _lookup(book, task_id).frames(after=after)


def _nothing_to_cancel(task_id: str, state: str, engine: str | None) -> TaskError:
    return TaskError(
        409,
        "INVALID_PARAMS",
        f"task {task_id!r} already {state}; nothing to cancel",
        engine=engine or GATEWAY_ENGINE,
        retriable=False,
    )


def _lookup(book: TaskBook, task_id: str) -> Task:
    task = book.get(task_id)
    if task is None:
        raise TaskError(404, "NOT_FOUND", f"no task {task_id!r}")
    return task


def _parse(state: GatewayState, raw: bytes) -> tuple[TaskRequest, PoolRuntime]:
    try:
        req = _decoder.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise _invalid(f"invalid task request: {exc}") from None
    except UnicodeDecodeError as exc:  # msgspec raises it for bad UTF-8 inside a string
        raise _invalid(f"a string in the request body is not valid UTF-8: {exc.reason}") from None
    except RecursionError:
        raise _invalid(TOO_DEEP) from None
    pool = _resolve_pool(state, req)
    if req.workload is not Workload.COMPLETION:
        raise _invalid(
            f"workload {req.workload.value!r} is not served by the task API; use /v1/embeddings",
            pool.engine,
        )
    if req.engine is not None and req.engine != pool.engine:
        raise _invalid(
            f"engine {req.engine!r} does not match the pool's engine {pool.engine!r}",
            pool.engine,
        )
    return req, pool


def _refused(exc: AdmissionError, engine: str) -> TaskError:
    """An admission refusal in the task envelope: 429 when the queue is full, 503 else."""
    if isinstance(exc, QueueFull):
        status, code, message = 429, "ADMISSION_REJECT", str(exc)
    elif isinstance(exc, PoolUnready):
        status, code, message = 503, "POOL_UNREADY", "no replica of the pool is ready"
    else:  # closed (shutting down, removed), or a swap outlasting the queue timeout
        status, code, message = 503, "POOL_UNAVAILABLE", str(exc)
    return TaskError(
        status, code, message, engine=engine, retriable=True, retry_after_s=exc.retry_after_s
    )


async def _settle(state: GatewayState, raw: bytes) -> None:
    _, pool = _parse(state, raw)
    try:
        await state.settled(pool)
    except AdmissionError as exc:
        raise _refused(exc, pool.engine) from None


async def admit_task(state: GatewayState, book: TaskBook, raw: bytes) -> Task:
    """Validate a submit, admit it into its pool's queue (429/503 now, not later), start it."""
    req, pool = _parse(state, raw)
    max_tokens = req.max_tokens or state.config.tasks.default_max_tokens
    payload, endpoint, prompt_chars = _payload(req, pool, max_tokens)
    _guard_context(req, pool, max_tokens, prompt_chars)
    task_id = req.task_id or book.new_id()
    _unique(book, task_id, pool.engine)
    try:
        ticket = await pool.queue.admit(req.priority)
    except AdmissionError as exc:
        raise _refused(exc, pool.engine) from None
    try:  # a shared ledger awaits: a twin submitted meanwhile must not run twice
        _unique(book, task_id, pool.engine)
    except TaskError:
        ticket.abandon()
        raise
    return book.submit(task_id, pool, req.priority, ticket, payload, endpoint)


def _unique(book: TaskBook, task_id: str, engine: str) -> None:
    if book.get(task_id) is not None:
        raise TaskError(
            409, "INVALID_PARAMS", f"task_id {task_id!r} already exists",
            engine=engine, retriable=False,
        )  # fmt: skip


def task_router(state: GatewayState, book: TaskBook, *, guards: list[Any]) -> Router:
    @post("/v1/tasks", status_code=202)
    async def submit(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
        raw = await request.body()
        if state.holds:  # a pool swapping in place: submits wait for it, bounded
            await _settle(state, raw)
        task = await admit_task(state, book, raw)
        return Response(
            {
                "task_id": task.id,
                "queue_position": task.ticket.position,
                "predicted_start_ms": task.predicted_start_ms,
                "backoff_ms": 0,
            },
            status_code=202,
        )

    @get("/v1/tasks/{task_id:str}")
    async def status(task_id: str) -> dict[str, Any]:
        return await _view(book, task_id)

    @get("/v1/tasks/{task_id:str}/stream")
    async def stream(task_id: str, request: Request[Any, Any, Any]) -> Stream:
        return Stream(
            await _frames(book, task_id, _last_event_id(request)),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @post("/v1/tasks/{task_id:str}/cancel", status_code=204)
    async def cancel(task_id: str) -> None:
        if book.get(task_id) is None and book.remote is not None:
            # another gateway runs it (active mode: its node cancels it, 204 once it ended)
            # or ran it (ended: a leader ends a former leader's tasks at once)
            cancelled = await book.remote.cancel(task_id)
            if cancelled:
                return
            view = await book.remote.view(task_id) if cancelled is False else None
            if view is not None:
                raise _nothing_to_cancel(task_id, view["state"], view.get("engine"))
        task = _lookup(book, task_id)
        if book.cancel(task) is CancelOutcome.ALREADY_FINISHED:
            raise _nothing_to_cancel(task_id, task.state.value, task.engine)

    return Router(
        path="/",
        route_handlers=[submit, status, stream, cancel],
        guards=guards,
        exception_handlers={
            TaskError: _render,
            GatewayError: _render,
            HTTPException: _render,
            Exception: _render,
        },
    )
