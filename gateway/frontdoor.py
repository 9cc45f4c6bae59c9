"""The front door: HTTP/1.1 parsing with limits enforced while bytes arrive.

uvicorn's httptools protocol sets no limit of its own on a request head (httptools keeps
concatenating an unfinished header for as long as a client sends it), has no header or
body read timeout, and answers parse errors in plain text. This subclass adds, per
connection and before any application code runs:

* the request head capped at ``server.max_header_bytes`` as it arrives: 431 and close;
* a header-read deadline (the whole head, from its first byte or the connection's start)
  and a body-read deadline (silence inside a body, checked once per period: a stall is
  caught between ``body_timeout_s`` and twice that): 408 and close;
* a cap on open connections: the next one gets 503 and is closed;
* ``Content-Length`` over ``server.max_body_bytes``: 413 before the body is read;
* every such answer, and a malformed request (400), in the OpenAI error envelope (the
  task API's own under ``/v1/tasks``).

After such an answer the connection lingers briefly, reading and discarding what the
client still sends, so the client reads the answer instead of a connection reset.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import httptools
import msgspec
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.errors import (
    BodyTooLarge,
    GatewayError,
    HeadersTooLarge,
    InvalidRequest,
    RequestTimeout,
    TooManyConnections,
)
from gateway.splice import WIRE_KEY, ClientWire

log = logging.getLogger("orchgate")

_LINGER_S = 2.0
_HEAD_LATE = "the request head did not arrive in time"
_BODY_STALLED = "the request body stalled"
_LINGER_MAX_BYTES = 1 << 20
_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 413: b"Content Too Large",
            431: b"Request Header Fields Too Large", 503: b"Service Unavailable"}  # fmt: skip

# the answer's body and extra headers for an error and the request path (as far as known)
Render = Callable[[GatewayError, str], tuple[bytes, list[tuple[bytes, bytes]]]]


class FrontDoorLimits(msgspec.Struct, frozen=True):
    max_header_bytes: int = 64 * 1024
    max_body_bytes: int = 10 * 1024 * 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 4096


def _default_render(error: GatewayError, path: str) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    return msgspec.json.encode(error.envelope()), []


@dataclass(frozen=True)
class _Door:
    limits: FrontDoorLimits
    render: Render


class CorkableTransport:
    """The connection's transport as uvicorn writes to it, with a cork: while corked,
    writes are held and leave together on ``uncork`` (a response's head and body in one
    system call). Uncorked it passes every write straight on; anything else is the
    transport's own, after what is held."""

    __slots__ = ("_held", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._held: list[bytes] | None = None

    def cork(self) -> None:
        if self._held is None:
            self._held = []

    def uncork(self) -> None:
        held, self._held = self._held, None
        if held:
            self._transport.write(held[0] if len(held) == 1 else b"".join(held))

    def write(self, data: bytes) -> None:
        held = self._held
        if held is None:
            self._transport.write(data)
        else:
            held.append(data)

    def close(self) -> None:
        self.uncork()
        self._transport.close()

    def write_eof(self) -> None:
        self.uncork()
        self._transport.write_eof()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:  # get_extra_info, pause_reading, abort, ...
        return getattr(self._transport, name)


class FrontDoorProtocol(HttpToolsProtocol):
    door: ClassVar[_Door] = _Door(FrontDoorLimits(), _default_render)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        limits = self.door.limits
        self._max_head, self._max_body = limits.max_header_bytes, limits.max_body_bytes
        self._head_bytes = 0
        self._body_bytes = 0
        self._body_mark = 0  # _body_bytes when the body deadline was armed
        self._in_head = True
        self._in_body = False
        self._rejected = False
        self._lingered = 0
        self._deadline: asyncio.TimerHandle | None = None

    # -- connection ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        over = len(self.connections) >= self.door.limits.max_connections
        super().connection_made(transport)
        corked = CorkableTransport(transport)
        self.transport = corked  # type: ignore[assignment]  # uvicorn's responses write here
        self._wire = ClientWire(transport, self.flow, corked)  # gateway.splice, asgi.send_bytes
        if over:
            self._reject(TooManyConnections("too many open connections; retry shortly"))
            return
        self._arm(self.door.limits.header_timeout_s, _HEAD_LATE)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def eof_received(self) -> bool | None:  # type: ignore[override]
        if self._rejected:
            self.transport.close()
        return None

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            self._linger(data)
            return
        if self.timeout_keep_alive_task is not None:
            self._unset_keepalive_if_required()
        if self._in_head:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if not self._rejected:
                self._reject(InvalidRequest("malformed HTTP request"))
            return
        except httptools.HttpParserUpgrade:
            # no WebSocket or h2c routes: the request was already handed on as plain
            # HTTP/1.1 (uvicorn does the same when it has no WebSocket library)
            return
        if not self._rejected and (self._in_body or self._in_head):
            self._check_incomplete()

    def _linger(self, data: bytes) -> None:
        """After our own answer: read and drop, so it is not lost to a reset."""
        self._lingered += len(data)
        if self._lingered > _LINGER_MAX_BYTES:
            self.transport.close()

    def _check_incomplete(self) -> None:
        """A request still incomplete after a read: cap its head, and arm its deadline (the
        common request arrives whole in one read and never costs a timer)."""
        if self._in_head and self._head_bytes > self._max_head:
            limit = self._max_head
            self._reject(HeadersTooLarge(f"the request head exceeds the {limit}-byte limit"))
        elif self._deadline is None:
            if self._in_body:
                self._body_mark = self._body_bytes
                self._arm(self.door.limits.body_timeout_s, _BODY_STALLED)
            elif self._head_bytes:
                self._arm(self.door.limits.header_timeout_s, _HEAD_LATE)

    # -- parser callbacks ----------------------------------------------------------------
    def on_headers_complete(self) -> None:
        if self._rejected:
            return
        self._in_head = False
        if self._deadline is not None:
            self._disarm()
        declared = _content_length(self.headers)
        if declared is not None and declared > self._max_body:
            self._reject(
                BodyTooLarge(
                    f"request body of {declared} bytes exceeds the {self._max_body}-byte limit"
                )
            )
            return
        super().on_headers_complete()
        self.scope[WIRE_KEY] = self._wire  # type: ignore[literal-required]
        self._in_body = True

    def on_body(self, body: bytes) -> None:
        if self._rejected:
            return
        self._body_bytes += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        if self._deadline is not None:
            self._disarm()
        self._in_head, self._in_body = True, False
        self._head_bytes = self._body_bytes = 0
        if not self._rejected:
            super().on_message_complete()

    # -- answers the application never sees ---------------------------------------------
    def send_400_response(self, msg: str) -> None:
        self._reject(InvalidRequest(f"malformed HTTP request: {msg}"))

    def _reject(self, error: GatewayError) -> None:
        """Answer ``error`` ourselves, then linger and close."""
        self._rejected = True
        self._disarm()
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        started = self.cycle is not None and self.cycle.response_started
        if not started:  # a response already under way cannot be answered over
            body, extra = self.door.render(error, self._request_path())
            head = [
                b"HTTP/1.1 %d %s\r\n" % (error.status, _REASONS.get(error.status, b"Error")),
                b"content-type: application/json\r\n",
                b"content-length: %d\r\n" % len(body),
                b"connection: close\r\n",
                *(b"%s: %s\r\n" % pair for pair in extra),
            ]
            head += [
                b"%s: %s\r\n" % (k.lower().encode(), v.encode()) for k, v in error.headers.items()
            ]
            transport.write(b"".join(head) + b"\r\n" + body)
        log.info(
            "front door: %d %s", error.status, error.code, extra={"client": _peer(self.client)}
        )
        if self.cycle is not None:
            self.cycle.keep_alive = False
        try:
            transport.write_eof()
        except (NotImplementedError, OSError, RuntimeError):
            transport.close()
            return
        self.loop.call_later(_LINGER_S, transport.close)

    def _request_path(self) -> str:
        """The path of the request being answered, as far as its head arrived."""
        if self.scope is not None and "path" in self.scope:
            return str(self.scope["path"])
        url = getattr(self, "url", b"")
        return url.split(b"?", 1)[0].decode("latin-1") if url else ""

    def _arm(self, seconds: float, why: str) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expired, why)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self, why: str) -> None:
        self._deadline = None
        if self.transport is None or self.transport.is_closing():
            return
        if why is _BODY_STALLED:
            if self._body_bytes != self._body_mark:
                # bytes arrived since it was armed: a slow body, not a stalled one.
                # Checking at each deadline instead of re-arming per read measures the
                # silence to within one period (between body_timeout_s and twice that)
                self._body_mark = self._body_bytes
                self._arm(self.door.limits.body_timeout_s, why)
                return
        elif self.cycle is not None and not self.cycle.response_complete:
            # a pipelined head waits (reading is paused) while the previous response
            # streams: its clock starts once that response is done
            self._arm(self.door.limits.header_timeout_s, why)
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # the application is reading this body: tell it the client is gone
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self._reject(RequestTimeout(why))


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # httptools refuses a malformed one itself
    return None


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "-"


def protocol_for(limits: FrontDoorLimits, render: Render) -> type[FrontDoorProtocol]:
    """A protocol class bound to one gateway's limits (uvicorn instantiates it per
    connection)."""
    return type("BoundFrontDoorProtocol", (FrontDoorProtocol,), {"door": _Door(limits, render)})
