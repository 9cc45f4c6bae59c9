"""The front door: orchgate's own HTTP/1.1 server protocol, over httptools' parser.

uvicorn still runs the server (listening sockets, the lifespan, signals, the graceful
shutdown that calls ``shutdown()`` on every connection); every connection is this class.
Why not uvicorn's own protocol: on the proxied hot path its per-request cycle (an
``asyncio.Event`` per request, a regex per response header, a keep-alive timer armed and
cancelled per response, two writes for a head and its body) cost about a fifth of the
gateway's CPU per request (README, "Performance"). And it sets no limit of its own on a
request head, has no header or body read timeout, and answers parse errors in plain text.

Per connection, before any application code runs:

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

Every request is an ASGI call (Litestar serves the control plane through it), and its
:class:`Cycle` is also the request's *wire* (``gateway.splice.WIRE_KEY`` in the scope):
the data plane answers through it directly -- a whole answer, or a stream's head and first
event, in one write -- and the stream relay writes chunked frames to its transport from
the upstream connection's callbacks.
"""

from __future__ import annotations

import asyncio
import http
import logging
import urllib.parse
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import httptools
import msgspec

from gateway.errors import (
    BodyTooLarge,
    GatewayError,
    HeadersTooLarge,
    InternalError,
    InvalidRequest,
    RequestTimeout,
    TooManyConnections,
)
from gateway.splice import WIRE_KEY, chunk

log = logging.getLogger("orchgate")

_LINGER_S = 2.0
_HEAD_LATE = "the request head did not arrive in time"
_BODY_STALLED = "the request body stalled"
_LINGER_MAX_BYTES = 1 << 20
_BODY_HIGH_WATER = 64 * 1024  # request body buffered before reading the socket pauses
_ASGI = {"version": "3.0", "spec_version": "2.3"}
_DISCONNECT = {"type": "http.disconnect"}


def _status_line(status: int) -> bytes:
    try:
        phrase = http.HTTPStatus(status).phrase.encode()
    except ValueError:
        phrase = b""
    return b"HTTP/1.1 %d %s\r\n" % (status, phrase)


_STATUS_LINES = {status: _status_line(status) for status in range(100, 600)}

# the answer's body and extra headers for an error and the request path (as far as known)
Render = Callable[[GatewayError, str], tuple[bytes, list[tuple[bytes, bytes]]]]
Headers = list[tuple[bytes, bytes]]


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


class Flow:
    """Write-side flow control of one connection: ``write_paused`` while the client's
    socket buffer is over the transport's high-water mark; ``drain()`` waits it out."""

    __slots__ = ("_drained", "_transport", "read_paused", "write_paused")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self.read_paused = False
        self.write_paused = False
        self._drained: asyncio.Future[None] | None = None

    async def drain(self) -> None:
        if self.write_paused:
            if self._drained is None:
                self._drained = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._drained)

    def pause_reading(self) -> None:
        if not self.read_paused:
            self.read_paused = True
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused:
            self.read_paused = False
            self._transport.resume_reading()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)


