"""create_app(config) -> Litestar: routes, auth, CORS, error rendering and lifespan. Wiring
only; behaviour lives in the modules it wires."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO

import msgspec
from litestar import Litestar, Request, Response, asgi, get
from litestar.config.cors import CORSConfig
from litestar.connection import ASGIConnection
from litestar.exceptions import HTTPException
from litestar.handlers.base import BaseRouteHandler

from backends.hardware import detect
from gateway.asgi import header, send_bytes
from gateway.auth import TokenCheck
from gateway.config import Config
from gateway.endpoints import BY_PATH, MULTIPART_PATHS, NATIVE_PATHS, ROUTES, Route
from gateway.errors import (
    GatewayError,
    HeadersTooLarge,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
)
from gateway.frontdoor import FrontDoorLimits, FrontDoorProtocol, protocol_for
from gateway.guard import RequestGuard
from gateway.jobs import JobBook
from gateway.lifecycle import Lifecycle
from gateway.logging import AccessLog, AccessRecord
from gateway.openapi import build_openapi
from gateway.pools import AdmissionFactory, local_admission
from gateway.residency import Residency
from gateway.routes.catalog import catalog_handlers
from gateway.routes.control import control_handlers
from gateway.routes.lifecycle import lifecycle_handlers
from gateway.routes.openai import UPSTREAM_PREFIX, OpenAIProxy, fresh_request_id, request_id
from gateway.routes.tasks import task_error_body, task_router
from gateway.splice import client_wire
from gateway.state import GatewayState
from gateway.webhooks import Webhooks
from policies.reservation import ReservationBook

if TYPE_CHECKING:
    from gateway.cluster.standby import Standby

log = logging.getLogger("orchgate")

EXPOSED_HEADERS = (
    "x-request-id",
    "x-orchgate-replica",
    "x-orchgate-attempts",
    "retry-after",
    "retry-after-ms",
    "x-backoff-ms",
)
_EXPOSE = ", ".join(EXPOSED_HEADERS).encode()


def _render(error: GatewayError) -> Response[dict[str, Any]]:
    return Response(error.envelope(), status_code=error.status, headers=error.headers)


def _gateway_error_handler(_: Request[Any, Any, Any], exc: GatewayError) -> Response[Any]:
    return _render(exc)


def _http_exception_handler(_: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    status = exc.status_code
    if status == 404:
        return _render(NotFound("Unknown path; see GET /v1/models and the README for routes"))
    if status == 405:
        given = exc.headers or {}
        allow = given.get("Allow") or given.get("allow")
        return _render(
            MethodNotAllowed(
                "method not allowed for this route", headers={"Allow": allow} if allow else None
            )
        )
    if 400 <= status < 500:
        error = InvalidRequest(str(exc.detail))
        response = _render(error)
        response.status_code = status
        return response
    log.error("unhandled HTTP exception %s", status)
    return _render(InternalError("internal gateway error"))


def _unhandled_handler(_: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.exception("unhandled error", exc_info=exc)
    return _render(InternalError("internal gateway error"))


# the task API and the control plane emit no correlation-ID header (Home profile §5); the
# OpenAI surface always does (OpenAI's own header, which the SDKs expose)
_NO_REQUEST_ID = ("/v1/tasks", "/v1/pools", "/v1/config", "/v1/status", "/v1/hardware",
                  "/health", "/metrics", "/status", "/openapi.json")  # fmt: skip


def carries_request_id(path: str) -> bool:
    return not path.startswith(_NO_REQUEST_ID) and path != "/"


async def _ensure_request_id(message: Any, scope: Any) -> None:
    """Every OpenAI-surface response carries ``x-request-id``; the data plane sets its own,
    framework 404/405s for other paths get one here."""
    if message["type"] != "http.response.start" or not carries_request_id(scope["path"]):
        return
    headers = message.setdefault("headers", [])
    for key, _ in headers:
        if key.lower() == b"x-request-id":
            return
    headers.append((b"x-request-id", request_id(scope).encode()))


def _route_handler(proxy: OpenAIProxy, route: Route) -> Any:
    """The raw ASGI handler for one proxied route (used by both entry points)."""

    async def handler(scope: Any, receive: Any, send: Any) -> None:
        await proxy.proxy(route, scope, receive, send)

    return handler


def _openai_routes(proxy: OpenAIProxy) -> list[Any]:
    """The data plane registered with Litestar too: ``GatewayApp`` serves these paths
    directly, but Litestar must know them to answer CORS preflights (OPTIONS)."""

    async def models(scope: Any, receive: Any, send: Any) -> None:
        await proxy.models(scope, receive, send)

    async def upstream(scope: Any, receive: Any, send: Any) -> None:
        await proxy.upstream(scope, receive, send)

    async def native(scope: Any, receive: Any, send: Any) -> None:
        await proxy.native(scope, receive, send)

    # copy_scope=False: the handlers add to the scope on purpose (the header table)
    return [
        *(
            asgi(path=list(r.paths), name=r.endpoint.name.lower(), copy_scope=False)(
                _route_handler(proxy, r)
            )
            for r in ROUTES
        ),
        asgi(path=["/v1/models", "/models"], name="models", copy_scope=False)(models),
        asgi(path="/upstream/{rest:path}", name="upstream", copy_scope=False)(upstream),
        asgi(path=sorted(NATIVE_PATHS), name="native", copy_scope=False)(native),
    ]


def create_app(
    config: Config,
    *,
    config_path: Path | None = None,
    access_log_stream: TextIO | None = None,
) -> GatewayApp:
    """``config_path``: the file ``config`` came from, re-read by reloads (SIGHUP too)."""
    role = _cluster_role(config)
    state = GatewayState(config, admission=_admission(role))
    auth = TokenCheck(config.auth.token, config.auth.admin_token)
    access_log = AccessLog(enabled=config.server.access_log, stream=access_log_stream)
    state.tasks.log = access_log
    proxy = OpenAIProxy(state, auth, access_log)
    webhooks = Webhooks(config.webhooks)
    jobs = JobBook()  # loads, unloads and reloads, all behind GET /v1/jobs/{id}
    reservations = ReservationBook()  # swap locks: pool reloads and catalog unloads alike
    lifecycle = Lifecycle(
        state,
        auth=auth,
        webhooks=webhooks,
        reservations=reservations,
        config_path=config_path,
        jobs=jobs,
    )
    residency = _residency(state, config, webhooks, jobs, reservations)
    standby = _join(role, state, config, lifecycle)

    async def require_token(
        connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler
    ) -> None:
        # async: a sync guard would run in a thread pool on every request
        if connection.scope["path"].startswith("/v1/"):
            auth.check(connection.headers.get("authorization", "").encode() or None)

    async def require_admin(
        connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler
    ) -> None:
        auth.check_admin(connection.headers.get("authorization", "").encode() or None)

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        await state.start()
        # the catalog's owner, then (once this node's pools are up) the race for the lead
        services: list[Service] = [s for s in (residency, standby) if s is not None]
        for service in services:
            await service.start()
        # Everything alive now (modules, Litestar's app, config, adapters) lives as long as
        # the process: out of the collector's sight, a full collection scans only what came
        # after. Measured at 32 concurrent requests: gen-2 pauses of ~28 ms -> the c=32 p99
        # from 30 ms back to 6 ms (bench/, "Performance").
        gc.freeze()
        gc.set_threshold(*_GC_THRESHOLDS)
        try:
            yield
        finally:
            for service in reversed(services):  # the lead first: another node serves now
                await service.aclose()
            await lifecycle.aclose()
            await state.stop()
            await webhooks.aclose()
            access_log.flush()

    openapi_cache: list[tuple[Config, bytes]] = []

    @get("/openapi.json", media_type="application/json")
    async def openapi() -> bytes:
        # model names and pools change with reloads: rebuilt once per running config
        if not openapi_cache or openapi_cache[0][0] is not state.config:
            openapi_cache[:] = [(state.config, msgspec.json.encode(build_openapi(state.config)))]
        return openapi_cache[0][1]

    cors = None
    if config.server.cors.allow_origins:
        cors = CORSConfig(
            allow_origins=config.server.cors.allow_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"],
            allow_credentials=config.server.cors.allow_credentials,
            expose_headers=list(EXPOSED_HEADERS),
            max_age=config.server.cors.max_age_s,
        )

    app = Litestar(
        route_handlers=[
            *_openai_routes(proxy),
            *control_handlers(state, lifecycle, guards=[require_token]),
            *lifecycle_handlers(lifecycle, guards=[require_token], admin=[require_admin]),
            *catalog_handlers(residency, jobs, guards=[require_token], admin=[require_admin]),
            task_router(state, state.tasks, guards=[require_token]),
            openapi,
        ],
        lifespan=[lifespan],
        cors_config=cors,
        before_send=[_ensure_request_id],
        request_max_body_size=config.server.max_body_bytes,
        exception_handlers={
            GatewayError: _gateway_error_handler,
            HTTPException: _http_exception_handler,
            Exception: _unhandled_handler,
        },
        openapi_config=None,  # gateway/openapi.py: the generated one would miss the data plane
        logging_config=None,
        debug=False,
    )
    app.state.gateway = state
    return GatewayApp(
        app,
        proxy,
        state,
        lifecycle,
        cors_origins=config.server.cors.allow_origins,
        guard=RequestGuard(
            bind_host=config.host,
            allowed_hosts=config.server.allowed_hosts,
            cors_origins=config.server.cors.allow_origins,
            max_header_bytes=config.server.max_header_bytes,
            multipart_paths=MULTIPART_PATHS,
        ),
        front_door=protocol_for(
            FrontDoorLimits(
                max_header_bytes=config.server.max_header_bytes,
                max_body_bytes=config.server.max_body_bytes,
                header_timeout_s=config.server.header_timeout_s,
                body_timeout_s=config.server.body_timeout_s,
                max_connections=config.server.max_connections,
            ),
            _front_door_answer,
        ),
        access_log=access_log,
        standby=standby,
    )


class Service(Protocol):
    """What the lifespan starts after the pools and stops before them."""

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...


def _residency(
    state: GatewayState,
    config: Config,
    webhooks: Webhooks,
    jobs: JobBook,
    reservations: ReservationBook,
) -> Residency | None:
    if config.catalog is None:
        return None
    return Residency(
        state,
        config.catalog,
        webhooks=webhooks,
        jobs=jobs,
        hardware=detect(config.hardware),
        reservations=reservations,
    )


def _cluster_role(config: Config) -> Standby | None:
    cluster = config.cluster
    if cluster is None:
        return None
    if cluster.mode == "active":
        from gateway.cluster.active import Active  # only now is the Redis client imported

        return Active(cluster)
    from gateway.cluster.standby import Standby

    return Standby(cluster)


def _admission(role: Standby | None) -> AdmissionFactory:
    """In process, unless every node serves: then one ledger in Redis for all of them."""
    admission = getattr(role, "admission", None)
    return local_admission if admission is None else admission


def _join(
    role: Standby | None, state: GatewayState, config: Config, lifecycle: Lifecycle
) -> Standby | None:
    if role is None:
        return None
    state.cluster = role
    # tasks survive their node: stored in Redis before they are answered
    state.tasks.sink = state.tasks.remote = role.share_tasks(state.tasks, config.tasks.retention_s)
    lifecycle.reservation_store = role.share_reservations(lifecycle.reservations)
    return role


# gen-0 every 7,000 net allocations instead of 700: with 32 requests in flight most of a
# request's objects die before a collection sees them (fewer promoted, less to scan later)
_GC_THRESHOLDS = (7000, 10, 10)
_encoder = msgspec.json.Encoder()
_QUIET_PATHS = frozenset({"/health", "/metrics"})
_MODEL_PREFIXES = ("/v1/models/", "/models/")


def _is_model_action(method: str, path: str) -> bool:
    """``POST /v1/models/{id}/load|unload``: the control plane's, not the model list's."""
    return method == "POST" and path.startswith("/v1/models/") and path.endswith(_MODEL_ACTIONS)


_MODEL_ACTIONS = ("/load", "/unload")


def _front_door_answer(error: GatewayError, path: str) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    headers = [(b"x-request-id", fresh_request_id().encode())] if carries_request_id(path) else []
    return error_body(error, path), headers


def error_body(error: GatewayError, path: str) -> bytes:
    """An error the gateway answers before routing, in the envelope of the surface the
    path belongs to (the task API has its own)."""
    if path.startswith("/v1/tasks"):
        return _encoder.encode(task_error_body(error))
    return _encoder.encode(error.envelope())


class GatewayApp:
    """The ASGI entry point: the OpenAI data plane goes straight to its raw handlers (one
    dict lookup), everything else (control plane, lifespan, CORS preflights, 404s) to
    Litestar. Measured: Litestar's routing, guards and middleware stack cost about a third
    of the gateway's CPU per proxied request (README, "Performance")."""

    def __init__(
        self,
        litestar: Litestar,
        proxy: OpenAIProxy,
        state: GatewayState,
        lifecycle: Lifecycle,
        *,
        cors_origins: list[str],
        guard: RequestGuard,
        front_door: type[FrontDoorProtocol],
        access_log: AccessLog,
        standby: Standby | None = None,
    ) -> None:
        self.litestar = litestar
        self.standby = standby  # [cluster] standby: only the leader serves
        self.access_log = access_log
        self.state = state
        self.lifecycle = lifecycle
        self.guard = guard
        # the HTTP protocol class uvicorn must serve this app with (limits while parsing)
        self.front_door = front_door
        self._cors = {origin.encode() for origin in cors_origins}
        self._cors_any = "*" in cors_origins
        self._hot: dict[str, Any] = {
            path: _route_handler(proxy, route) for path, route in BY_PATH.items()
        }
        self._hot.update(dict.fromkeys(NATIVE_PATHS, proxy.native))
        self._logs_itself = set(self._hot)  # the proxy writes its own, richer lines
        self._upstream = proxy.upstream
        for path in ("/v1/models", "/models"):
            self._hot[path] = proxy.models
        self._model = proxy.models  # also /v1/models/{id}: ids may hold slashes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.litestar(scope, receive, send)
            return
        refused = self.guard.check(scope)
        if refused is None and self.standby is not None:
            refused = self.standby.gate(scope["path"])
        if refused is not None:
            await self._refuse(scope, send, refused)
            return
        path = scope["path"]
        if path in self._logs_itself and scope["method"] != "OPTIONS":  # the data plane
            if self._cors or self._cors_any:
                send = self._with_cors(scope, send)
            await self._hot[path](scope, receive, send)
            return
        if path.startswith(UPSTREAM_PREFIX) and scope["method"] != "OPTIONS":
            if self._cors or self._cors_any:
                send = self._with_cors(scope, send)
            await self._upstream(scope, receive, send)
            return
        if self.access_log.enabled:
            await self._logged(scope, receive, send)
        else:
            await self._route(scope, receive, send)

    async def _route(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["method"] != "OPTIONS":
            path = scope["path"]
            handler = self._hot.get(path)
            if (
                handler is None
                and path.startswith(_MODEL_PREFIXES)
                and not _is_model_action(scope["method"], path)
            ):
                handler = self._model
            if handler is not None:
                if self._cors or self._cors_any:
                    send = self._with_cors(scope, send)
                await handler(scope, receive, send)
                return
        await self.litestar(scope, receive, send)

    async def _logged(self, scope: Any, receive: Any, send: Any) -> None:
        """Every route the proxy does not log itself gets a plain access line; successful
        ``/health`` and ``/metrics`` polls are left out (probes and scrapers would drown
        the log)."""
        started = time.perf_counter()
        status = 500

        async def send_and_watch(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._route(scope, receive, send_and_watch)
        finally:
            if status >= 400 or scope["path"] not in _QUIET_PATHS:
                elapsed_ms = round((time.perf_counter() - started) * 1000, 3)
                self._access_line(scope, status, elapsed_ms, request_id(scope))

    def _access_line(self, scope: Any, status: int, duration_ms: float, rid: str) -> None:
        self.access_log.write(
            AccessRecord(
                ts=time.time(),
                method=scope["method"],
                path=scope["path"],
                status=status,
                duration_ms=duration_ms,
                request_id=rid,
            )
        )

    async def _refuse(self, scope: Any, send: Any, error: GatewayError) -> None:
        rid = request_id(scope)  # one id: the answer's header and the log line agree
        headers = []
        if carries_request_id(scope["path"]):
            headers.append((b"x-request-id", rid.encode()))
        if isinstance(error, HeadersTooLarge):
            headers.append((b"connection", b"close"))
        headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
        body = error_body(error, scope["path"])
        await send_bytes(send, error.status, body, headers)
        if self.access_log.enabled:
            self._access_line(scope, error.status, 0.0, rid)

    def _with_cors(self, scope: Any, send: Any) -> Any:
        origin = header(scope, b"origin")
        if origin is None or not (self._cors_any or origin in self._cors):
            return send
        cors = [
            (b"access-control-allow-origin", origin),
            (b"access-control-expose-headers", _EXPOSE),
            (b"vary", b"Origin"),
        ]
        wire = client_wire(scope)
        if wire is not None:  # the data plane may answer through the wire, past ``send``
            wire.extra_headers = cors
            return send

        async def send_with_cors(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message["headers"], *cors]
            await send(message)

        return send_with_cors
