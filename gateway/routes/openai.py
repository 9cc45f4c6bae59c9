"""The data plane: the OpenAI routes, Anthropic's messages, the engines' tokenizer and
rerank routes, audio, the OpenVINO worker's jobs, ``/v1/models`` and the engine-native
passthrough ``/upstream/{model}/...``.

Raw ASGI handlers on the hot path: the body is read once, only the routing fields are
decoded (``gateway.wire``), and upstream bytes go back untouched. Which fields a route
needs and how its stream ends is ``gateway.endpoints``; the request's life from pool to
slot is ``gateway.exchange``. Errors before the first byte are envelopes of the route's
surface with the right status; after it, in-band errors in the stream's own dialect.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from backends.base import Endpoint, UpstreamCall, UpstreamResponse
from backends.errors import BackendError, BackendOverloaded
from gateway.asgi import (
    ClientDisconnected,
    DisconnectWatch,
    Headers,
    header,
    read_body,
    send_bytes,
)
from gateway.auth import TokenCheck
from gateway.dispatch import Committed
from gateway.endpoints import Body, Relay, Route, Surface
from gateway.errors import (
    EndpointNotServed,
    GatewayError,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    ModelNotFound,
    NotFound,
    anthropic_envelope,
    backend_error_status,
    backoff_headers,
)
from gateway.exchange import Exchange, admission_error, check_serves
from gateway.logging import AccessLog
from gateway.pools import PoolRuntime
from gateway.splice import Splice, Wire, client_wire
from gateway.state import GatewayState
from gateway.streaming import RawReader, Reader, SseReader
from gateway.wire import (
    Multipart,
    RoutingView,
    encoder,
    parse_routing_view,
    require,
    usage_of,
    with_model,
    with_stream_usage,
)
from policies.admission import AdmissionError, Priority
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
UPSTREAM_PREFIX = "/upstream/"


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


def call_factory(
    pool: PoolRuntime,
    endpoint: Endpoint,
    body: bytes,
    model: str | None,
    stream: bool,
    rid: str,
    hide_usage: bool = False,
    *,
    rename: Callable[[bytes, str], bytes] = with_model,
    content_type: bytes | None = None,
    path: str | None = None,
) -> Callable[[str], UpstreamCall]:
    """Builds the call for whichever replica placement picks: the body goes as it is,
    unless that replica knows the model under another name (an alias was used; ``rename``
    rewrites it). ``model=None``: the body names no model (the worker's job routes)."""
    patched: dict[str, bytes] = {}

    def make_call(replica_id: str) -> UpstreamCall:
        target = pool.upstream_model[replica_id]
        payload = body
        if model is not None and target != model:
            payload = patched.get(target) or patched.setdefault(target, rename(body, target))
        return UpstreamCall(endpoint, payload, stream, rid, hide_usage, content_type, path)

    return make_call


def _check_budgets(view: RoutingView, fields: tuple[str, ...], limit: int) -> None:
    """Absurd budgets are refused here, as OpenAI does, rather than queued (llama.cpp reads
    some of them as "generate until the context is full")."""
    for field in fields:
        value = getattr(view, field)
        if value is not None and value > limit:
            raise InvalidRequest(
                f"{field} is {value}, above this model's context of {limit} tokens",
                param=field,
            )


class _Plan:
    """What ``_prepare`` decided: where the request goes and how its answer comes back."""

    __slots__ = ("make_call", "open_reader", "pool", "priority", "relay")

    def __init__(
        self,
        pool: PoolRuntime,
        priority: Priority,
        make_call: Callable[[str], UpstreamCall],
        relay: Relay = Relay.WHOLE,
        open_reader: Callable[[UpstreamResponse], Reader] | None = None,
    ) -> None:
        self.pool = pool
        self.priority = priority
        self.make_call = make_call
        self.relay = relay
        self.open_reader = open_reader


def credential(scope: dict[str, Any]) -> bytes | None:
    """The data token as a client sent it: ``Authorization: Bearer``, or ``X-Api-Key`` (how
    Anthropic's SDKs send it; llama-server accepts it on every route too)."""
    authorization = header(scope, b"authorization")
    if authorization is None:
        api_key = header(scope, b"x-api-key")
        if api_key is not None:
            return b"Bearer " + api_key
    return authorization


def _plan(
    route: Route,
    view: RoutingView,
    body: bytes,
    model: str,
    pool: PoolRuntime,
    priority: Priority,
    rid: str,
) -> _Plan:
    """How a JSON request goes to ``pool`` and how its answer comes back."""
    endpoint = route.endpoint
    if endpoint in pool.native_endpoints:  # the engine's own shape, relayed as it comes
        stream = bool(view.stream) and route.dialect is not None
        make_call = call_factory(pool, endpoint, body, model, stream, rid)
        if stream:
            return _Plan(pool, priority, make_call, Relay.RAW, RawReader)
        return _Plan(pool, priority, make_call)
    require(view, route.required, route.arrays)
    _check_budgets(view, route.budgets, pool.config.max_context_tokens)
    if route.always_raw:  # audio: the body as it comes, whatever it is
        make_call = call_factory(pool, endpoint, body, model, False, rid)
        return _Plan(pool, priority, make_call, Relay.RAW, RawReader)
    dialect = route.dialect
    if dialect is None or not view.stream:
        return _Plan(pool, priority, call_factory(pool, endpoint, body, model, False, rid))
    hide_usage = route.asks_usage and not view.stream_options  # absent or null
    if hide_usage:  # token metrics must not depend on the client asking for usage
        body = with_stream_usage(body, replace=view.stream_options is None)

    def open_reader(upstream: UpstreamResponse) -> Reader:
        return SseReader(upstream, hide_usage=hide_usage, dialect=dialect)

    make_call = call_factory(pool, endpoint, body, model, True, rid, hide_usage)
    return _Plan(pool, priority, make_call, Relay.EVENTS, open_reader)


class OpenAIProxy:
    def __init__(self, state: GatewayState, auth: TokenCheck, access_log: AccessLog) -> None:
        self.state = state
        self.auth = auth
        self.log = access_log
        self.max_body = state.config.server.max_body_bytes

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
            self.auth.check(credential(scope))
            listing, bodies = self.state.model_listing()
            body = bodies.get(name) if name else listing
            if body is None:
                raise ModelNotFound(f"the model {name!r} does not exist", param="model")
        except GatewayError as error:
            await _send_error(send, Surface.OPENAI, error, headers)
            return
        await send_bytes(send, 200, body, headers)

    # -- every proxied route -------------------------------------------------------------
    async def proxy(self, route: Route, scope: dict[str, Any], receive: Any, send: Any) -> None:
        async def serve(headers: Headers, ex: Exchange) -> None:
            plan = await self._prepare(route, scope, receive, ex.rid, ex)
            await self._relay(plan, scope, receive, send, headers, ex)

        await self._serve(route.surface, scope, send, serve)

    async def _serve(
        self,
        surface: Surface,
        scope: dict[str, Any],
        send: Any,
        serve: Callable[[Headers, Exchange], Awaitable[None]],
    ) -> None:
        """Run ``serve`` as one exchange: every failure becomes the surface's answer (or an
        in-band end), the exchange is closed and logged on every path."""
        rid = request_id(scope)
        headers: Headers = [(b"x-request-id", rid.encode())]
        ex = Exchange(rid, self.state.latency)
        try:
            await serve(headers, ex)
        except GatewayError as error:
            ex.status, ex.error = error.status, error.code
            await _send_error(send, surface, error, headers, client_wire(scope))
        except BackendError as error:
            await _send_backend_error(send, surface, error, headers, ex, client_wire(scope))
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
                await _send_error(send, surface, InternalError("internal gateway error"), headers)
        finally:
            await ex.close()
            if self.log.enabled:
                self.log.write(ex.record(scope))

    def _authenticate(self, surface: Surface, scope: dict[str, Any]) -> None:
        self.auth.check(credential(scope))

    async def _prepare(
        self, route: Route, scope: dict[str, Any], receive: Any, rid: str, ex: Exchange
    ) -> _Plan:
        """Everything before admission: method, auth, body, routing fields, pool, whether
        the pool serves the route, budgets, and how the answer will be relayed."""
        if scope["method"] != "POST":
            raise MethodNotAllowed("use POST for this route", headers=_ALLOW_POST)
        self._authenticate(route.surface, scope)
        body = await read_body(scope, receive, self.max_body)
        priority = parse_priority(header(scope, b"x-priority"))
        endpoint = route.endpoint
        if not route.routed:  # the worker's jobs name no model
            pool = ex.bind(self.state.worker_pool())
            if self.state.holds:  # an in-place swap holds a pool (rare): no await otherwise
                pool = await ex.settle(pool, self.state)
            return _Plan(pool, priority, call_factory(pool, endpoint, body, None, False, rid))
        if route.body is Body.MULTIPART:
            return await self._prepare_upload(route, scope, body, priority, rid, ex)
        view = parse_routing_view(body)
        model = view.model
        if model is None:  # as a single llama-server serves it: the default model
            model = self.state.default_model()
            body = with_model(body, model)
        pool = ex.bind(self.state.pool_for(model))
        if self.state.holds:  # an in-place swap holds a pool (rare): no await otherwise
            pool = await ex.settle(pool, self.state)
        check_serves(pool, endpoint, scope["path"])
        return _plan(route, view, body, model, pool, priority, rid)

    async def _prepare_upload(
        self,
        route: Route,
        scope: dict[str, Any],
        body: bytes,
        priority: Priority,
        rid: str,
        ex: Exchange,
    ) -> _Plan:
        """A multipart upload (audio transcription): ``model`` is a form field."""
        content_type = header(scope, b"content-type")
        form = Multipart(body, content_type)
        for field in route.required:
            if field not in form.files and field not in form.fields:
                raise InvalidRequest(f"missing required form field {field!r}", param=field)
        model = form.text("model") or self.state.default_model()
        pool = ex.bind(self.state.pool_for(model))
        if self.state.holds:  # an in-place swap holds a pool (rare): no await otherwise
            pool = await ex.settle(pool, self.state)
        check_serves(pool, route.endpoint, scope["path"])
        renamed = model if "model" in form.fields else None  # no field: nothing to rename

        def rename(raw: bytes, target: str) -> bytes:
            return form.replaced(raw, "model", target)

        make_call = call_factory(
            pool, route.endpoint, body, renamed, False, rid, rename=rename,
            content_type=content_type,
        )  # fmt: skip
        return _Plan(pool, priority, make_call, Relay.RAW, RawReader)

    async def _relay(
        self,
        plan: _Plan,
        scope: dict[str, Any],
        receive: Any,
        send: Any,
        headers: Headers,
        ex: Exchange,
    ) -> None:
        wire = client_wire(scope)
        watch = ex.watch = DisconnectWatch(receive, plan.pool.loop, wire=wire)
        try:
            committed = await ex.open(
                plan.pool,
                plan.priority,
                plan.make_call,
                open_reader=plan.open_reader,
                client_retries=client_retry_count(header(scope, RETRY_COUNT_HEADER)),
            )
        except AdmissionError as error:
            raise admission_error(error) from None
        headers += [
            (b"x-orchgate-replica", committed.lease.replica.replica_id.encode()),
            (b"x-orchgate-attempts", str(committed.attempts).encode()),
        ]
        if plan.relay is Relay.WHOLE:
            await _whole(committed, send, headers, watch, ex, wire)
        else:
            events = plan.relay is Relay.EVENTS
            await _relayed(committed, wire, send, headers, watch, ex, events=events,
                           loop=plan.pool.loop)  # fmt: skip

    # -- /upstream/{model}/{route}: engine-native routes ---------------------------------
    async def upstream(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """An engine's own route, reached explicitly and only from the adapter's list
        (``native_routes``): llama-swap's ``/upstream/:model/...``. Introspection routes
        need the admin token; GETs go to a ready replica without a slot, POSTs are
        admitted, placed and retried like any request."""

        async def serve(headers: Headers, ex: Exchange) -> None:
            await self._upstream(scope, receive, send, headers, ex.rid, ex)

        await self._serve(Surface.OPENAI, scope, send, serve)

    def _native_target(self, path: str) -> tuple[PoolRuntime, str, str]:
        """``(pool, engine route, access level)`` of ``/upstream/{model}{route}``; model
        ids may hold slashes, so every split is tried."""
        rest = path.removeprefix(UPSTREAM_PREFIX)
        for cut in (i for i, char in enumerate(rest) if char == "/"):
            model, native = rest[:cut], rest[cut:]
            pool_id = self.state.models.pool_for(model)
            if pool_id is None:
                continue
            pool = self.state.pools[pool_id]
            level = pool.native_routes.get(native)
            if level is None:
                raise NotFound(
                    f"{native} is not an engine route orchgate passes through for "
                    f"{pool.engine}; these are: {', '.join(sorted(pool.native_routes)) or 'none'}"
                )
            return pool, native, level
        raise ModelNotFound("no model of this gateway in that /upstream path", param="model")

    async def _upstream(
        self,
        scope: dict[str, Any],
        receive: Any,
        send: Any,
        headers: Headers,
        rid: str,
        ex: Exchange,
    ) -> None:
        method = scope["method"]
        pool, native, access = self._native_target(scope["path"])
        authorization = credential(scope)
        if access == "admin-get":
            self.auth.check_admin(authorization)
        else:
            self.auth.check(authorization)
        if access == "post" and method != "POST":
            raise MethodNotAllowed(f"use POST for {native}", headers=_ALLOW_POST)
        if access != "post" and method not in ("GET", "HEAD"):
            raise MethodNotAllowed(f"use GET for {native}", headers=_ALLOW_GET)
        pool = ex.bind(pool)
        if self.state.holds:  # an in-place swap holds a pool (rare): no await otherwise
            pool = await ex.settle(pool, self.state)
        if method != "POST":
            replica = min(
                (r for r in pool.replicas if r.ready),
                key=lambda r: r.in_use,
                default=None,
            )
            if replica is None:
                raise NotFound(f"pool {pool.id!r} has no ready replica to ask")
            ex.replica = replica.replica_id
            status, raw = await replica.backend.get(native)
            ex.status = status
            kind = b"application/json" if raw[:1] in (b"{", b"[") else b"text/plain; charset=utf-8"
            await send_bytes(send, status, raw, headers, kind)
            return
        body = await read_body(scope, receive, self.max_body)
        await self._native_post(pool, native, body, scope, receive, send, headers, ex)

    async def _native_post(
        self,
        pool: PoolRuntime,
        native: str,
        body: bytes,
        scope: dict[str, Any],
        receive: Any,
        send: Any,
        headers: Headers,
        ex: Exchange,
    ) -> None:
        """An engine-native POST (``/completion``...): admitted, placed and retried like any
        request; a stream is relayed as the engine writes it."""
        view = parse_routing_view(body)
        stream = bool(view.stream)
        make_call = call_factory(
            pool, Endpoint.NATIVE, body, view.model, stream, ex.rid, path=native
        )
        plan = _Plan(pool, parse_priority(header(scope, b"x-priority")), make_call)
        if stream:
            plan.relay, plan.open_reader = Relay.RAW, RawReader
        await self._relay(plan, scope, receive, send, headers, ex)

    # -- engine-native POST routes at the top level (a drop-in for one llama-server) -----
    async def native(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """``POST /completion``, ``/infill``, ``/apply-template``, ``/embedding``,
        ``/reranking``: llama-server's own data routes, for the body's ``model`` (or the
        default) when its pool's engine has that route -- what a client written for one
        llama-server calls. Introspection (``/props``, ``/slots``) stays behind
        ``/upstream/{model}/...`` and the admin token."""

        async def serve(headers: Headers, ex: Exchange) -> None:
            path = scope["path"]
            if scope["method"] != "POST":
                raise MethodNotAllowed(f"use POST for {path}", headers=_ALLOW_POST)
            self.auth.check(credential(scope))
            body = await read_body(scope, receive, self.max_body)
            model = parse_routing_view(body).model or self.state.default_model()
            pool = ex.bind(self.state.pool_for(model))
            if self.state.holds:
                pool = await ex.settle(pool, self.state)
            if pool.native_routes.get(path) != "post":
                raise EndpointNotServed(
                    f"{path} is an engine route of llama.cpp pools; pool {pool.id!r} "
                    f"({pool.engine}) has no such route",
                    param="model",
                )
            await self._native_post(pool, path, body, scope, receive, send, headers, ex)

        await self._serve(Surface.OPENAI, scope, send, serve)


# -- relays --------------------------------------------------------------------------------
async def _whole(
    committed: Committed,
    send: Any,
    headers: Headers,
    watch: DisconnectWatch,
    ex: Exchange,
    wire: Wire | None,
) -> None:
    upstream = committed.upstream
    body = await upstream.read()
    ex.first_byte = time.perf_counter()
    watch.finish()
    kind = upstream.content_type.encode()
    await send_bytes(send, upstream.status, body, headers, kind, wire)
    ex.status = upstream.status
    usage, _ = usage_of(body)
    ex.count_usage(usage)


async def _relayed(
    committed: Committed,
    wire: Wire | None,
    send: Any,
    headers: Headers,
    watch: DisconnectWatch,
    ex: Exchange,
    *,
    events: bool,
    loop: asyncio.AbstractEventLoop,
) -> None:
    """An answer sent on as it arrives: SSE events (``events``) or raw bytes. Through the
    front door's wire the head and the first piece leave in one write and the rest is
    spliced; under another ASGI server it is pulled, one message per batch."""
    upstream = committed.upstream
    if events:
        start = _SSE_HEADERS + headers
    else:
        start = [(b"content-type", upstream.content_type.encode()), *headers]
    ex.status = upstream.status if not events else 200
    if ex.status in (204, 304):
        wire = None  # no body to chunk: the plain messages frame it
    reader = committed.reader
    assert reader is not None
    if wire is not None:
        wire.start_stream(ex.status, start, committed.first)
    else:
        await send({"type": "http.response.start", "status": ex.status, "headers": start})
        await send({"type": "http.response.body", "body": committed.first, "more_body": True})
    ex.first_byte = time.perf_counter()
    spliced = False
    if wire is not None:  # from here on, upstream bytes go straight to the client's socket
        splice = Splice(reader, wire, loop)
        spliced = await splice.run()
        if splice.failed:
            ex.error = "internal_error"
    if not spliced:
        await _pulled(reader, send, ex)
    ex.events = reader.stats.events if events else None
    if reader.stats.failed:
        ex.error = reader.stats.failed
    watch.finish()
    if wire is not None:
        wire.end_stream()
    else:
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _pulled(reader: Reader, send: Any, ex: Exchange) -> None:
    """The rest of the answer relayed by the request's task, one ASGI message per batch
    (any ASGI server; the front door splices instead)."""
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
                "body": reader.failure(f"gateway error: {type(exc).__name__}"),
            }
        )
        ex.error = "internal_error"


async def _send_error(
    send: Any,
    surface: Surface,
    error: GatewayError,
    headers: Headers,
    wire: Wire | None = None,
) -> None:
    extra = [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    envelope = error.envelope()
    if surface is Surface.ANTHROPIC:
        envelope = anthropic_envelope(error.status, envelope)
    await send_bytes(send, error.status, encoder.encode(envelope), headers + extra, wire=wire)


async def _send_backend_error(
    send: Any,
    surface: Surface,
    error: BackendError,
    headers: Headers,
    ex: Exchange,
    wire: Wire | None = None,
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
    if surface is Surface.ANTHROPIC:
        body = encoder.encode(anthropic_envelope(ex.status, error.body))
    elif surface is Surface.WORKER and error.raw is not None:
        body = error.raw  # the worker contract's own answer, as the worker gave it
    else:
        body = error.encoded_body()
    await send_bytes(send, ex.status, body, headers + extra, wire=wire)
