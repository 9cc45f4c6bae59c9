"""The rest of a relayed stream, spliced from the upstream connection to the client's.

After the first event (sent the ordinary way, while a failure could still be retried
elsewhere), every further piece of the upstream body is cut into whole events, inspected
and written to the client's socket from the upstream connection's own ``data_received``:
no task switch, no async generator and no ASGI message per event. The request's task
sleeps on one future until the stream ends. What the pull relay guarantees holds here
too: whole events only, llama.cpp's ``error:`` translated, usage read (and hidden when the
gateway asked for it), an in-band error when the upstream fails or stops early.

Back-pressure: when the client's socket stops draining (the front door's flow control says
the transport paused writing), the upstream is held -- its silence then is not counted against
its idle limit -- and released once the client catches up. A client that goes away is
noticed by the request's ``DisconnectWatch``, which cancels the task; the exchange then
closes the upstream, which is what tells the engine to stop.

The front door puts the request's :class:`Wire` in the scope (``WIRE_KEY``); without one
(another ASGI server) the relay pulls instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

from backends.base import UpstreamResponse
from backends.errors import BackendError

log = logging.getLogger("orchgate")

WIRE_KEY = "orchgate.wire"


class Flow(Protocol):
    write_paused: bool

    async def drain(self) -> None: ...


class Wire(Protocol):
    """The client's side of one request, as the front door has it
    (``gateway.frontdoor.Cycle``): its transport and flow control, and the answer written
    straight to it -- a whole one, or a chunked stream's head with its first piece and, at
    the end, its terminator -- with no ASGI message in between."""

    transport: asyncio.Transport
    flow: Flow
    extra_headers: list[tuple[bytes, bytes]] | None

    def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None: ...

    def start_stream(
        self, status: int, headers: list[tuple[bytes, bytes]], first: bytes
    ) -> None: ...

    def end_stream(self) -> None: ...

    def watch(self, on_disconnect: Callable[[], None] | None) -> None: ...


class Consumer(Protocol):
    """A reader that cuts and inspects pushed pieces (``gateway.streaming``)."""

    @property
    def upstream(self) -> UpstreamResponse: ...

    def take(self, data: bytes) -> bytes: ...

    def ending(self, error: BackendError | None) -> bytes: ...

    def failure(self, message: str) -> bytes: ...


def chunk(data: bytes) -> bytes:
    """``data`` as one HTTP/1.1 chunk (the front door's framing of a streamed answer)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def client_wire(scope: dict[str, Any]) -> Wire | None:
    return scope.get(WIRE_KEY)


class Splice:
    __slots__ = ("_done", "_draining", "_loop", "_reader", "_transport", "_wire", "failed")

    def __init__(self, reader: Consumer, wire: Wire, loop: asyncio.AbstractEventLoop) -> None:
        self._reader = reader
        self._loop = loop
        self._wire = wire
        self._transport = wire.transport
        self._done: asyncio.Future[None] = loop.create_future()
        self._draining: asyncio.Task[None] | None = None
        self.failed = False  # a bug in the relay itself (logged; the stream was ended)

    async def run(self) -> bool:
        """Relay until the upstream ends; False when this upstream cannot be piped (the
        caller pulls instead)."""
        if not self._reader.upstream.pipe(self._on_data, self._on_end):
            return False
        try:
            await self._done
        finally:
            if self._draining is not None:
                self._draining.cancel()
        return True

    # -- run by the upstream connection's callbacks: must not raise ------------------------
    def _on_data(self, data: bytes) -> None:
        if self._done.done():
            return
        try:
            batch = self._reader.take(data)
        except Exception:  # a bug: end the stream in-band, never leave it hanging
            log.exception("stream relay failed")
            self._finish(self._reader.failure("gateway error: the relay failed"), bug=True)
            return
        if batch:
            self._write(batch)

    def _on_end(self, error: Any) -> None:
        if self._done.done():
            return
        try:
            tail = self._reader.ending(error if isinstance(error, BackendError) else None)
        except Exception:
            log.exception("stream relay failed")
            self._finish(self._reader.failure("gateway error: the relay failed"), bug=True)
            return
        self._finish(tail)

    def _finish(self, tail: bytes, *, bug: bool = False) -> None:
        if tail:
            self._write(tail)
        self.failed = bug
        self._done.set_result(None)

    def _write(self, data: bytes) -> None:
        transport = self._transport
        if transport.is_closing():
            return  # the client left: its DisconnectWatch ends the exchange
        transport.write(chunk(data))
        if self._wire.flow.write_paused and self._draining is None:
            self._reader.upstream.hold()
            self._draining = self._loop.create_task(self._drain())

    async def _drain(self) -> None:
        try:
            await self._wire.flow.drain()
        finally:
            self._draining = None
            self._reader.upstream.release()
