"""One pipelined RESP connection for the ledger's hot path (``[cluster] mode = "active"``).

Every admission is a script call on the request's path and every give-back another, so
the client's own cost is the cluster's cost per request. redis-py's asyncio client spends
~150 µs of Python per call (a pooled connection checked out and in, a ``SCRIPT EXISTS``
before every pipeline); here a call is ``hiredis.pack_command``, one buffered write and a
future: the calls of one loop turn leave in one ``write`` and their replies, parsed by
hiredis, resolve the futures in order. redis-py stays the client for everything else
(leases, task logs): correctness there is worth more than microseconds.

A call that times out leaves its reply to be read and dropped in turn, so the connection
stays aligned; a lost connection fails every pending call and the next call reconnects.
Scripts are loaded once per connection; a ``NOSCRIPT`` (Redis restarted or flushed) loads
them again and retries the call once.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections import deque
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis


def _pack(*parts: Any) -> bytes:
    packed: bytes = hiredis.pack_command(parts)
    return packed


class ReplyError(Exception):
    """Redis answered with an error."""


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self._reader = hiredis.Reader()
        self._waiting: deque[asyncio.Future[Any]] = deque()
        self._out: list[bytes] = []
        self._transport: asyncio.Transport | None = None
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def send(self, command: bytes, future: asyncio.Future[Any]) -> None:
        if not self._out:  # the first call of this loop turn: flush once it is over
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(command)
        self._waiting.append(future)

    def _flush(self) -> None:
        if self._transport is not None and self._out:
            self._transport.write(b"".join(self._out))
        self._out.clear()

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            future = self._waiting.popleft()
            if future.done():  # its caller timed out: the reply is read and dropped
                continue
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(ReplyError(str(reply)))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionError("the cluster store closed the connection")
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_exception(ConnectionError(str(self.lost)))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class RespClient:
    """``redis://[user:password@]host:port/db`` (or ``rediss://``), scripts by SHA."""

    def __init__(self, url: str, *, connect_timeout_s: float) -> None:
        parts = urlsplit(url)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 6379
        self._tls = parts.scheme == "rediss"
        self._user = unquote(parts.username) if parts.username else None
        self._password = unquote(parts.password) if parts.password else None
        self._db = int(parts.path.strip("/") or 0)
        self._connect_timeout_s = connect_timeout_s
        self._scripts: dict[str, bytes] = {}  # sha -> source, loaded on every connection
        self._connection: _Connection | None = None
        self._connecting: asyncio.Task[_Connection] | None = None

    def script(self, source: str) -> str:
        """Register a script; its SHA1, for ``evalsha``."""
        body = source.encode()
        sha = hashlib.sha1(body, usedforsecurity=False).hexdigest()
        self._scripts[sha] = body
        return sha

    async def evalsha(self, sha: str, keys: list[str], args: list[Any]) -> Any:
        command = _pack("EVALSHA", sha, len(keys), *keys, *args)
        try:
            return await self._call(command)
        except ReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            await self._call(_pack("SCRIPT", "LOAD", self._scripts[sha]))
            return await self._call(command)

    async def _call(self, command: bytes) -> Any:
        connection = self._connection
        if connection is None or connection.lost is not None:
            connection = await self._connect()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        connection.send(command, future)
        return await future

    async def _connect(self) -> _Connection:
        if self._connecting is None:  # one attempt at a time, whoever asks
            self._connecting = asyncio.get_running_loop().create_task(self._open())
        try:
            return await asyncio.shield(self._connecting)
        finally:
            if self._connecting is not None and self._connecting.done():
                self._connecting = None

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        context = ssl.create_default_context() if self._tls else None
        async with asyncio.timeout(self._connect_timeout_s):
            _, connection = await loop.create_connection(
                _Connection, self._host, self._port, ssl=context
            )
        replies: list[asyncio.Future[Any]] = []
        setup: list[tuple[Any, ...]] = []
        if self._password is not None:
            setup.append(("AUTH", *((self._user,) if self._user else ()), self._password))
        if self._db:
            setup.append(("SELECT", self._db))
        setup += [("SCRIPT", "LOAD", body) for body in self._scripts.values()]
        for command in setup:
            future: asyncio.Future[Any] = loop.create_future()
            connection.send(_pack(*command), future)
            replies.append(future)
        try:
            await asyncio.gather(*replies)
        except BaseException:
            connection.close()
            raise
        self._connection = connection
        return connection

    async def aclose(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        if self._connection is not None:
            self._connection.close()
            self._connection = None
