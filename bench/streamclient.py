"""Open N concurrent SSE streams and timestamp every event (uvloop, raw protocols).

Prints one JSON object: time to first event per stream, every inter-event gap, and the
fidelity check (each stream has exactly the expected ``tok0 .. tokN-1`` events, none merged
or lost, then ``[DONE]``).

    python -m bench.streamclient --port 9102 --streams 64 --tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import msgspec
import uvloop

BODY = (
    b'{"model":"bench","messages":[{"role":"user","content":"hello"}],'
    b'"max_tokens":64,"stream":true}'
)


class StreamProtocol(asyncio.Protocol):
    def __init__(self, done: asyncio.Future[None]) -> None:
        self.done = done
        self.buffer = b""
        self.headers_seen = False
        self.stamps: list[float] = []
        self.events: list[bytes] = []
        self.finished = False
        self.sent_at = 0.0

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        self.buffer += data
        if not self.headers_seen:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            self.headers_seen = True
            self.buffer = self.buffer[end + 4 :]
        # de-chunk lazily: collect SSE events by their "data: " lines
        while True:
            start = self.buffer.find(b"data: ")
            if start < 0:
                return
            end = self.buffer.find(b"\n\n", start)
            if end < 0:
                return
            event = self.buffer[start + 6 : end]
            self.buffer = self.buffer[end + 2 :]
            self.events.append(event)
            self.stamps.append(now)
            if event == b"[DONE]":
                self.finished = True
                if not self.done.done():
                    self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def one_stream(port: int) -> StreamProtocol:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    transport, proto = await loop.create_connection(lambda: StreamProtocol(done), "127.0.0.1", port)
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
        b"application/json\r\nContent-Length: " + str(len(BODY)).encode() + b"\r\n\r\n" + BODY
    )
    proto.sent_at = time.perf_counter()
    transport.write(request)
    await asyncio.wait_for(done, 60)
    transport.close()
    return proto


TASK_BODY = b'{"model_ref":"bench","prompt":"hello","max_tokens":64}'


async def one_task(port: int) -> StreamProtocol:
    """OrchQueue: POST /v1/tasks, then GET its stream; TTFT counts from the submit."""
    loop = asyncio.get_running_loop()
    sent_at = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(TASK_BODY)).encode() + b"\r\n\r\n" + TASK_BODY
    )
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    task_id = msgspec.json.decode(await reader.readexactly(length))["task_id"]
    writer.close()
    done: asyncio.Future[None] = loop.create_future()
    transport, proto = await loop.create_connection(
        lambda: TaskStreamProtocol(done), "127.0.0.1", port
    )
    proto.sent_at = sent_at
    transport.write(f"GET /v1/tasks/{task_id}/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    await asyncio.wait_for(done, 60)
    transport.close()
    return proto


class TaskStreamProtocol(StreamProtocol):
    """Task SSE: ``event: token`` frames carry ``{"t", "i"}``; ``event: end`` closes."""

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        self.buffer += data
        while True:
            start = self.buffer.find(b"event: ")
            if start < 0:
                return
            end = self.buffer.find(b"\n\n", start)
            if end < 0:
                return
            frame = self.buffer[start:end]
            self.buffer = self.buffer[end + 2 :]
            name, _, payload = frame.partition(b"\ndata: ")
            if name == b"event: token":
                t = msgspec.json.decode(payload)["t"]
                self.events.append(msgspec.json.encode({"choices": [{"delta": {"content": t}}]}))
                self.stamps.append(now)
            elif name in (b"event: end", b"event: error"):
                self.finished = name == b"event: end"
                self.events.append(b"[DONE]")
                self.stamps.append(now)
                if not self.done.done():
                    self.done.set_result(None)


async def run(port: int, streams: int, tokens: int, tasks: bool = False) -> dict[str, object]:
    opener = one_task if tasks else one_stream
    started = time.perf_counter()
    protos = await asyncio.gather(*(opener(port) for _ in range(streams)))
    wall_s = time.perf_counter() - started
    ttft, gaps, bad = [], [], 0
    decoder = msgspec.json.Decoder()
    for proto in protos:
        content_events = [e for e in proto.events if e != b"[DONE]"]
        texts = []
        for e in content_events:
            try:
                texts.append(decoder.decode(e)["choices"][0]["delta"]["content"])
            except Exception:  # noqa: BLE001 - counted as a fidelity failure
                texts.append(None)
        if not proto.finished or texts != [f"tok{i} " for i in range(tokens)]:
            bad += 1
        if proto.stamps:
            ttft.append(proto.stamps[0] - proto.sent_at)
            gaps += [b - a for a, b in zip(proto.stamps[:-2], proto.stamps[1:-1], strict=True)]
    events = sum(len(proto.stamps) for proto in protos)
    return {
        "streams": streams, "ttft_s": ttft, "gaps_s": gaps, "bad_streams": bad,
        "events": events, "wall_s": wall_s,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--tasks", action="store_true", help="use the OrchQueue task API")
    args = parser.parse_args()
    result = uvloop.run(run(args.port, args.streams, args.tokens, args.tasks))
    sys.stdout.buffer.write(msgspec.json.encode(result))


if __name__ == "__main__":
    main()
