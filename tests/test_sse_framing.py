"""SSE relayed per the WHATWG parsing rules, through a real upstream socket.

Hypothesis writes streams the way real servers do -- LF, CRLF or CR line endings,
``data:`` with or without its space, ``event:``/``id:``/``retry:``/comment lines, JSON
with or without spaces, ``data:[DONE]`` -- and cuts them into reads at arbitrary bytes.
A raw upstream (chunked, or a body that ends when the connection closes) sends exactly
those reads; the client must receive exactly those bytes: nothing buffered until EOF,
nothing added (no false truncation error, no second ``[DONE]``), nothing re-framed.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Gateway, pool, run_gateway

EOLS = [b"\n", b"\r\n", b"\r"]


class RawUpstream:
    """An OpenAI-ish upstream on a raw socket: ``/v1/models`` for the probe, and a chat
    stream made of ``self.reads``, written one read at a time. ``self.gate`` holds every
    read after the first until the test opens it (to prove nothing waits for EOF)."""

    def __init__(self) -> None:
        self.reads: list[bytes] = []
        self.close_delimited = False
        self.gate = threading.Event()
        self.bodies: list[bytes] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.port = 0

    def start(self) -> None:
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0), self.loop
        ).result(5)
        self.port = self.server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        self.gate.set()

        async def shutdown() -> None:  # every connection closed while the loop still runs
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *lines = head.decode("latin-1").split("\r\n")
                length = next(
                    (int(v) for k, _, v in (ln.partition(": ") for ln in lines)
                     if k.lower() == "content-length"), 0,
                )  # fmt: skip
                body = await reader.readexactly(length) if length else b""
                if request_line.startswith("GET /v1/models"):
                    answer = b'{"object":"list","data":[{"id":"m","object":"model"}]}'
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(answer), answer)
                    )
                    await writer.drain()
                    continue
                self.bodies.append(body)
                await self._stream(writer)
                if self.close_delimited:
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    async def _stream(self, writer: asyncio.StreamWriter) -> None:
        framing = (
            b"Connection: close\r\n" if self.close_delimited else b"Transfer-Encoding: chunked\r\n"
        )
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n" + framing + b"\r\n")
        for i, read in enumerate(self.reads):
            if i == 1:
                await asyncio.get_running_loop().run_in_executor(None, self.gate.wait, 10)
            writer.write(read if self.close_delimited else b"%x\r\n%s\r\n" % (len(read), read))
            await writer.drain()
        if not self.close_delimited:
            writer.write(b"0\r\n\r\n")
        await writer.drain()


@pytest.fixture(scope="module")
def upstream() -> Iterator[RawUpstream]:
    raw = RawUpstream()
    raw.start()
    try:
        yield raw
    finally:
        raw.stop()


@pytest.fixture(scope="module")
def gw(upstream: RawUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    replica = {"id": "raw", "engine": "openai", "url": f"http://127.0.0.1:{upstream.port}"}
    config = {
        "pools": [
            pool(
                "p",
                ["m"],
                [replica],
                retry={"attempts": 1},
                ejection={"consecutive_failures": 1000},
            )
        ]
    }
    with run_gateway(config, tmp_path_factory.mktemp("sse")) as gateway:
        yield gateway


def chunk_json(text: str, spaced: bool) -> bytes:
    body = {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": text}}],
    }
    raw = msgspec.json.encode(body)
    return raw.replace(b'":', b'": ').replace(b',"', b', "') if spaced else raw


@st.composite
def streams(draw: Any) -> tuple[bytes, list[bytes]]:
    """A whole SSE stream as a server would write it, and the reads it is cut into."""
    eol = draw(st.sampled_from(EOLS))
    space = draw(st.sampled_from([b" ", b""]))
    spaced = draw(st.booleans())
    events = []
    for i in range(draw(st.integers(1, 6))):
        lines = []
        if draw(st.booleans()):
            lines.append(b": keep-alive comment")
        if draw(st.booleans()):
            lines.append(b"id: " + str(i).encode())
        if draw(st.booleans()):
            lines.append(b"event: message")
        lines.append(b"data:" + space + chunk_json(f"tok{i} ", spaced))
        events.append(eol.join(lines) + eol + eol)
    events.append(b"data:" + space + b"[DONE]" + eol + eol)
    whole = b"".join(events)
    # the first read is one whole event: the client must see it before anything else is
    # sent; the rest is cut anywhere, mid-line and mid-line-ending included
    first, rest = whole[: len(events[0])], whole[len(events[0]) :]
    cuts = sorted(set(draw(st.lists(st.integers(1, len(rest) - 1), max_size=8))))
    reads = [rest[a:b] for a, b in zip([0, *cuts], [*cuts, len(rest)], strict=True)]
    return whole, [first, *reads]


def relay(gw: Gateway, upstream: RawUpstream, reads: list[bytes]) -> tuple[bytes, bytes]:
    """Stream a chat through the gateway; the first bytes seen before the gate opened,
    and everything."""
    upstream.reads = reads
    upstream.gate.clear()
    body = {
        "model": "m",
        "stream": True,
        "stream_options": {"include_usage": True},  # the client asked: nothing is hidden
        "messages": [{"role": "user", "content": "hi"}],
    }
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=10) as answer:
        assert answer.status_code == 200
        chunks = answer.iter_raw()
        first = next(chunks)  # arrives while the upstream still holds everything else
        upstream.gate.set()
        return first, first + b"".join(chunks)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(stream=streams(), close_delimited=st.booleans())
def test_every_framing_is_relayed_byte_exact_and_unbuffered(
    gw: Gateway, upstream: RawUpstream, stream: tuple[bytes, list[bytes]], close_delimited: bool
) -> None:
    whole, reads = stream
    upstream.close_delimited = close_delimited
    first, received = relay(gw, upstream, reads)
    assert first == reads[0]
    assert received == whole
    assert received.count(b"[DONE]") == 1 and b'"error"' not in received


@pytest.mark.parametrize("eol", EOLS, ids=["lf", "crlf", "cr"])
@pytest.mark.parametrize("spaced", [False, True], ids=["compact", "spaced"])
def test_the_usage_chunk_is_found_by_decoding_and_hidden_when_not_asked(
    gw: Gateway, upstream: RawUpstream, eol: bytes, spaced: bool
) -> None:
    counts = {"prompt_tokens": 11, "completion_tokens": 1, "total_tokens": 12}
    usage = {"object": "chat.completion.chunk", "choices": [], "usage": counts}
    usage_json = msgspec.json.encode(usage)
    if spaced:
        usage_json = usage_json.replace(b'":', b'": ').replace(b',"', b', "')
    token = b"data: " + chunk_json("hi", spaced) + eol + eol
    hidden = b"event: usage" + eol + b"data: " + usage_json + eol + eol
    done = b"data: [DONE]" + eol + eol
    upstream.reads = [token, hidden + done]
    upstream.close_delimited = False
    upstream.gate.set()
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    before = sum(r.tokens_in for r in gw.state.all_replicas())
    answer = httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=10)
    assert answer.content == token + done  # the client never asked for usage
    assert b'"stream_options":{"include_usage":true}' in upstream.bodies[-1]
    assert sum(r.tokens_in for r in gw.state.all_replicas()) == before + 11


def test_a_stream_opening_with_an_error_in_any_framing_is_an_error(
    gw: Gateway, upstream: RawUpstream
) -> None:
    upstream.reads = [b'data:{ "error": { "message": "no slots", "code": 500 } }\r\n\r\n']
    upstream.close_delimited = False
    upstream.gate.set()
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    answer = httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=10)
    assert answer.status_code == 502 and answer.json()["error"]["message"] == "no slots"
    replica = gw.state.all_replicas()[0]
    assert replica.ready and replica.failures == 0  # it answered: alive
