"""The spliced relay (``gateway.splice``): after the first event, upstream bytes go from the
upstream connection's callbacks straight to the client's socket.

Against a real gateway on loopback and the fake engine: a client that stops reading holds
the upstream (its idle limit does not fire) and then gets every event intact; several
events in one upstream read leave in one write, never split or merged differently; an
upstream that fails mid-stream still ends in-band; a client that leaves frees the slot;
and the same app under an ASGI server without the front door relays by pulling, event for
event the same.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import httpx

from gateway.app import create_app
from gateway.config import config_from_mapping
from tests.conftest import pool
from tests.fakes.servers import serve_asgi, wait_until

BIG = "x" * 16000


def _raw_stream(url: str, spec: dict[str, Any], *, pause_s: float = 0.0) -> bytes:
    """POST a stream with a raw socket; after the response head, stop reading for
    ``pause_s`` (the kernel buffers fill, the gateway must hold the upstream), then read
    to the end of the chunked body."""
    host, port = url.removeprefix("http://").split(":")
    body = (
        b'{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}],"fake":'
        + httpx.Request("POST", "/", json=spec).content
        + b"}"
    )
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
            b"application/json\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
        )
        parts = [sock.recv(1024)]
        time.sleep(pause_s)
        while not parts[-1].endswith(b"0\r\n\r\n"):
            data = sock.recv(1 << 20)
            if not data:
                break
            parts.append(data)
    return b"".join(parts)


def _events(raw: bytes) -> list[bytes]:
    """The SSE events of a chunked HTTP/1.1 response."""
    _, _, rest = raw.partition(b"\r\n\r\n")
    pieces, at = [], 0
    while at < len(rest):
        end = rest.index(b"\r\n", at)
        n = int(rest[at:end], 16)
        if n == 0:
            break
        pieces.append(rest[end + 2 : end + 2 + n])
        at = end + 4 + n
    return [e for e in b"".join(pieces).split(b"\n\n") if e]


def _config(url: str, **extra: Any) -> dict[str, Any]:
    replica = {"id": "f0", "engine": "openai", "url": url, "slots": 2}
    return {"pools": [pool("p", ["m"], [replica], **extra)]}


def test_a_client_that_stops_reading_holds_the_upstream_without_timing_it_out(
    fake_upstream: Any, gateway_factory: Any
) -> None:
    fake, server = fake_upstream
    config = _config(server.url, timeouts={"first_token_s": 5, "idle_s": 0.3})
    with gateway_factory(config) as gw:
        # 300 events of 16 KB, written as fast as the fake can: megabytes the client does
        # not read for 3x the idle limit
        raw = _raw_stream(gw.url, {"chunks": 300, "text": BIG}, pause_s=1.0)
        events = _events(raw)
        assert len(events) == 301 and events[-1] == b"data: [DONE]", events[-3:]
        assert all(BIG.encode() in e for e in events[:-1])
        assert b"error" not in raw
        assert wait_until(lambda: gw.slots_in_use() == 0, timeout=5)


def test_an_upstream_cut_mid_splice_ends_in_band(fake_upstream: Any, gateway_factory: Any) -> None:
    fake, server = fake_upstream
    with gateway_factory(_config(server.url)) as gw:
        events = _events(_raw_stream(gw.url, {"chunks": 50, "mode": "reset_after"}))
        assert len(events) == 52 and events[-1] == b"data: [DONE]"
        assert b"upstream_stream_error" in events[-2]
        assert wait_until(lambda: gw.slots_in_use() == 0, timeout=5)


def test_a_client_that_leaves_mid_splice_frees_the_slot(
    fake_upstream: Any, gateway_factory: Any
) -> None:
    fake, server = fake_upstream
    with gateway_factory(_config(server.url)) as gw:
        host, port = gw.url.removeprefix("http://").split(":")
        body = b'{"model":"m","stream":true,"messages":[],"fake":{"chunks":1000,"delay_s":0.01}}'
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                b"application/json\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
            )
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
            assert wait_until(lambda: gw.slots_in_use() == 1, timeout=5)
        assert wait_until(lambda: gw.slots_in_use() == 0, timeout=5)  # the slot is back
        assert wait_until(lambda: len(fake.disconnects) == 1, timeout=5)  # the engine told


def test_without_the_front_door_the_relay_pulls_the_same_events(
    fake_upstream: Any, tmp_path: Any
) -> None:
    """Another ASGI server (plain uvicorn httptools): no wire in the scope, the relay pulls
    with one ASGI message per batch -- the same events, the same in-band end."""
    fake, server = fake_upstream
    app = create_app(config_from_mapping(_config(server.url), env={}))

    async def plain(scope: Any, receive: Any, send: Any) -> None:  # hides app.front_door
        await app(scope, receive, send)

    with serve_asgi(plain) as asgi:
        assert wait_until(lambda: app.state.pools["p"].queue.is_ready(), timeout=10)
        events = _events(_raw_stream(asgi.url, {"chunks": 30, "text": BIG}, pause_s=0.3))
        assert len(events) == 31 and events[-1] == b"data: [DONE]"
        cut = _events(_raw_stream(asgi.url, {"chunks": 5, "mode": "reset_after"}))
        assert b"upstream_stream_error" in cut[-2] and cut[-1] == b"data: [DONE]"