class Cycle:
    """One request and its response: the ASGI ``receive``/``send`` pair, and the wire the
    data plane writes to directly (``respond``, ``start_stream``, ``end_stream``)."""

    __slots__ = (
        "_body",
        "_body_size",
        "_chunked",
        "_expect_100",
        "_last_sent",
        "_on_disconnect",
        "_on_done",
        "_remaining",
        "_server",
        "_waiter",
        "body_bytes",
        "disconnected",
        "extra_headers",
        "flow",
        "head_only",
        "keep_alive",
        "more_body",
        "response_complete",
        "response_started",
        "scope",
        "transport",
    )

    def __init__(
        self,
        transport: asyncio.Transport,
        flow: Flow,
        *,
        keep_alive: bool,
        head_only: bool,
        expect_100: bool,
        on_done: Callable[[Cycle], None],
        server_state: Any,
    ) -> None:
        self.scope: dict[str, Any] = {}
        self._server = server_state  # its default headers: the date
        self.transport = transport
        self.flow = flow
        self.keep_alive = keep_alive
        self.head_only = head_only
        self.disconnected = False
        self.response_started = False
        self.response_complete = False
        # headers every response of this request carries (CORS, set by the app)
        self.extra_headers: Headers | None = None
        self.more_body = True
        self.body_bytes = 0  # request body bytes seen (the body deadline's progress)
        self._body: list[bytes] = []
        self._body_size = 0
        self._last_sent = False  # the final http.request message went out
        self._expect_100 = expect_100
        self._waiter: asyncio.Future[None] | None = None
        self._on_done: Callable[[Cycle], None] | None = on_done
        self._on_disconnect: Callable[[], None] | None = None
        self._chunked = False
        self._remaining = 0

    # -- fed by the protocol ---------------------------------------------------------------
    def feed(self, body: bytes) -> bool:
        """A piece of the request body; True when the reader should pause."""
        self.body_bytes += len(body)
        if self.response_complete:
            return False
        self._body.append(body)
        self._body_size += len(body)
        self._wake()
        return self._body_size > _BODY_HIGH_WATER

    def body_complete(self) -> None:
        self.more_body = False
        self._wake()

    def lost(self) -> None:
        if not self.response_complete:
            self.disconnected = True
            callback, self._on_disconnect = self._on_disconnect, None
            if callback is not None:
                callback()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # -- the application's side ----------------------------------------------------------
    def watch(self, on_disconnect: Callable[[], None] | None) -> None:
        """Call ``on_disconnect`` (once) if the client goes away before the response is
        complete: the data plane's cancel signal, with no watcher task. Called at once
        when it is gone already."""
        if on_disconnect is not None and self.disconnected:
            on_disconnect()
            return
        self._on_disconnect = on_disconnect

    async def receive(self) -> dict[str, Any]:
        if self._expect_100:
            self._expect_100 = False
            if not self.response_started and not self.transport.is_closing():
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        while not (self.disconnected or self.response_complete):
            if self._body or (not self.more_body and not self._last_sent):
                break
            self.flow.resume_reading()
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            await waiter
        if self.disconnected or self.response_complete:
            return _DISCONNECT
        chunks, self._body, self._body_size = self._body, [], 0
        self.flow.resume_reading()
        if not self.more_body:
            self._last_sent = True
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return {"type": "http.request", "body": body, "more_body": self.more_body}

    async def send(self, message: dict[str, Any]) -> None:
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected:
            return
        kind = message["type"]
        if not self.response_started:
            if kind != "http.response.start":
                raise RuntimeError(f"expected 'http.response.start', got {kind!r}")
            head = self._head(message["status"], message.get("headers") or (), None)
            self.transport.write(head)
        elif not self.response_complete:
            if kind != "http.response.body":
                raise RuntimeError(f"expected 'http.response.body', got {kind!r}")
            self._body_out(message.get("body", b""), message.get("more_body", False))
        else:
            raise RuntimeError(f"unexpected {kind!r} after the response was complete")

    def respond(self, status: int, headers: Headers, body: bytes) -> None:
        """A whole answer, head and body in one write; ``headers`` carry no framing."""
        if self.disconnected or self.response_started:
            return
        head = self._head(status, headers, len(body))
        self.transport.write(head if self.head_only or not body else head + body)
        self._complete()

    def start_stream(self, status: int, headers: Headers, first: bytes) -> None:
        """A chunked answer's head and its first piece, in one write."""
        if self.disconnected or self.response_started:
            return
        head = self._head(status, headers, None)
        if first and self._chunked:
            head += chunk(first)
        self.transport.write(head)

    def end_stream(self) -> None:
        if not self.disconnected and self.response_started and not self.response_complete:
            self._body_out(b"", False)

    # -- the wire format -----------------------------------------------------------------
    def _head(self, status: int, headers: Any, length: int | None) -> bytes:
        """The status line and headers; decides the framing (``length``: a whole body of
        that size). Refuses a header value holding CR or LF (response splitting)."""
        self._expect_100 = False
        lines = [_STATUS_LINES.get(status) or _status_line(status), *_date_lines(self._server)]
        chunked = self._copy_headers(headers, lines, length)
        if self.extra_headers:
            lines += [b"%s: %s\r\n" % pair for pair in self.extra_headers]
        if length is not None:
            lines.append(b"content-length: %d\r\n" % length)
            self._remaining = 0 if self.head_only else length
        if chunked is None and not self.head_only and status not in (204, 304):
            chunked = True
            lines.append(b"transfer-encoding: chunked\r\n")
        self._chunked = bool(chunked)
        lines.append(b"\r\n")
        head = b"".join(lines)
        if head.count(b"\n") != len(lines) or head.count(b"\r") != len(lines):
            raise RuntimeError("refusing a response header holding CR or LF")
        self.response_started = True
        return head

    def _copy_headers(self, headers: Any, lines: list[bytes], length: int | None) -> bool | None:
        """The application's headers onto ``lines`` (lower-cased), and ``connection:
        close`` when the connection will close; returns whether they frame the body
        chunked (None: they do not say)."""
        chunked: bool | None = None if length is None else False
        close = False
        for name, value in headers:
            lowered = name.lower()
            if lowered == b"content-length":
                if chunked is None:
                    chunked, self._remaining = False, int(value)
                if length is not None:
                    continue  # the whole body's own, added by the caller
            elif lowered == b"transfer-encoding" and value.lower() == b"chunked":
                chunked = True
            elif lowered == b"connection" and b"close" in value.lower():
                self.keep_alive, close = False, True
            lines.append(b"%s: %s\r\n" % (lowered, value))
        if not self.keep_alive and not close:
            lines.append(b"connection: close\r\n")
        return chunked

    def _body_out(self, body: bytes, more: bool) -> None:
        if self.head_only:
            self._remaining = 0
        elif self._chunked:
            if body:
                data = chunk(body)
                self.transport.write(data if more else data + b"0\r\n\r\n")
            elif not more:
                self.transport.write(b"0\r\n\r\n")
        elif body:
            if len(body) > self._remaining:
                raise RuntimeError("response content longer than Content-Length")
            self._remaining -= len(body)
            self.transport.write(body)
        if not more:
            if self._remaining:
                raise RuntimeError("response content shorter than Content-Length")
            self._complete()

    def _complete(self) -> None:
        self.response_complete = True
        self._on_disconnect = None
        self._wake()
        if not self.keep_alive:
            self.transport.close()
        on_done, self._on_done = self._on_done, None
        if on_done is not None:
            on_done(self)

    # -- the request's task ----------------------------------------------------------------
    async def run(self, app: Any, render: Render) -> None:
        try:
            await app(self.scope, self.receive, self.send)
        except asyncio.CancelledError:
            self._abandon(None)  # the server's shutdown backstop: no answer to give
        except BaseException:
            log.exception("unhandled error in the application")
            self._abandon(render)
        else:
            if not self.response_started and not self.disconnected:
                log.error("the application returned without answering")
                self._abandon(render)
            elif not self.response_complete and not self.disconnected:
                log.error("the application returned before its response was complete")
                self.transport.close()
        finally:
            self._on_done = None
            self._on_disconnect = None

    def _abandon(self, render: Render | None) -> None:
        """The application ended without an answer: a 500 envelope (``render``) when
        nothing was sent yet, else the connection is closed (a half-sent response cannot
        be mended)."""
        if self.response_started or self.disconnected or self.transport.is_closing():
            if not self.response_complete:
                self.transport.close()
            return
        if render is None:
            self.transport.close()
            return
        error = InternalError("internal gateway error")
        body, extra = render(error, str(self.scope.get("path", "")))
        self.keep_alive = False
        self.respond(500, [(b"content-type", b"application/json"), *extra], body)


