"""The HTTP adapter every engine shares: one pooled upstream client per replica.

Engines differ only in how they report health and load; sending a request and relaying its
bytes is the same for vLLM, llama.cpp and any OpenAI-compatible server, so it lives here
once. Engine modules subclass :class:`OpenAICompatBackend` and override ``probe``/``load``.

This module is the only place that turns transport exceptions into ``BackendError``.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Annotated, Any, ClassVar

import msgspec
from msgspec import Meta

from backends.base import (
    BARE_TO_V1,
    NO_LIMITS,
    OPENAI_ENDPOINTS,
    Endpoint,
    Limits,
    ReplicaInfo,
    ReplicaLoad,
    Strict,
    UpstreamCall,
)
from backends.errors import (
    BackendError,
    BackendFailed,
    BackendInterrupted,
    BackendTimeout,
    BackendUnavailable,
    error_from_status,
)
from backends.http1 import Http1Pool, Http1Response, Interrupted, UpstreamClosed

_MAX_ERROR_BODY = 64 * 1024


class HttpReplicaConfig(Strict, tag_field="engine", frozen=True):
    """Keys every HTTP engine accepts under ``[[pools.replicas]]``."""

    id: Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+\Z")]
    url: Annotated[str, Meta(pattern=r"^https?://")]
    slots: Annotated[int, Meta(ge=1, le=4096)] | None = None
    upstream_model: str | None = None
    connect_timeout_s: Annotated[float, Meta(gt=0)] = 5.0
    probe_timeout_s: Annotated[float, Meta(gt=0)] = 2.0
    # managed replica: the gateway runs this argv ({port}, {host}, {model}, {python}
    # are substituted), restarts it when it dies and stops it on shutdown
    launch: Annotated[list[str], Meta(min_length=1)] | None = None
    model_path: str | None = None
    # NVIDIA GPU index (as nvidia-smi numbers them) this replica runs on: telemetry and
    # placement read its utilisation and VRAM through NVML
    gpu_device: Annotated[int, Meta(ge=0)] | None = None
    # the routes this replica serves, as paths ("/v1/rerank"); default: what its engine
    # serves (an engine built without a feature, or an upstream that offers less)
    endpoints: Annotated[list[Endpoint], Meta(min_length=1)] | None = None


def _transport_error(exc: OSError, *, lost: str) -> BackendError:
    """A transport failure of ``backends.http1`` in the gateway's error taxonomy; ``lost``
    words a refused or dropped connection."""
    if isinstance(exc, TimeoutError):  # a limit ran out (UpstreamTimeout) or connect did
        return BackendTimeout(str(exc) or "upstream timed out")
    if isinstance(exc, Interrupted):
        return BackendInterrupted(str(exc))
    return BackendUnavailable(f"{lost}: {exc}")


def replica_root(url: str) -> str:
    """The server root: a trailing ``/`` or ``/v1`` is accepted and never doubled."""
    root = url.rstrip("/")
    if root.endswith("/v1"):
        root = root[: -len("/v1")]
    return root


class UpstreamStream:
    """``backends.base.UpstreamResponse`` over an ``Http1Response``, with transport errors
    mapped by ``_transport_error`` (timeout, interrupted, connection lost)."""

    __slots__ = ("_response", "content_type", "status")

    def __init__(self, response: Http1Response) -> None:
        self._response = response
        self.status = response.status
        self.content_type = response.content_type

    async def next_chunk(self) -> bytes | None:
        try:
            return await self._response.next_chunk()
        except OSError as exc:
            raise _transport_error(exc, lost="upstream connection lost") from exc

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except OSError as exc:
            raise _transport_error(exc, lost="upstream connection lost") from exc

    def pipe(self, on_data: Callable[[bytes], None], on_end: Callable[[Any], None]) -> bool:
        def ended(error: BaseException | None) -> None:
            if isinstance(error, OSError):
                on_end(_transport_error(error, lost="upstream connection lost"))
            else:
                on_end(error)

        self._response.pipe(on_data, ended)
        return True

    def hold(self) -> None:
        self._response.hold()

    def release(self) -> None:
        self._response.release()

    async def aclose(self) -> None:
        await self._response.aclose()


class OpenAICompatBackend:
    """Any OpenAI-compatible server. Subclasses refine health, load and slot discovery."""

    engine: ClassVar[str] = "openai"
    default_slots: ClassVar[int] = 64
    served: ClassVar[frozenset[Endpoint]] = OPENAI_ENDPOINTS  # the engine's, by default
    paths: ClassVar[dict[Endpoint, str]] = BARE_TO_V1  # endpoints served at another path
    native_routes: ClassVar[dict[str, str]] = {}
    native_endpoints: ClassVar[frozenset[Endpoint]] = frozenset()

    def __init__(self, config: HttpReplicaConfig, *, api_key: str | None = None) -> None:
        self.config = config
        self.replica_id = config.id
        self.endpoints = frozenset(config.endpoints) if config.endpoints else self.served
        if self.native_routes:
            self.endpoints |= {Endpoint.NATIVE}
        self._paths = {
            endpoint: self.paths.get(endpoint, endpoint.value).encode() for endpoint in Endpoint
        }
        self.configured_slots = config.slots
        self.gpu_device = config.gpu_device
        self.root = replica_root(config.url)
        base_path = self.root.split("://", 1)[1].partition("/")[2]
        self._prefix = ("/" + base_path if base_path else "").encode()
        self._auth = f"Authorization: Bearer {api_key}\r\n".encode() if api_key else b""
        self._pool: Http1Pool | None = None
        self.launch_argv = self._launch_argv(config)

    def _launch_argv(self, config: HttpReplicaConfig) -> list[str] | None:
        if config.launch is None:
            return None
        host_port = self.root.split("://", 1)[1].split("/", 1)[0]
        host, _, port = host_port.rpartition(":")
        values = {
            "port": port or "80",
            "host": host or host_port,
            "model": config.model_path or "",
            "python": sys.executable,
        }
        return [arg.format_map(values) for arg in config.launch]

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        self._pool = Http1Pool(self.root, connect_timeout_s=self.config.connect_timeout_s)

    def interrupt(self, reason: str) -> None:
        if self._pool is not None:
            self._pool.interrupt(reason)

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()
            self._pool = None

    @property
    def pool(self) -> Http1Pool:
        if self._pool is None:
            raise RuntimeError(f"replica {self.replica_id} used before start()")
        return self._pool

    def _tag(self, error: BackendError) -> BackendError:
        error.replica_id = self.replica_id
        error.engine = self.engine
        return error

    async def _request(self, request: bytes, limits: Limits = NO_LIMITS) -> Http1Response:
        try:
            return await self.pool.request(request, limits)
        except UpstreamClosed as exc:  # connected, then dropped: alive but failing
            raise self._tag(BackendFailed(f"upstream dropped the request: {exc}")) from exc
        except OSError as exc:
            raise self._tag(_transport_error(exc, lost="upstream unreachable")) from exc

    # -- data plane ------------------------------------------------------------------
    async def send(self, call: UpstreamCall, limits: Limits = NO_LIMITS) -> UpstreamStream:
        headers = b"".join(
            (
                b"Content-Type: ",
                call.content_type or b"application/json",
                b"\r\nX-Request-Id: ",
                call.request_id.encode(),
                b"\r\n",
                self._auth,
            )
        )
        path = self._paths[call.endpoint] if call.path is None else call.path.encode()
        request = self.pool.build(b"POST", self._prefix + path, headers, call.body)
        response = await self._request(request, limits)
        if response.status >= 400:
            try:
                async with asyncio.timeout(self.config.probe_timeout_s):
                    raw = await response.read()
            except (ConnectionError, OSError, TimeoutError):
                raw = b""
            finally:
                await response.aclose()
            raise error_from_status(
                response.status,
                raw[:_MAX_ERROR_BODY],
                replica_id=self.replica_id,
                engine=self.engine,
                retry_after=response.retry_after,
            )
        return UpstreamStream(response)

    # -- control plane ---------------------------------------------------------------
    async def get(self, path: str) -> tuple[int, bytes]:
        """A short GET with the probe timeout; raises ``BackendUnavailable`` when down."""
        request = self.pool.build(b"GET", self._prefix + path.encode(), self._auth)
        timeout = self.config.probe_timeout_s
        # the transport enforces the deadline itself; the timeout below is the backstop
        # (asyncio.timeout: wait_for can lose a caller's cancellation on 3.11, cpython#86296)
        limits = Limits(deadline=asyncio.get_running_loop().time() + timeout)

        async def run() -> tuple[int, bytes]:
            response = await self._request(request, limits)
            try:
                return response.status, await response.read()
            finally:
                await response.aclose()

        try:
            async with asyncio.timeout(timeout + 1.0):
                return await run()
        except TimeoutError as exc:
            raise self._tag(BackendTimeout(f"GET {path} timed out")) from exc
        except (ConnectionError, OSError) as exc:
            raise self._tag(BackendUnavailable(f"GET {path} failed: {exc}")) from exc

    async def probe(self) -> ReplicaInfo:
        status, _ = await self.get("/v1/models")
        return ReplicaInfo(ready=status == 200, detail=None if status == 200 else f"HTTP {status}")

    async def load(self) -> ReplicaLoad:
        return ReplicaLoad(running=0, waiting=0, total_slots=self.configured_slots)


_decoder = msgspec.json.Decoder()


def decode_json(raw: bytes) -> object:
    """Decode a small control-plane JSON body; ``None`` when it is not JSON."""
    try:
        return _decoder.decode(raw)
    except msgspec.DecodeError:
        return None
