"""A fast fake OpenAI upstream on raw asyncio + uvloop protocols: never the bottleneck.

Speaks just enough HTTP/1.1 (keep-alive, Content-Length bodies) to answer
``POST /v1/chat/completions`` with a small JSON completion, or, when the body has
``"stream": true``, an SSE stream of ``--tokens`` chunks paced ``--pace-ms`` apart, then
``data: [DONE]``. ``GET /health`` and ``GET /v1/models`` answer 200.

    python -m bench.fakeoai --port 9100 --tokens 64 --pace-ms 20
"""

from __future__ import annotations

import argparse
import asyncio

import uvloop

JSON_BODY = (
    b'{"id":"chatcmpl-bench","object":"chat.completion","created":1,"model":"bench",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"hello there"},'
    b'"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":2,'
    b'"total_tokens":11}}'
)
JSON_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(JSON_BODY)).encode()
    + b"\r\n\r\n"
    + JSON_BODY
)
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)
HEALTH = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n"
    b'{"status":"ok"}'
)
MODELS_BODY = (
    b'{"object":"list","data":[{"id":"bench","object":"model","created":1,"owned_by":"x"}]}'
)
MODELS = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(MODELS_BODY)).encode()
    + b"\r\n\r\n"
    + MODELS_BODY
)


def sse_event(i: int) -> bytes:
    data = (
        b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1,'
        b'"model":"bench","choices":[{"index":0,"delta":{"content":"tok'
        + str(i).encode()
        + b' "},"finish_reason":null}]}\n\n'
    )
    return b"%x\r\n%s\r\n" % (len(data), data)


DONE = b"%x\r\n%s\r\n0\r\n\r\n" % (len(b"data: [DONE]\n\n"), b"data: [DONE]\n\n")


class FakeProtocol(asyncio.Protocol):
    tokens = 64
    pace_s = 0.02

    def __init__(self) -> None:
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.streaming: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.streaming is not None:
            self.streaming.cancel()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end]
            length = 0
            lower = head.lower()
            pos = lower.find(b"content-length:")
            if pos >= 0:
                length = int(lower[pos + 15 :].split(b"\r\n", 1)[0])
            total = end + 4 + length
            if len(self.buffer) < total:
                return
            body = self.buffer[end + 4 : total]
            self.buffer = self.buffer[total:]
            self.respond(head, body)

    def respond(self, head: bytes, body: bytes) -> None:
        assert self.transport is not None
        if head.startswith(b"GET /health"):
            self.transport.write(HEALTH)
        elif head.startswith(b"GET /v1/models"):
            self.transport.write(MODELS)
        elif b'"stream":true' in body or b'"stream": true' in body:
            self.streaming = asyncio.ensure_future(self.stream())
        else:
            self.transport.write(JSON_RESPONSE)

    async def stream(self) -> None:
        transport = self.transport
        assert transport is not None
        transport.write(SSE_HEAD)
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i in range(self.tokens):
            # deadline pacing: no drift from scheduling jitter
            delay = start + (i + 1) * self.pace_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            transport.write(sse_event(i))
        transport.write(DONE)


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(FakeProtocol, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--pace-ms", type=float, default=20.0)
    args = parser.parse_args()
    FakeProtocol.tokens = args.tokens
    FakeProtocol.pace_s = args.pace_ms / 1000
    uvloop.run(serve(args.port))


if __name__ == "__main__":
    main()
