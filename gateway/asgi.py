"""Raw ASGI plumbing for the hot path: read a bounded body, send a response, watch for the
client leaving. The OpenAI data plane uses these instead of Litestar's request/response
objects, which would decode and re-encode every body (see README, "Performance")."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.errors import BodyTooLarge, GatewayError, InvalidRequest, openai_error_bytes

Scope = dict[str, Any]
Headers = list[tuple[bytes, bytes]]

JSON = b"application/json"


class ClientDisconnected(Exception):
    """The client went away before its request body was complete."""


_TABLE = "orchgate.headers"


def header(scope: Scope, name: bytes) -> bytes | None:
    """First value of a request header; ``name`` must be lower-case. The headers become a
    table at the first lookup (one C call; a request asks for five or six)."""
    table: dict[bytes, bytes] | None = scope.get(_TABLE)
    if table is None:
        table = scope[_TABLE] = dict(reversed(scope["headers"]))  # reversed: the first wins
    return table.get(name)


async def read_body(scope: Scope, receive: Any, limit: int) -> bytes:
    """The whole request body, refusing more than ``limit`` bytes without reading it all."""
    length = header(scope, b"content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise InvalidRequest("invalid Content-Length header") from None
        if declared > limit:
            raise BodyTooLarge(f"request body of {declared} bytes exceeds the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected("client disconnected while sending the body")
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"request body exceeds the {limit}-byte limit")
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def send_bytes(
    send: Any,
    status: int,
    body: bytes,
    headers: Headers,
    content_type: bytes = JSON,
    wire: Any = None,
) -> None:
    """A whole answer; through the front door's ``wire`` (``gateway.splice.Wire``) its head
    and body leave in one write, with no ASGI message."""
    if wire is not None:
        wire.respond(status, [(b"content-type", content_type), *headers], body)
        return
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Any, error: GatewayError, headers: Headers) -> None:
    extra = [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send_bytes(send, error.status, openai_error_bytes(error), headers + extra)


class DisconnectWatch:
    """Cancels the request task when the client disconnects, in any phase: queued, waiting
    for the upstream's first byte, or streaming.

    Through the front door the request's wire calls back when the connection is lost: no
    task and no timer. Under another ASGI server a watcher task reads ``receive`` for the
    ``http.disconnect``, started ``delay_s`` after the request is admitted: most
    non-streaming requests finish sooner and never pay for a second task. ``finish()``
    must be called before the final send, because such a server reports completion as a
    disconnect too.
    """

    __slots__ = (
        "_loop",
        "_receive",
        "_task",
        "_timer",
        "_watcher",
        "_wire",
        "disconnected",
        "finished",
    )

    def __init__(
        self,
        receive: Any,
        loop: asyncio.AbstractEventLoop,
        *,
        wire: Any = None,
        delay_s: float = 0.05,
    ) -> None:
        self.disconnected = False
        self.finished = False
        self._receive = receive
        self._loop = loop  # passed in: on 3.11 each lookup of the running loop is a getpid
        self._task = asyncio.current_task(loop)
        self._watcher: asyncio.Task[None] | None = None
        self._wire = wire
        self._timer: asyncio.TimerHandle | None = None
        if wire is not None:
            wire.watch(self._lost)
        else:
            self._timer = loop.call_later(delay_s, self._start)

    def _lost(self) -> None:
        if not self.finished and self._task is not None:
            self.disconnected = True
            self._task.cancel()

    def _start(self) -> None:
        self._timer = None
        if not self.finished:
            self._watcher = self._loop.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self._lost()
                return

    def finish(self) -> None:
        self.finished = True

    def close(self) -> None:
        self.finished = True
        if self._wire is not None:
            self._wire.watch(None)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._watcher is not None:
            self._watcher.cancel()
        if self.disconnected and self._task is not None:
            self._task.uncancel()
