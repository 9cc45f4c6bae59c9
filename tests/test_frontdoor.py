"""The front door's own HTTP/1.1 server protocol (``gateway.frontdoor``), over raw sockets:
the parts of HTTP/1.1 a server must get right that no client library shows (pipelining,
HEAD, ``Expect: 100-continue``, chunked request bodies, HTTP/1.0, idle keep-alive), that
a response header cannot split the response, and that an application failure is an
envelope, never a traceback. The limits while parsing are in ``test_security.py``."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.frontdoor import FrontDoorLimits, protocol_for
from gateway.splice import client_wire
from tests.conftest import Gateway, pool
from tests.fakes.servers import AiohttpThread, UvicornThread, serve_asgi
from tests.fakes.upstream import FakeUpstream


class EchoApp:
    """Answers every request with what it read: method, path, query and body; a few paths
    misbehave on purpose."""

    front_door = protocol_for(FrontDoorLimits(max_body_bytes=1 << 22), lambda e, p: (b"{}", []))

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, bytes]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": message["type"] + ".complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.seen.append((scope["method"], scope["path"], body))
        special = getattr(self, "_" + scope["path"].strip("/"), None)
        if special is not None:
            await special(scope, send)
            return
        answer = b"%s %s?%s %d:%s" % (
            scope["method"].encode(), scope["raw_path"], scope["query_string"], len(body),
            body[:32],
        )  # fmt: skip
        headers = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(answer))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer})

    async def _boom(self, scope: dict[str, Any], send: Any) -> None:
        raise RuntimeError("a bug")

    async def _silent(self, scope: dict[str, Any], send: Any) -> None:
        return

    async def _split(self, scope: dict[str, Any], send: Any) -> None:
        headers = [(b"x-evil", b"a\r\nset-cookie: stolen=1")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})

    async def _wire(self, scope: dict[str, Any], send: Any) -> None:
        wire = client_wire(scope)
        assert wire is not None
        wire.respond(201, [(b"content-type", b"text/plain")], b"via the wire")

    async def _stream(self, scope: dict[str, Any], send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for piece in (b"one ", b"two ", b"three"):
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


@pytest.fixture
def echo() -> Iterator[tuple[EchoApp, UvicornThread]]:
    app = EchoApp()
    with serve_asgi(app, keepalive_s=0.5) as server:
        yield app, server


def connect(server: UvicornThread) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=5)


Response = tuple[bytes, dict[bytes, bytes], bytes]


def read_response(sock: socket.socket, buffer: bytearray) -> Response:
    """One response off ``sock`` (``buffer`` keeps what follows it): status line, headers,
    body (Content-Length or chunked, decoded)."""
    while b"\r\n\r\n" not in buffer:
        data = sock.recv(65536)
        assert data, f"connection closed mid-head: {bytes(buffer)!r}"
        buffer += data
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    buffer[:] = rest
    status, *lines = head.split(b"\r\n")
    headers = {k.lower(): v for k, _, v in (line.partition(b": ") for line in lines)}
    if b"content-length" in headers:
        length = int(headers[b"content-length"])
        while len(buffer) < length:
            buffer += sock.recv(65536)
        body = bytes(buffer[:length])
        del buffer[:length]
        return status, headers, body
    if headers.get(b"transfer-encoding") == b"chunked":
        body = b""
        while True:
            while b"\r\n" not in buffer:
                buffer += sock.recv(65536)
            size_line, _, _ = bytes(buffer).partition(b"\r\n")
            size = int(size_line, 16)
            while len(buffer) < len(size_line) + 2 + size + 2:
                buffer += sock.recv(65536)
            start = len(size_line) + 2
            body += bytes(buffer[start : start + size])
            del buffer[: start + size + 2]
            if size == 0:
                return status, headers, body
    return status, headers, b""


def closed(sock: socket.socket, within_s: float = 3.0) -> bool:
    sock.settimeout(within_s)
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, TimeoutError):
        return False


def test_pipelined_requests_are_answered_in_order(echo: tuple[EchoApp, UvicornThread]) -> None:
    app, server = echo
    requests = b"".join(
        b"POST /r%d?q=%d HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nab%d" % (i, i, i)
        for i in range(5)
    )
    with connect(server) as sock:
        sock.sendall(requests)
        buffer = bytearray()
        bodies = [read_response(sock, buffer)[2] for _ in range(5)]
    assert bodies == [b"POST /r%d?q=%d 3:ab%d" % (i, i, i) for i in range(5)]
    assert [path for _, path, _ in app.seen] == [f"/r{i}" for i in range(5)]


def test_head_gets_the_headers_and_no_body(echo: tuple[EchoApp, UvicornThread]) -> None:
    _, server = echo
    with connect(server) as sock:
        sock.sendall(b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\nGET /after HTTP/1.1\r\nHost: x\r\n\r\n")
        buffer = bytearray()
        while b"\r\n\r\n" not in buffer:
            buffer += sock.recv(65536)
        head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK") and b"content-length: 11" in head
        buffer[:] = rest
        # the next response follows at once: no body bytes of the HEAD answer in between
        status, _, body = read_response(sock, buffer)
    assert status.startswith(b"HTTP/1.1 200") and body == b"GET /after? 0:"


def test_expect_100_continue_is_answered_when_the_body_is_read(
    echo: tuple[EchoApp, UvicornThread],
) -> None:
    _, server = echo
    with connect(server) as sock:
        sock.sendall(
            b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        interim = sock.recv(65536)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"hello")
        _, _, body = read_response(sock, bytearray())
    assert body == b"POST /up? 5:hello"


def test_chunked_and_large_request_bodies_arrive_whole(
    echo: tuple[EchoApp, UvicornThread],
) -> None:
    app, server = echo
    big = bytes(range(256)) * 4096  # 1 MiB: the reader pauses and resumes on the way
    with connect(server) as sock:
        sock.sendall(
            b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"4\r\nwiki\r\n5\r\npedia\r\n0\r\n\r\n"
        )
        buffer = bytearray()
        assert read_response(sock, buffer)[2] == b"POST /c? 9:wikipedia"
        sock.sendall(b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(big))
        sock.sendall(big)
        assert read_response(sock, buffer)[2].startswith(b"POST /big? 1048576:")
    assert app.seen[-1][2] == big


def test_http_1_0_gets_its_answer_and_the_connection_closes(
    echo: tuple[EchoApp, UvicornThread],
) -> None:
    _, server = echo
    with connect(server) as sock:
        sock.sendall(b"GET /old HTTP/1.0\r\n\r\n")
        status, headers, body = read_response(sock, bytearray())
        assert status.startswith(b"HTTP/1.1 200") and body == b"GET /old? 0:"
        assert headers[b"connection"] == b"close"
        assert closed(sock)


def test_an_idle_keep_alive_connection_is_closed_a_busy_one_is_not(
    echo: tuple[EchoApp, UvicornThread],
) -> None:
    _, server = echo  # keep-alive: 0.5 s
    with connect(server) as sock:
        buffer = bytearray()
        for i in range(6):  # 6 requests 0.2 s apart: 1.2 s on one connection, never idle 0.5 s
            sock.sendall(b"GET /k%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
            assert read_response(sock, buffer)[2] == b"GET /k%d? 0:" % i
            time.sleep(0.2)
        started = time.monotonic()
        assert closed(sock)
        assert time.monotonic() - started < 1.5


def test_a_header_cannot_split_the_response(echo: tuple[EchoApp, UvicornThread]) -> None:
    _, server = echo
    with connect(server) as sock:
        sock.sendall(b"GET /split HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        sock.settimeout(5)
        while chunk := sock.recv(65536):
            received += chunk
    assert b"set-cookie" not in received.lower()
    assert received.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")


@pytest.mark.parametrize("path", ["/boom", "/silent"])
def test_an_application_failure_is_a_500_envelope(
    echo: tuple[EchoApp, UvicornThread], path: str
) -> None:
    _, server = echo
    with connect(server) as sock:
        sock.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
        status, headers, body = read_response(sock, bytearray())
    assert status.startswith(b"HTTP/1.1 500")
    assert headers[b"content-type"] == b"application/json" and body == b"{}"
    assert b"Traceback" not in body and headers[b"connection"] == b"close"


def test_the_wire_and_the_asgi_messages_frame_alike(echo: tuple[EchoApp, UvicornThread]) -> None:
    _, server = echo
    with connect(server) as sock:
        sock.sendall(b"GET /wire HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        buffer = bytearray()
        status, headers, body = read_response(sock, buffer)
        assert status.startswith(b"HTTP/1.1 201") and body == b"via the wire"
        assert headers[b"content-length"] == b"12" and b"date" in headers
        status, headers, body = read_response(sock, buffer)
        assert headers[b"transfer-encoding"] == b"chunked" and body == b"one two three"


def test_a_non_ascii_target_is_a_400(echo: tuple[EchoApp, UvicornThread]) -> None:
    _, server = echo
    with connect(server) as sock:
        sock.sendall(b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, _ = read_response(sock, bytearray())
    assert status.startswith(b"HTTP/1.1 400")


# -- through the gateway ---------------------------------------------------------------------
@pytest.fixture
def gw(
    fake_upstream: tuple[FakeUpstream, AiohttpThread], gateway_factory: Any
) -> Iterator[Gateway]:
    replica = {"id": "f0", "engine": "openai", "url": fake_upstream[1].url, "slots": 4}
    config = {
        "pools": [pool("p", ["m"], [replica])],
        "server": {"cors": {"allow_origins": ["http://ui.example"]}},
    }
    with gateway_factory(config) as gateway:
        yield gateway


def test_pipelined_chats_and_cors_through_the_wire(gw: Gateway) -> None:
    body = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
    one = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: http://ui.example\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
    )
    with socket.create_connection(("127.0.0.1", gw.server.port), timeout=10) as sock:
        sock.sendall(one * 3)
        buffer = bytearray()
        answers = [read_response(sock, buffer) for _ in range(3)]
    for status, headers, reply in answers:
        assert status.startswith(b"HTTP/1.1 200"), reply
        assert headers[b"access-control-allow-origin"] == b"http://ui.example"
        assert headers[b"vary"] == b"Origin" and b"x-request-id" in headers
        assert b'"choices"' in reply
    assert gw.slots_in_use() == 0


def test_a_client_gone_mid_request_frees_its_slot_at_once(
    gw: Gateway, fake_upstream: tuple[FakeUpstream, AiohttpThread]
) -> None:
    """The wire tells the request the client left (no watcher task): the upstream is
    closed and the slot freed within a few milliseconds, not at a poll."""
    fake = fake_upstream[0]
    body = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"fake":{"mode":"hang"}}'
    sock = socket.create_connection(("127.0.0.1", gw.server.port), timeout=10)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
    )
    deadline = time.monotonic() + 5
    while gw.slots_in_use() == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert gw.slots_in_use() == 1
    sock.close()
    started = time.monotonic()
    while gw.slots_in_use() and time.monotonic() - started < 5:
        time.sleep(0.002)
    assert gw.slots_in_use() == 0
    assert time.monotonic() - started < 0.5
    deadline = time.monotonic() + 5
    while not fake.disconnects and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fake.disconnects  # the engine was told: its connection was closed