_date_cache: list[Any] = [None, []]  # [a server's default-headers list, its lines]


def _date_lines(server_state: Any) -> list[bytes]:
    """The ``date`` header uvicorn's server refreshes once a second, encoded once per
    refresh."""
    current = server_state.default_headers
    if _date_cache[0] is not current:
        _date_cache[1] = [b"%s: %s\r\n" % pair for pair in current]
        _date_cache[0] = current
    lines: list[bytes] = _date_cache[1]
    return lines


class FrontDoorProtocol(asyncio.Protocol):
    door: ClassVar[_Door] = _Door(FrontDoorLimits(), _default_render)

    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if not config.loaded:
            config.load()
        self.app = config.loaded_app
        self.loop = _loop or asyncio.get_event_loop()
        self.keepalive_s = float(config.timeout_keep_alive)
        self.root_path: str = config.root_path
        self.server_state = server_state
        self.connections: set[Any] = server_state.connections
        self.tasks: set[asyncio.Task[None]] = server_state.tasks
        self.app_state = app_state
        self.parser = httptools.HttpRequestParser(self)
        try:  # answer the first of pipelined requests even when the client half-closed
            self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        except AttributeError:  # httptools < 0.6.3
            pass
        limits = self.door.limits
        self._max_head, self._max_body = limits.max_header_bytes, limits.max_body_bytes
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.flow: Flow = None  # type: ignore[assignment]
        self.server: tuple[str, int] | None = None
        self.client: tuple[str, int] | None = None
        self.scheme = "http"
        self.cycle: Cycle | None = None
        self.pipeline: deque[Cycle] = deque()
        self.url = b""
        self.headers: Headers = []
        self._expect_100 = False
        self._head_bytes = 0
        self._body_mark = 0  # the cycle's body_bytes when the body deadline was armed
        self._in_head = True
        self._in_body = False
        self._rejected = False
        self._lingered = 0
        self._deadline: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_since = 0.0

    # -- connection ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        over = len(self.connections) >= self.door.limits.max_connections
        self.connections.add(self)
        self.transport = transport
        self.flow = Flow(transport)
        self.server = _address(transport.get_extra_info("sockname"))
        self.client = _address(transport.get_extra_info("peername"))
        if transport.get_extra_info("sslcontext") is not None:
            self.scheme = "https"
        if over:
            self._reject(TooManyConnections("too many open connections; retry shortly"))
            return
        self._arm(self.door.limits.header_timeout_s, _HEAD_LATE)

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        self._disarm()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        cycle = self.cycle
        if cycle is not None:
            cycle.lost()
        for queued in self.pipeline:
            queued.lost()
        self.pipeline.clear()
        if self.flow is not None:
            self.flow.resume_writing()  # wakes whoever waits to write

    def eof_received(self) -> bool | None:
        if self._rejected:
            self.transport.close()
        return None

    def pause_writing(self) -> None:
        self.flow.pause_writing()

    def resume_writing(self) -> None:
        self.flow.resume_writing()

    def shutdown(self) -> None:
        """The server is stopping: close an idle connection now, a busy one after its
        response."""
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            self.transport.close()
        else:
            cycle.keep_alive = False

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            self._linger(data)
            return
        if self._in_head:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # no WebSocket or h2c routes: the request was already handed on as plain
            # HTTP/1.1 (uvicorn does the same when it has no WebSocket library)
            return
        except httptools.HttpParserError as exc:
            if not self._rejected:
                self._reject(InvalidRequest(f"malformed HTTP request: {_why(exc)}"))
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
            if self._in_body and self.cycle is not None:
                self._body_mark = self.cycle.body_bytes
                self._arm(self.door.limits.body_timeout_s, _BODY_STALLED)
            elif self._head_bytes:
                self._arm(self.door.limits.header_timeout_s, _HEAD_LATE)

    # -- parser callbacks ----------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self._expect_100 = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self._expect_100 = True
        self.headers.append((name, value))

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
        parser = self.parser
        version = parser.get_http_version()
        method = parser.get_method().decode("ascii")
        cycle = Cycle(
            self.transport,
            self.flow,
            keep_alive=version != "1.0" and parser.should_keep_alive(),
            head_only=method == "HEAD",
            expect_100=self._expect_100,
            on_done=self._response_done,
            server_state=self.server_state,
        )
        cycle.scope = self._scope(method, version, cycle)
        self._in_body = True
        previous = self.cycle
        self.cycle = cycle
        if previous is None or previous.response_complete:
            self._start(cycle)
        else:  # pipelined: it waits for the response before it, reading paused
            self.flow.pause_reading()
            self.pipeline.appendleft(cycle)

    def _scope(self, method: str, version: str, cycle: Cycle) -> dict[str, Any]:
        url = self.url
        if url[:1] == b"/" and b"?" not in url and b"#" not in url:
            raw_path, query = url, b""
        else:
            parsed = httptools.parse_url(url)
            raw_path, query = parsed.path, parsed.query or b""
        path = raw_path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        root = self.root_path
        return {
            "type": "http",
            "asgi": _ASGI,
            "http_version": version,
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,
            "root_path": root,
            "headers": self.headers,
            "state": self.app_state.copy(),
            "method": method,
            "path": root + path if root else path,
            "raw_path": root.encode("ascii") + raw_path if root else raw_path,
            "query_string": query,
            WIRE_KEY: cycle,
        }

    def _start(self, cycle: Cycle) -> None:
        task = self.loop.create_task(cycle.run(self.app, self.door.render))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if self._rejected or cycle is None:
            return
        if cycle.feed(body):
            self.flow.pause_reading()

    def on_message_complete(self) -> None:
        if self._deadline is not None:
            self._disarm()
        self._in_head, self._in_body = True, False
        self._head_bytes = 0
        if not self._rejected and self.cycle is not None:
            self.cycle.body_complete()

    def _response_done(self, cycle: Cycle) -> None:
        """A response went out whole: the next pipelined request, or the idle clock."""
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            self._start(self.pipeline.pop())
            return
        # one idle timer per connection, re-armed only when it fires: a keep-alive
        # connection costs no timer per request
        self._idle_since = self.loop.time()
        if self._idle_timer is None:
            self._idle_timer = self.loop.call_at(self._idle_since + self.keepalive_s, self._idle)

    def _idle(self) -> None:
        self._idle_timer = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        busy = (cycle is not None and not cycle.response_complete) or not self._in_head
        if busy or self._head_bytes:
            return  # a request is running or arriving: its own limits apply
        due = self._idle_since + self.keepalive_s
        if self.loop.time() >= due:
            self.transport.close()
        else:
            self._idle_timer = self.loop.call_at(due, self._idle)

    # -- answers the application never sees ---------------------------------------------
    def _reject(self, error: GatewayError) -> None:
        """Answer ``error`` ourselves, then linger and close."""
        self._rejected = True
        self._disarm()
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        cycle = self.cycle
        if cycle is None or not cycle.response_started:  # a response under way stands
            body, extra = self.door.render(error, self._request_path())
            head = [
                _STATUS_LINES[error.status],
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
        if cycle is not None:
            cycle.keep_alive = False
        try:
            transport.write_eof()
        except (NotImplementedError, OSError, RuntimeError):
            transport.close()
            return
        self.loop.call_later(_LINGER_S, transport.close)

    def _request_path(self) -> str:
        """The path of the request being answered, as far as its head arrived."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and "path" in cycle.scope:
            return str(cycle.scope["path"])
        url = self.url
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
        cycle = self.cycle
        if why is _BODY_STALLED:
            if cycle is not None and cycle.body_bytes != self._body_mark:
                # bytes arrived since it was armed: a slow body, not a stalled one.
                # Checking at each deadline instead of re-arming per read measures the
                # silence to within one period (between body_timeout_s and twice that)
                self._body_mark = cycle.body_bytes
                self._arm(self.door.limits.body_timeout_s, why)
                return
        elif cycle is not None and not cycle.response_complete:
            # a pipelined head waits (reading is paused) while the previous response
            # streams: its clock starts once that response is done
            self._arm(self.door.limits.header_timeout_s, why)
            return
        if cycle is not None:
            cycle.lost()  # the application reading this body learns the client is gone
        self._reject(RequestTimeout(why))


def _why(exc: Exception) -> str:
    cause = exc.__context__ if isinstance(exc, httptools.HttpParserCallbackError) else None
    if isinstance(cause, UnicodeDecodeError):
        return "the request target is not ASCII"
    return str(exc) or type(exc).__name__


def _content_length(headers: Headers) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # httptools refuses a malformed one itself
    return None


def _address(info: Any) -> tuple[str, int] | None:
    if isinstance(info, tuple) and len(info) >= 2:
        return str(info[0]), int(info[1])
    return None


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "-"


def protocol_for(limits: FrontDoorLimits, render: Render) -> type[FrontDoorProtocol]:
    """A protocol class bound to one gateway's limits (uvicorn instantiates it per
    connection)."""
    return type("BoundFrontDoorProtocol", (FrontDoorProtocol,), {"door": _Door(limits, render)})
