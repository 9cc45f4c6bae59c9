"""The HTTP adapter every engine shares: one pooled aiohttp client per replica.

Engines differ only in how they report health and load; sending a request and relaying its
bytes is the same for vLLM, llama.cpp and any OpenAI-compatible server, so it lives here
once. Engine modules subclass :class:`OpenAICompatBackend` and override ``probe``/``load``.

Why aiohttp and not httpx on this path: measured on this machine kind (see README,
"Performance"), httpx 0.28's connection pool caps a proxy at 0.01-0.02x direct throughput
at concurrency 32 (encode/httpx#3215) while aiohttp's client sustains 10x more.

This module is the only place that catches aiohttp's exceptions.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, ClassVar

import aiohttp
import msgspec
from msgspec import Meta

from backends.base import Endpoint, ReplicaInfo, ReplicaLoad, Strict, UpstreamCall
from backends.errors import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    error_from_status,
)

_MAX_ERROR_BODY = 64 * 1024


class HttpReplicaConfig(Strict, tag_field="engine"):
    """Keys every HTTP engine accepts under ``[[pools.replicas]]``."""

    id: Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    url: Annotated[str, Meta(pattern=r"^https?://")]
    slots: Annotated[int, Meta(ge=1, le=4096)] | None = None
    upstream_model: str | None = None
    connect_timeout_s: Annotated[float, Meta(gt=0)] = 5.0
    probe_timeout_s: Annotated[float, Meta(gt=0)] = 2.0


def replica_root(url: str) -> str:
    """The server root: a trailing ``/`` or ``/v1`` is accepted and never doubled."""
    root = url.rstrip("/")
    if root.endswith("/v1"):
        root = root[: -len("/v1")]
    return root


class AiohttpUpstreamResponse:
    """An upstream answer whose headers arrived; see ``backends.base.UpstreamResponse``."""

    __slots__ = ("_response", "content_type", "status")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.content_type = response.headers.get("Content-Type", "application/json")

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for data in self._response.content.iter_any():
                yield data
        except (aiohttp.ClientError, OSError) as exc:
            raise BackendUnavailable(f"upstream connection lost: {exc!r}") from exc

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except (aiohttp.ClientError, OSError) as exc:
            raise BackendUnavailable(f"upstream connection lost: {exc!r}") from exc

    async def aclose(self) -> None:
        # Closing (not releasing) an unfinished response drops the TCP connection: that is
        # the only cancel signal vLLM and llama.cpp understand.
        if self._response.content.at_eof():
            self._response.release()
        else:
            self._response.close()


class OpenAICompatBackend:
    """Any OpenAI-compatible server. Subclasses refine health, load and slot discovery."""

    engine: ClassVar[str] = "openai"
    default_slots: ClassVar[int] = 64
    endpoints: frozenset[Endpoint] = frozenset(Endpoint)

    def __init__(self, config: HttpReplicaConfig, *, api_key: str | None = None) -> None:
        self.config = config
        self.replica_id = config.id
        self.configured_slots = config.slots
        self.root = replica_root(config.url)
        self._urls = {endpoint: self.root + endpoint.value for endpoint in Endpoint}
        self._auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._session: aiohttp.ClientSession | None = None

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=0,  # admission bounds concurrency; a connector cap would queue invisibly
            keepalive_timeout=30,
            enable_cleanup_closed=False,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=self.config.connect_timeout_s
            ),
            headers=self._auth,
            skip_auto_headers=("Accept-Encoding", "User-Agent"),
            auto_decompress=False,
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError(f"replica {self.replica_id} used before start()")
        return self._session

    # -- data plane ------------------------------------------------------------------
    async def send(self, call: UpstreamCall) -> AiohttpUpstreamResponse:
        headers = {"Content-Type": "application/json", "X-Request-Id": call.request_id}
        try:
            response = await self.session.post(
                self._urls[call.endpoint], data=call.body, headers=headers
            )
        except asyncio.TimeoutError as exc:
            raise self._tag(BackendTimeout("upstream connect timed out")) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise self._tag(BackendUnavailable(f"upstream unreachable: {exc!r}")) from exc
        if response.status >= 400:
            try:
                raw = await response.content.read(_MAX_ERROR_BODY)
            except (aiohttp.ClientError, OSError):
                raw = b""
            finally:
                response.close()
            raise error_from_status(
                response.status,
                raw,
                replica_id=self.replica_id,
                engine=self.engine,
                retry_after=response.headers.get("Retry-After"),
            )
        return AiohttpUpstreamResponse(response)

    def _tag(self, error: BackendError) -> BackendError:
        error.replica_id = self.replica_id
        error.engine = self.engine
        return error

    # -- control plane ---------------------------------------------------------------
    async def get(self, path: str) -> tuple[int, bytes]:
        """A short GET with the probe timeout; raises ``BackendUnavailable`` when down."""
        timeout = aiohttp.ClientTimeout(total=self.config.probe_timeout_s)
        try:
            async with self.session.get(self.root + path, timeout=timeout) as response:
                return response.status, await response.read()
        except asyncio.TimeoutError as exc:
            raise self._tag(BackendTimeout(f"GET {path} timed out")) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise self._tag(BackendUnavailable(f"GET {path} failed: {exc!r}")) from exc

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
