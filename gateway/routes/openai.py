"""The OpenAI data plane: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models.

Raw ASGI handlers on the hot path: the body is read once, only the routing fields are
decoded (``gateway.wire``), and upstream bytes go back untouched. Errors before the first
byte are OpenAI envelopes with the right status; after it, in-band SSE errors.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import time
from collections.abc import Callable
from typing import Any

from backends.base import WORKER_ENDPOINTS, Endpoint, UpstreamCall
from backends.errors import BackendError, BackendOverloaded
from gateway.asgi import (
    ClientDisconnected,
    DisconnectWatch,
    Headers,
    header,
    read_body,
    send_bytes,
    send_error,
)
from gateway.auth import TokenCheck
from gateway.dispatch import Committed, dispatch
from gateway.errors import (
    GatewayError,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    ModelNotFound,
    NotFound,
    PoolUnavailable,
    QueueFullError,
    backend_error_status,
    backoff_headers,
)
from gateway.logging import AccessLog, AccessRecord
from gateway.state import GatewayState, PoolRuntime
from gateway.streaming import DONE, error_event
from gateway.wire import (
    RoutingView,
    parse_routing_view,
    usage_of,
    with_model,
    with_stream_usage,
)
from policies.admission import AdmissionError, Priority, QueueFull
from policies.retry import RETRY_COUNT_HEADER, client_retry_count

log = logging.getLogger("orchgate")

_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
_SSE_HEADERS: Headers = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_PRIORITIES = {p.value.encode(): p for p in Priority}


_ID_PREFIX = os.urandom(8).hex()
_id_counter = itertools.count(1)


_ALLOW_GET = {"Allow": "GET, HEAD"}
_ALLOW_POST = {"Allow": "POST"}


def request_id(scope: dict[str, Any]) -> str:
    """The client's ``X-Request-Id`` when it is sane, else a fresh one: 32 hex characters,
    unique per process (a random prefix and a counter; cheaper than ``uuid4``)."""
    given = header(scope, b"x-request-id")
    if given is not None and _REQUEST_ID.fullmatch(given):
        return given.decode()
    return fresh_request_id()


def fresh_request_id() -> str:
    return f"{_ID_PREFIX}{next(_id_counter):016x}"


def parse_priority(value: bytes | None) -> Priority:
    if value is None:
        return Priority.INTERACTIVE
    priority = _PRIORITIES.get(value.strip().lower())
    if priority is None:
        raise InvalidRequest("X-Priority must be 'interactive' or 'batch'", param="X-Priority")
    return priority


def admission_error(error: AdmissionError) -> GatewayError:
    headers = backoff_headers(error.retry_after_s)
    if isinstance(error, QueueFull):
        return QueueFullError(f"{error}; retry after {headers['Retry-After']}s", headers=headers)
    return PoolUnavailable(f"{error}; retry after {headers['Retry-After']}s", headers=headers)


def call_factory(
    pool: PoolRuntime,
    endpoint: Endpoint,
    body: bytes,
    model: str | None,
    stream: bool,
    rid: str,
    hide_usage: bool = False,
) -> Callable[[str], UpstreamCall]:
    """Builds the call for whichever replica placement picks: the body goes as it is,
    unless that replica knows the model under another name (an alias was used).
    ``model=None``: the body names no model (the worker's job routes)."""
    patched: dict[str, bytes] = {}

    def make_call(replica_id: str) -> UpstreamCall:
        target = pool.upstream_model[replica_id]
        payload = body
        if model is not None and target != model:
            payload = patched.get(target) or patched.setdefault(target, with_model(body, target))
        return UpstreamCall(endpoint, payload, stream, rid, hide_usage)

    return make_call


def _check_max_tokens(view: RoutingView, limit: int) -> None:
    """Absurd budgets are refused here, as OpenAI does, rather than queued (llama.cpp reads
    some of them as "generate until the context is full")."""
    for field, value in (
        ("max_tokens", view.max_tokens),
        ("max_completion_tokens", view.max_completion_tokens),
    ):
        if value is not None and value > limit:
            raise InvalidRequest(
                f"{field} is {value}, above this model's context of {limit} tokens",
                param=field,
            )


class _Exchange:
    """Per-request state: what must be closed, and what the access log records."""

    __slots__ = (
        "attempts",
        "committed",
        "engine",
        "error",
        "events",
        "first_byte",
        "pool",
        "replica",
        "status",
        "tokens_in",
        "tokens_out",
        "watch",
    )

    def __init__(self) -> None:
        self.watch: DisconnectWatch | None = None
        self.committed: Committed | None = None
        self.status = 500
        self.pool: str | None = None
        self.replica: str | None = None
        self.engine: str | None = None
        self.attempts: int | None = None
        self.first_byte: float | None = None
        self.events: int | None = None
        self.error: str | None = None
        self.tokens_in: int | None = None
        self.tokens_out: int | None = None

    async def close(self) -> None:
        """Stop watching the client, count the tokens, free the upstream and the slot."""
        if self.watch is not None:
            self.watch.close()
        if self.committed is not None:
            reader = self.committed.reader
            if reader is not None:  # streams: also those cut short
                self.count_tokens(*reader.stats.tokens())
                if reader.stats.failed:
                    self.committed.lease.replica.errors[reader.stats.failed] += 1
            await self.committed.aclose()

    def count_tokens(self, tokens_in: int, tokens_out: int) -> None:
        self.tokens_in, self.tokens_out = tokens_in, tokens_out
        assert self.committed is not None
        self.committed.lease.replica.add_tokens(tokens_in, tokens_out)


class OpenAIProxy:
    def __init__(self, state: GatewayState, auth: TokenCheck, access_log: AccessLog) -> None:
        self.state = state
        self.auth = auth
        self.log = access_log
        self.max_body = state.config.server.max_body_bytes
        self.latency = state.latency

    def worker_pool(self) -> PoolRuntime:
        """The first pool of ``openvino`` workers: the only engine with the job routes.
        (An NPU pool is never a fallback for another pool; this is the reverse lookup.)"""
        for pool in self.state.pools.values():
            if pool.engine == "openvino":
                return pool
        raise NotFound("no openvino worker pool is configured for /v1/worker routes")

    def default_model(self) -> str:
        """What a request without ``model`` gets: ``server.default_model``, else the only
        pool's canonical model."""
        configured = self.state.config.server.default_model
        if configured is not None:
            return configured
        if len(self.state.pools) == 1:
            return next(iter(self.state.pools.values())).config.models[0]
        raise InvalidRequest(
            "missing required field 'model' (this gateway serves several pools and has no "
            "server.default_model)",
            param="model",
        )

    def pool_for(self, model: str) -> PoolRuntime:
        pool_id = self.state.models.pool_for(model)
        if pool_id is None:
            raise ModelNotFound(f"The model '{model}' does not exist", param="model")
        return self.state.pools[pool_id]

    # -- GET /v1/models ------------------------------------------------------------------
    async def models(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """``GET /v1/models`` (the list) and ``GET /v1/models/{id}`` (``models.retrieve``;
        ids may hold slashes), with or without ``/v1``."""
        rid = request_id(scope)
        headers: Headers = [(b"x-request-id", rid.encode())]
        path: str = scope["path"]
        name = path.removeprefix("/v1").removeprefix("/models").removeprefix("/")
        try:
            if scope["method"] not in ("GET", "HEAD"):
                raise MethodNotAllowed("use GET for this route", headers=_ALLOW_GET)
            self.auth.check(header(scope, b"authorization"))
            body = self.state.model_bodies.get(name) if name else self.state.models_body
            if body is None:
                raise ModelNotFound(f"the model {name!r} does not exist", param="model")
        except GatewayError as error:
            await send_error(send, error, headers)
            return
        await send_bytes(send, 200, body, headers)

    # -- POST chat / completions / embeddings --------------------------------------------
    async def proxy(
        self, endpoint: Endpoint, scope: dict[str, Any], receive: Any, send: Any
    ) -> None:
        started = time.perf_counter()
        rid = request_id(scope)
        headers: Headers = [(b"x-request-id", rid.encode())]
        ex = _Exchange()
        try:
            await self._exchange(endpoint, scope, receive, send, headers, rid, ex)
        except GatewayError as error:
            ex.status, ex.error = error.status, error.code
            await send_error(send, error, headers)
        except BackendError as error:
            await self._send_backend_error(send, error, headers, ex)
        except ClientDisconnected:
            ex.status, ex.error = 499, "client_disconnected"
        except asyncio.CancelledError:
            if ex.watch is None or not ex.watch.disconnected:
                raise
            ex.status, ex.error = 499, "client_disconnected"
        except Exception:  # a bug: the client still gets an envelope, never a traceback
            log.exception("unhandled error on %s", scope["path"])
            ex.status, ex.error = 500, "internal_error"
            if ex.first_byte is None:
                await send_error(send, InternalError("internal gateway error"), headers)
        finally:
            await ex.close()
            if self.latency and ex.replica is not None:  # [metrics] extended
                self._observe(ex, started)
            self._log(scope, rid, ex, started)

    async def _exchange(
        self,
        endpoint: Endpoint,
        scope: dict[str, Any],
        receive: Any,
        send: Any,
        headers: Headers,
        rid: str,
        ex: _Exchange,
    ) -> None:
        pool, priority, make_call = await self._prepare(endpoint, scope, receive, rid, ex)
        watch = ex.watch = DisconnectWatch(receive)
        try:
            committed = ex.committed = await dispatch(
                pool,
                priority,
                make_call,
                client_retries=client_retry_count(header(scope, RETRY_COUNT_HEADER)),
            )
        except AdmissionError as error:
            raise admission_error(error) from None
        ex.replica = committed.lease.replica.replica_id
        ex.attempts = committed.attempts
        headers += [
            (b"x-orchgate-replica", ex.replica.encode()),
            (b"x-orchgate-attempts", str(committed.attempts).encode()),
        ]
        if committed.reader is not None:
            await self._stream(committed, send, headers, watch, ex)
        else:
            await self._whole(committed, send, headers, watch, ex)

    async def _prepare(
        self, endpoint: Endpoint, scope: dict[str, Any], receive: Any, rid: str, ex: _Exchange
    ) -> tuple[PoolRuntime, Priority, Callable[[str], UpstreamCall]]:
        """Everything before admission: method, auth, body, routing fields, pool, priority."""
        if scope["method"] != "POST":
            raise MethodNotAllowed("use POST for this route", headers=_ALLOW_POST)
        self.auth.check(header(scope, b"authorization"))
        body = await read_body(scope, receive, self.max_body)
        priority = parse_priority(header(scope, b"x-priority"))
        if endpoint in WORKER_ENDPOINTS:
            pool = self.worker_pool()
            if self.state.holds:  # an in-place swap holds a pool (rare)
                pool = await self._settled(pool)
            ex.pool, ex.engine = pool.id, pool.engine
            return pool, priority, call_factory(pool, endpoint, body, None, False, rid)
        view = parse_routing_view(body, endpoint)
        model = view.model
        if model is None:  # as a single llama-server serves it: the default model
            model = self.default_model()
            body = with_model(body, model)
        pool = self.pool_for(model)
        if self.state.holds:  # an in-place swap holds a pool (rare): no await otherwise
            pool = await self._settled(pool)
        _check_max_tokens(view, pool.config.max_context_tokens)
        stream = bool(view.stream) and endpoint is not Endpoint.EMBEDDINGS
        hide_usage = stream and not view.stream_options  # absent or null
        if hide_usage:  # token metrics must not depend on the client asking for usage
            body = with_stream_usage(body, replace=view.stream_options is None)
        ex.pool, ex.engine = pool.id, pool.engine
        return pool, priority, call_factory(pool, endpoint, body, model, stream, rid, hide_usage)

    async def _settled(self, pool: PoolRuntime) -> PoolRuntime:
        """``pool``, or what serves it once the in-place swap holding it is over."""
        try:
            return await self.state.settled(pool)
        except AdmissionError as error:
            raise admission_error(error) from None

    async def _whole(
        self,
        committed: Committed,
        send: Any,
        headers: Headers,
        watch: DisconnectWatch,
        ex: _Exchange,
    ) -> None:
        body = await committed.upstream.read()
        ex.first_byte = time.perf_counter()
        watch.finish()
        upstream = committed.upstream
        await send_bytes(send, upstream.status, body, headers, upstream.content_type.encode())
        ex.status = upstream.status
        usage, _ = usage_of(body)
        if usage is not None:
            ex.count_tokens(usage.prompt_tokens, usage.completion_tokens)

    async def _stream(
        self,
        committed: Committed,
        send: Any,
        headers: Headers,
        watch: DisconnectWatch,
        ex: _Exchange,
    ) -> None:
        ex.status = 200
        await send(
            {"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS + headers}
        )
        await send({"type": "http.response.body", "body": committed.first, "more_body": True})
        ex.first_byte = time.perf_counter()
        reader = committed.reader
        assert reader is not None
        try:
            async for batch in reader.rest():
                await send({"type": "http.response.body", "body": batch, "more_body": True})
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must still end the stream properly
            await send(
                {
                    "type": "http.response.body",
                    "more_body": True,
                    "body": error_event(f"gateway error: {type(exc).__name__}") + DONE,
                }
            )
            ex.error = "internal_error"
        ex.events = reader.stats.events
        if reader.stats.failed:
            ex.error = reader.stats.failed
        watch.finish()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _send_backend_error(
        self, send: Any, error: BackendError, headers: Headers, ex: _Exchange
    ) -> None:
        ex.status = backend_error_status(error)
        ex.error = "upstream_error"
        ex.attempts = error.attempts
        ex.replica = error.replica_id or None
        extra = [(b"x-orchgate-attempts", str(error.attempts).encode())]
        if isinstance(error, BackendOverloaded) and error.retry_after_s is not None:
            extra += [
                (k.lower().encode(), v.encode())
                for k, v in backoff_headers(error.retry_after_s).items()
            ]
        await send_bytes(send, ex.status, error.encoded_body(), headers + extra)

    def _observe(self, ex: _Exchange, started: float) -> None:
        latency = self.latency[ex.replica]  # type: ignore[index]
        if ex.first_byte is not None:
            latency.ttft.observe(ex.first_byte - started)
        latency.duration.observe(time.perf_counter() - started)

    def _log(self, scope: dict[str, Any], rid: str, ex: _Exchange, started: float) -> None:
        if not self.log.enabled:
            return
        end = time.perf_counter()
        self.log.write(
            AccessRecord(
                ts=time.time(),
                method=scope["method"],
                path=scope["path"],
                status=ex.status,
                duration_ms=round((end - started) * 1000, 3),
                request_id=rid,
                pool=ex.pool,
                replica=ex.replica,
                engine=ex.engine,
                attempts=ex.attempts,
                ttfb_ms=None
                if ex.first_byte is None
                else round((ex.first_byte - started) * 1000, 3),
                events=ex.events,
                tokens_in=ex.tokens_in,
                tokens_out=ex.tokens_out,
                error=ex.error,
            )
        )
