"""The backend contract: what admission, placement, health and the relay need from an engine.

Every engine adapter (``llamacpp``, ``vllm``, ``openai``) implements :class:`Backend`. The
contract is deliberately small; anything engine-specific stays inside its adapter module.
This module holds types only and must not perform I/O.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import msgspec


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Strict(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Base for config and wire structs: unknown keys are errors, values immutable after load."""


class Endpoint(enum.StrEnum):
    """The routes a replica may serve; the value is the path under the replica root, unless
    the adapter maps it elsewhere (``Backend.paths``: the un-prefixed routes)."""

    CHAT = "/v1/chat/completions"
    COMPLETIONS = "/v1/completions"
    EMBEDDINGS = "/v1/embeddings"
    RESPONSES = "/v1/responses"
    MESSAGES = "/v1/messages"  # Anthropic
    COUNT_TOKENS = "/v1/messages/count_tokens"  # Anthropic
    RERANK = "/v1/rerank"
    TOKENIZE = "/tokenize"
    DETOKENIZE = "/detokenize"
    TRANSCRIPTIONS = "/v1/audio/transcriptions"  # multipart in, JSON or text out
    SPEECH = "/v1/audio/speech"  # JSON in, audio bytes out
    # the un-prefixed /completions and /embeddings: llama-server's own handlers there,
    # the /v1 routes on every other engine
    BARE_COMPLETIONS = "/completions"
    BARE_EMBEDDINGS = "/embeddings"
    # an engine-native route reached through /upstream/{model}/... (UpstreamCall.path)
    NATIVE = "/upstream"
    # the bounded jobs of the OpenVINO worker contract (engine ``openvino`` only)
    WORKER_GENERATE = "/v1/worker/generate"
    WORKER_MEMORY = "/v1/worker/extract-memory-candidates"
    WORKER_NOTIFICATION = "/v1/worker/condense-notification"


# what an OpenAI-compatible server serves, short of the engine-specific routes
OPENAI_ENDPOINTS = frozenset(
    {
        Endpoint.CHAT,
        Endpoint.COMPLETIONS,
        Endpoint.EMBEDDINGS,
        Endpoint.RESPONSES,
        Endpoint.TRANSCRIPTIONS,
        Endpoint.SPEECH,
        Endpoint.BARE_COMPLETIONS,
        Endpoint.BARE_EMBEDDINGS,
    }
)
WORKER_ENDPOINTS = frozenset(
    {Endpoint.WORKER_GENERATE, Endpoint.WORKER_MEMORY, Endpoint.WORKER_NOTIFICATION}
)
# how the un-prefixed routes are meant on an OpenAI-compatible server
BARE_TO_V1 = {
    Endpoint.BARE_COMPLETIONS: Endpoint.COMPLETIONS.value,
    Endpoint.BARE_EMBEDDINGS: Endpoint.EMBEDDINGS.value,
}


class UpstreamCall(msgspec.Struct, frozen=True):
    """One request to send to a replica.

    ``body`` is the client's JSON forwarded byte for byte, except that ``model`` is patched
    when the client used an alias the replica does not know.
    """

    endpoint: Endpoint
    body: bytes
    stream: bool
    request_id: str
    # the gateway added ``stream_options.include_usage`` for its own token accounting: the
    # usage-only chunk is not relayed to the client
    hide_usage: bool = False
    # the client's own content type when it is not JSON (multipart audio uploads)
    content_type: bytes | None = None
    # Endpoint.NATIVE only: the engine route, one of the adapter's ``native_routes``
    path: str | None = None


class Limits(msgspec.Struct, frozen=True):
    """How long a call may take, enforced by the transport (``None``: no limit).

    ``first_byte_s`` bounds the silence from sending to the first byte of the body (streams;
    a non-streaming answer arrives whole at the end, so only the deadline applies to it),
    ``idle_s`` every silence after that, ``deadline`` the whole exchange (event-loop time).
    """

    first_byte_s: float | None = None
    idle_s: float | None = None
    deadline: float | None = None


