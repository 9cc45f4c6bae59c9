"""A plain byte-forwarding TCP hop (uvloop protocols, no HTTP parsing): the floor any
Python proxy on this machine can reach.

    python -m bench.forwarder --listen 9101 --upstream 9100
"""

from __future__ import annotations

import argparse
import asyncio

import uvloop


class Pipe(asyncio.Protocol):
    def __init__(self, peer: asyncio.Transport) -> None:
        self.peer = peer

    def data_received(self, data: bytes) -> None:
        self.peer.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.peer.close()


class Client(asyncio.Protocol):
    upstream_port = 9100

    def __init__(self) -> None:
        self.pending: list[bytes] = []
        self.upstream: asyncio.Transport | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        asyncio.ensure_future(self.connect())

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.transport is not None
        upstream, _ = await loop.create_connection(
            lambda: Pipe(self.transport),  # type: ignore[arg-type]
            "127.0.0.1",
            self.upstream_port,
        )
        self.upstream = upstream
        for data in self.pending:
            upstream.write(data)
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        if self.upstream is None:
            self.pending.append(data)
        else:
            self.upstream.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None:
            self.upstream.close()


async def serve(listen: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Client, "127.0.0.1", listen, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", type=int, default=9101)
    parser.add_argument("--upstream", type=int, default=9100)
    args = parser.parse_args()
    Client.upstream_port = args.upstream
    uvloop.run(serve(args.listen))


if __name__ == "__main__":
    main()
