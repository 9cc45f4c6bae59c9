"""A lean HTTP/1.1 client for upstream replicas: asyncio protocols + httptools' parser.

Why not a general-purpose client: on this machine kind a proxied request spent about half of
the gateway's CPU inside aiohttp's ``ClientSession._request`` and httpx is slower still
(README, "Performance"). A gateway talks to a handful of known upstreams with one request
shape, so the client only needs: a keep-alive pool per replica, one write per request,
body bytes delivered as they arrive (chunked or Content-Length), back-pressure, and a
connection that is *closed* (not returned to the pool) when a caller abandons a response --
the only cancel signal vLLM and llama.cpp understand.

Each response can carry limits (``backends.base.Limits``): the longest silence before the
first body byte, between body bytes, and an absolute deadline. One sweeper per pool checks
every limited response on a tick of a tenth of the shortest limit (10 ms .. 1 s), so a
limit fires at most 10 % late and a request costs a set insertion, not a timer: a
``call_at`` + ``cancel`` per response cost 7 % of the gateway's non-stream throughput.
Silence only counts while the gateway is actually waiting for the upstream (a slow client
that stops reading pauses the upstream, which is not the upstream's fault).

Errors surface as ``ConnectionError``/``TimeoutError``; ``backends.openai_compat`` maps
them to ``BackendError``.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable
from urllib.parse import urlsplit

import httptools

from backends.base import NO_LIMITS, Limits

_HIGH_WATER = 256 * 1024  # pause reading the upstream when this much is unconsumed
_LOW_WATER = 64 * 1024
_MIN_TICK_S = 0.01  # the limits' sweeper: a tenth of the shortest limit, within these
_MAX_TICK_S = 1.0


class UpstreamClosed(ConnectionError):
    """The upstream closed the connection before the response was complete."""


class Interrupted(ConnectionError):
    """The gateway cut the exchange itself (``Http1Pool.interrupt``: shutdown)."""


class UpstreamTimeout(TimeoutError):
    """A limit ran out. ``phase``: ``connect``, ``first_byte``, ``idle`` or ``total``."""

    def __init__(self, phase: str, message: str) -> None:
        super().__init__(message)
        self.phase = phase


class Http1Response:
    """One response: status and headers have arrived; the body is still streaming in."""

    __slots__ = (
        "_body_started",
        "_buffered",
        "_chunks",
        "_conn",
        "_done",
        "_error",
        "_headers_waiter",
        "_held",
        "_last_data",
        "_limits",
        "_on_data",
        "_on_end",
        "_pending",
        "_wait_since",
        "_waiter",
        "content_type",
        "framed",
        "keep_alive",
        "received",
        "retry_after",
        "status",
    )

    def __init__(self, conn: Http1Connection, limits: Limits) -> None:
        self._conn = conn
        self.status = 0
        self.content_type = "application/json"
        self.retry_after: str | None = None
        self.keep_alive = True
        # Content-Length or chunked; without either, the body ends when the upstream
        # closes the connection (RFC 9112 6.3), which is then a normal end, not a failure
        self.framed = False
        self.received = False
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._done = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._headers_waiter: asyncio.Future[None] = conn.loop.create_future()
        self._limits = limits
        self._body_started = False
        # pipe(): the body goes to these from the connection's callbacks instead
        self._on_data: Callable[[bytes], None] | None = None
        self._on_end: Callable[[BaseException | None], None] | None = None
        self._held = False  # piped, and paused because the consumer cannot keep up
        # piped: the body pieces of the read being parsed, handed over in one call after it
        # (a read holding several chunks -- several events -- becomes one write downstream)
        self._pending: list[bytes] | None = None
        self._last_data = self._wait_since = 0.0
        if limits is not NO_LIMITS:
            self._last_data = self._wait_since = conn.loop.time()
            conn.pool._watch(self)

    # -- limits ----------------------------------------------------------------------------
    def _overdue(self, now: float) -> UpstreamTimeout | None:
        """The limit that ran out by ``now``, if any (called by the pool's sweeper)."""
        limits = self._limits
        if limits.deadline is not None and now >= limits.deadline:
            return UpstreamTimeout("total", "the request ran past its total deadline")
        waiting = (
            self._waiter is not None
            or (self._on_data is not None and not self._held)
            or not self._headers_waiter.done()
        )
        gap = limits.idle_s if self._body_started else limits.first_byte_s
        if waiting and gap is not None and now - max(self._last_data, self._wait_since) >= gap:
            if self._body_started:
                return UpstreamTimeout("idle", f"the upstream sent nothing for {gap:g}s")
            return UpstreamTimeout("first_byte", f"no first token from the upstream in {gap:g}s")
        return None

    # -- fed by the connection (protocol callbacks) ------------------------------------
    def _headers_complete(self) -> None:
        if not self._headers_waiter.done():
            self._headers_waiter.set_result(None)

    def _feed(self, data: bytes) -> None:
        if self._on_data is not None:  # piped: handed over once the read is parsed
            pending = self._pending
            if pending is None:
                self._pending = [data]
            else:
                pending.append(data)
            return
        if self._limits is not NO_LIMITS:
            self._last_data = self._conn.loop.time()
            self._body_started = True  # from now on the idle limit replaces the first-byte one
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > _HIGH_WATER:
            self._conn.pause()
        self._wake()

    def _finish(self) -> None:
        self._done = True
        self._conn.pool._unwatch(self)
        self._wake()
        self._ended(None)

    def _fail(self, error: BaseException) -> None:
        if self._done or self._error is not None:
            return
        self._conn.pool._unwatch(self)
        self._error = error
        if not self._headers_waiter.done():
            self._headers_waiter.set_exception(error)
        self._wake()
        self._ended(error)

    def _flush_pending(self) -> None:
        pending = self._pending
        if pending is not None:
            self._pending = None
            if self._limits is not NO_LIMITS:  # once per read, not per chunk
                self._last_data = self._conn.loop.time()
                self._body_started = True
            on_data = self._on_data
            if on_data is not None:
                on_data(pending[0] if len(pending) == 1 else b"".join(pending))

    def _ended(self, error: BaseException | None) -> None:
        self._flush_pending()
        on_end = self._on_end
        if on_end is not None:
            self._on_data = self._on_end = None
            on_end(error)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- consumed by the gateway -------------------------------------------------------
    async def wait_headers(self) -> None:
        await self._headers_waiter

    def _take_buffered(self) -> bytes:
        chunks = self._chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        self._conn.resume()
        return data

    async def next_chunk(self) -> bytes | None:
        """The body bytes that arrived since the last call (everything buffered in one
        piece), waiting for some; None at the end. No generator: a consumer may stop
        calling at any point and nothing is left suspended to finalise."""
        while True:
            if self._chunks:
                return self._take_buffered()
            if self._done:
                return None
            if self._error is not None:
                raise self._error
            if self._limits is not NO_LIMITS:
                self._wait_since = self._conn.loop.time()
            self._waiter = self._conn.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def read(self) -> bytes:
        parts = []
        while (data := await self.next_chunk()) is not None:
            parts.append(data)
        return b"".join(parts)

    def pipe(
        self, on_data: Callable[[bytes], None], on_end: Callable[[BaseException | None], None]
    ) -> None:
        """Hand the rest of the body to callbacks run by the connection itself, as each
        piece arrives (what is buffered first): no task switch per piece. ``on_end`` runs
        once, with the error that ended it or None. The callbacks must not raise."""
        if self._chunks:
            on_data(self._take_buffered())
        if self._done or self._error is not None:
            on_end(self._error)
            return
        self._on_data, self._on_end = on_data, on_end
        if self._limits is not NO_LIMITS:
            self._wait_since = self._conn.loop.time()

    def hold(self) -> None:
        """A piped consumer that cannot keep up: stop reading the upstream (its silence
        meanwhile is not the upstream's fault)."""
        self._held = True
        self._conn.pause()

    def release(self) -> None:
        if self._held:
            self._held = False
            if self._limits is not NO_LIMITS:
                self._wait_since = self._conn.loop.time()
            self._conn.resume()

    async def aclose(self) -> None:
        self._on_data = self._on_end = None  # whoever piped it is done with it
        self._pending = None
        self._conn.pool._unwatch(self)
        self._conn.finish(self, reusable=self._done and self.keep_alive)


class Http1Connection(asyncio.Protocol):
    """One keep-alive connection; at most one response in flight (no pipelining)."""

    def __init__(self, pool: Http1Pool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: Http1Response | None = None
        self.closed = False
        self._paused = False
        self._header_name = b""

    # -- asyncio.Protocol --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is not None:
            response.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._abort(UpstreamClosed(f"malformed HTTP from upstream: {exc}"))
        if response is not None and response._pending is not None:
            response._flush_pending()  # everything this read carried, in one piece

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._all.discard(self)  # every close path ends here: no reference outlives it
        response = self.response
        if response is not None and not response._done:
            if exc is None and response.status and not response.framed:
                response._finish()  # a close-delimited body: this EOF is its end
            else:
                response._fail(UpstreamClosed(f"upstream closed the connection ({exc or 'EOF'})"))

    # -- httptools callbacks -------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        response = self.response
        if response is None:
            return
        lowered = name.lower()
        if lowered == b"content-type":
            response.content_type = value.decode("latin-1")
        elif lowered == b"retry-after":
            response.retry_after = value.decode("latin-1")
        elif lowered == b"content-length" or lowered == b"transfer-encoding":
            response.framed = True

    def on_headers_complete(self) -> None:
        response = self.response
        if response is not None:
            response.status = self.parser.get_status_code()
            response.keep_alive = self.parser.should_keep_alive()
            response._headers_complete()

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self.response._feed(body)

    def on_message_complete(self) -> None:
        if self.response is not None:
            self.response._finish()

    # -- used by the pool and the response -------------------------------------------------
    def start(self, request: bytes, limits: Limits) -> Http1Response:
        response = Http1Response(self, limits)
        self.response = response
        assert self.transport is not None
        self.transport.write(request)
        return response

    def pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    def finish(self, response: Http1Response, *, reusable: bool) -> None:
        if self.response is not response:
            return
        self.response = None
        if reusable and not self.closed:
            self.resume()
            self.pool._release(self)
        else:
            self._abort(None)

    def _abort(self, error: BaseException | None) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()
        if error is not None and self.response is not None:
            self.response._fail(error)


def address(url: str) -> tuple[str, int]:
    """``(host, port)`` of an http(s) URL, the port defaulted by its scheme."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"unsupported upstream URL {url!r}")
    return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


class Http1Pool:
    """Keep-alive connections to one upstream origin."""

    def __init__(self, url: str, *, connect_timeout_s: float, max_idle: int = 1024) -> None:
        self.host, self.port = address(url)
        self.tls = url[:6].lower() == "https:"  # address() allowed only http and https
        default_port = 443 if self.tls else 80
        self.host_header = (
            self.host if self.port == default_port else f"{self.host}:{self.port}"
        ).encode()
        self.connect_timeout_s = connect_timeout_s
        self.max_idle = max_idle
        self._idle: list[Http1Connection] = []
        self._all: set[Http1Connection] = set()
        self._ssl = ssl.create_default_context() if self.tls else None
        self.loop = asyncio.get_running_loop()
        self._watched: set[Http1Response] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._tick = _MAX_TICK_S

    # -- limits: one sweeper for every limited response ----------------------------------
    def _watch(self, response: Http1Response) -> None:
        self._watched.add(response)
        limits = response._limits
        shortest = _MAX_TICK_S * 10
        for limit in (limits.first_byte_s, limits.idle_s):
            if limit is not None and limit < shortest:
                shortest = limit
        if limits.deadline is not None:
            shortest = min(shortest, limits.deadline - self.loop.time())
        tick = max(_MIN_TICK_S, shortest / 10)
        if self._sweeper is None:
            self._tick = min(tick, _MAX_TICK_S)
            self._sweeper = self.loop.call_later(self._tick, self._sweep)
        elif tick < self._tick:  # a shorter limit than any before: sweep sooner from now on
            self._tick = tick
            self._sweeper.cancel()
            self._sweeper = self.loop.call_later(tick, self._sweep)

    def _unwatch(self, response: Http1Response) -> None:
        self._watched.discard(response)

    def _sweep(self) -> None:
        now = self.loop.time()
        for response in list(self._watched):
            error = response._overdue(now)
            if error is not None:
                response._conn._abort(error)  # fails the response, which unwatches it
        if self._watched:
            self._sweeper = self.loop.call_later(self._tick, self._sweep)
        else:
            self._sweeper = None
            self._tick = _MAX_TICK_S

    async def _connect(self) -> Http1Connection:
        try:  # asyncio.timeout, not wait_for, which can lose a cancellation on 3.11
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await self.loop.create_connection(
                    lambda: Http1Connection(self),
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self.tls else None,
                )
        except TimeoutError:
            raise UpstreamTimeout(
                "connect", f"connecting to the upstream took over {self.connect_timeout_s:g}s"
            ) from None
        self._all.add(conn)
        return conn

    def _release(self, conn: Http1Connection) -> None:
        if len(self._idle) < self.max_idle:
            self._idle.append(conn)
        else:
            conn._abort(None)

    def _take_idle(self) -> Http1Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn
        return None

    async def request(self, request: bytes, limits: Limits = NO_LIMITS) -> Http1Response:
        """Send one serialised request; return once the response headers arrived.

        A reused keep-alive connection that the upstream had already closed fails before
        any byte arrives; that request is sent once more on a fresh connection.
        """
        conn = self._take_idle()
        if conn is not None:
            response = conn.start(request, limits)
            try:
                await response.wait_headers()
                return response
            except UpstreamClosed:
                if response.received:
                    raise
            except BaseException:  # cancelled: close it, or the upstream keeps generating
                conn.finish(response, reusable=False)
                raise
        conn = await self._connect()
        response = conn.start(request, limits)
        try:
            await response.wait_headers()
        except BaseException:
            conn.finish(response, reusable=False)
            raise
        return response

    def build(self, method: bytes, path: bytes, headers: bytes, body: bytes = b"") -> bytes:
        """Serialise a request. ``headers`` are complete ``Name: value\\r\\n`` lines.

        Refuses a head that a value could have split (a CR or LF that is not a line end,
        an empty line): lenient servers would read the rest as a second request or as the
        body, the gateway's upstream key with it. Four C-level scans of ~100 bytes."""
        crlf = headers.count(b"\r\n")
        if (
            headers.count(b"\n") != crlf
            or headers.count(b"\r") != crlf
            or b"\r\n\r\n" in headers
            or headers.startswith(b"\r\n")
            or b"\r" in path
            or b"\n" in path
            or b" " in path
        ):
            raise ValueError("refusing an upstream request head with a stray CR or LF")
        return b"".join(
            (
                method,
                b" ",
                path,
                b" HTTP/1.1\r\nHost: ",
                self.host_header,
                b"\r\nContent-Length: ",
                str(len(body)).encode(),
                b"\r\n",
                headers,
                b"\r\n",
                body,
            )
        )

    def interrupt(self, reason: str) -> None:
        """Close every connection now; responses in flight fail with ``Interrupted``."""
        for conn in list(self._all):
            conn._abort(Interrupted(reason))
        self._idle.clear()

    @property
    def open_connections(self) -> int:
        return len(self._all)

    async def aclose(self) -> None:
        for conn in list(self._all):
            conn._abort(None)
        self._all.clear()
        self._idle.clear()