NO_LIMITS = Limits()


class ReplicaLoad(msgspec.Struct, frozen=True):
    """A replica's own view of its load, for placement and the pool health endpoint."""

    running: int
    waiting: int
    total_slots: int | None


class ModelFacts(msgspec.Struct, frozen=True):
    """What an engine says about the model it serves, for ``GET /v1/models``."""

    context_length: int | None = None  # tokens one request may hold (llama.cpp: per slot)
    capabilities: tuple[str, ...] | None = None  # None: the engine does not say


class ReplicaInfo(msgspec.Struct, frozen=True):
    """What a successful health probe learned about the engine."""

    ready: bool
    total_slots: int | None = None
    engine_version: str | None = None
    detail: str | None = None
    # accelerator facts the engine reports itself (the NPU worker: device, busy time)
    accelerator: dict[str, Any] | None = None
    model: ModelFacts | None = None


class UpstreamResponse(Protocol):
    """A response whose status and headers have arrived; the body is still on the wire.

    The caller owns it and must call :meth:`aclose` exactly once, on every path: that is
    what closes the upstream connection when a client walks away, so the engine frees
    its slot.
    """

    status: int
    content_type: str

    async def next_chunk(self) -> bytes | None:
        """Raw body bytes that arrived since the last call (no re-chunking, no buffering),
        waiting for some; None at the end. No generator to leave suspended."""
        ...

    def pipe(self, on_data: Callable[[bytes], None], on_end: Callable[[Any], None]) -> bool:
        """Hand the rest of the body to callbacks as it arrives, from the connection's own
        callbacks (no task switch per piece); ``on_end`` gets the ``BackendError`` that
        ended it, or None. False: this response can only be pulled (``next_chunk``)."""
        ...

    def hold(self) -> None:
        """A piped consumer that cannot keep up: stop reading until ``release``."""
        ...

    def release(self) -> None: ...

    async def read(self) -> bytes:
        """The whole body (non-streaming responses)."""
        ...

    async def aclose(self) -> None: ...


class Backend(Protocol):
    """One replica of one engine, with its own pooled HTTP client."""

    engine: ClassVar[str]
    replica_id: str
    launch_argv: list[str] | None
    endpoints: frozenset[Endpoint]  # what this replica serves (config ``endpoints``)
    # engine routes /upstream/{model}/... may reach, each with how: "post" (a request
    # with the gateway token), "get" (a read with the gateway token) or "admin-get"
    # (introspection: the admin token)
    native_routes: ClassVar[dict[str, str]]
    # endpoints whose answers are the engine's own shape, relayed as they come (no OpenAI
    # stream rules: no [DONE] to expect, no usage to read)
    native_endpoints: ClassVar[frozenset[Endpoint]]
    configured_slots: int | None
    gpu_device: int | None  # NVML index, when the replica runs on a known NVIDIA GPU
    default_slots: ClassVar[int]

    async def start(self) -> None:
        """Open the pooled client. Must not fail when the engine is still down."""
        ...

    async def aclose(self) -> None: ...

    def interrupt(self, reason: str) -> None:
        """End every call in flight now (graceful shutdown's last step); they fail with
        ``BackendInterrupted``. The replica stays usable."""
        ...

    async def probe(self) -> ReplicaInfo:
        """One probe of the engine's own health route; raises ``BackendError`` when down."""
        ...

    async def load(self) -> ReplicaLoad:
        """The engine's own running/waiting counts, where it exposes them."""
        ...

    async def get(self, path: str) -> tuple[int, bytes]:
        """A short GET of an engine route (probes, ``/upstream`` introspection)."""
        ...

    async def send(self, call: UpstreamCall, limits: Limits = NO_LIMITS) -> UpstreamResponse:
        """Send ``call``; return once status and headers arrived.

        A non-2xx answer is raised as a ``BackendError`` carrying the normalised error
        body; connection failures are raised as ``BackendUnavailable``, a broken ``limits``
        as ``BackendTimeout`` (also from the response's ``next_chunk()``/``read()``).
        """
        ...
