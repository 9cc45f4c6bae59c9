"""Attacks on a real ``orchgate serve`` process, replayed as an attacker would send them:
raw sockets where a client library would be too polite, and a real upstream that shows
what reached it. Each test states what the attacker gets.

Two gateways: ``open_gw`` as the embedded default runs (no token at all, loopback), and
``locked_gw`` with a data token and an admin token. Both in front of the same fake
upstream; both with short front-door limits so slow attacks finish quickly.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from tests.conftest import REPO, free_port
from tests.fakes.servers import AiohttpThread, GatewayProcess, gateway_process, wait_until
from tests.fakes.upstream import FakeUpstream

DATA = "data-token-1"
ADMIN_T = "admin-token-1"
MAX_HEADER = 16 * 1024
MAX_BODY = 64 * 1024
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def _config(path: Path, port: int, upstream: str, hook: str, *, tokens: bool) -> None:
    auth = f'[auth]\ntoken = "{DATA}"\nadmin_token = "{ADMIN_T}"\n' if tokens else ""
    path.write_text(
        f"""
[server]
bind = "127.0.0.1:{port}"
header_timeout_s = 1.0
body_timeout_s = 1.0
max_header_bytes = {MAX_HEADER}
max_body_bytes = {MAX_BODY}
max_connections = 512

{auth}
[[webhooks]]
url = "{hook}/services/T000/B000/XOXB-SECRET-PART"
secret = "0123456789abcdef-webhook-secret"

[[pools]]
id = "p"
models = ["m"]
health_interval_s = 0.2
reload_timeout_s = 2

[[pools.replicas]]
id = "f0"
engine = "openai"
url = "{upstream}"
slots = 4

[[pools.variants]]
id = "two"

[[pools.variants.replicas]]
id = "f1"
engine = "openai"
url = "{upstream}"
slots = 4
"""
    )


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[FakeUpstream, str]]:
    fake = FakeUpstream()
    server = AiohttpThread(fake.app)
    server.start()
    try:
        yield fake, server.url
    finally:
        server.stop()


def _hook_app() -> web.Application:
    async def accept(_: web.Request) -> web.Response:
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/{tail:.*}", accept)
    return app


@pytest.fixture(scope="module")
def hook() -> Iterator[str]:
    """A webhook receiver that accepts everything (Slack-style secret URL paths)."""
    server = AiohttpThread(_hook_app)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def _gateway(
    tmp_path_factory: pytest.TempPathFactory,
    upstream: tuple[FakeUpstream, str],
    hook: str,
    tokens: bool,
) -> Iterator[GatewayProcess]:
    folder = tmp_path_factory.mktemp("locked" if tokens else "open")
    port = free_port()
    _config(folder / "orchgate.toml", port, upstream[1], hook, tokens=tokens)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHGATE_")}
    with gateway_process(folder / "orchgate.toml", port, env=env) as gw:
        yield gw


@pytest.fixture(scope="module")
def open_gw(
    tmp_path_factory: pytest.TempPathFactory, upstream: tuple[FakeUpstream, str], hook: str
) -> Iterator[GatewayProcess]:
    yield from _gateway(tmp_path_factory, upstream, hook, tokens=False)


@pytest.fixture(scope="module")
def locked_gw(
    tmp_path_factory: pytest.TempPathFactory, upstream: tuple[FakeUpstream, str], hook: str
) -> Iterator[GatewayProcess]:
    yield from _gateway(tmp_path_factory, upstream, hook, tokens=True)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def raw(gw: GatewayProcess, data: bytes, *, read_timeout: float = 5.0) -> bytes:
    """Send bytes on a fresh connection; everything the gateway answered until it closed."""
    port = int(gw.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (TimeoutError, ConnectionResetError):
            pass
    return b"".join(chunks)


def status_of(answer: bytes) -> int:
    match = re.match(rb"HTTP/1\.1 (\d{3})", answer)
    assert match, answer[:200]
    return int(match[1])


def body_of(answer: bytes) -> bytes:
    return answer.split(b"\r\n\r\n", 1)[1]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# -- 1. a web page cannot make the gateway run anything --------------------------------
RCE_MARKER = Path("/tmp") / f"orchgate-pwned-{os.getpid()}"
INLINE_LAUNCH = (
    '{"replicas": [{"id": "x", "engine": "openai", "url": "http://127.0.0.1:1", '
    f'"launch": ["/bin/sh", "-c", "touch {RCE_MARKER}"]}}]}}'
)


def test_no_token_configured_no_reload_for_anyone(open_gw: GatewayProcess) -> None:
    """Before: a no-cors text/plain POST ran the body's argv. After: the control plane is
    closed until an admin token exists, and no body can describe a process anyway."""
    for headers in ({"content-type": "text/plain"}, {"content-type": "application/json"}):
        answer = httpx.post(
            open_gw.url + "/v1/pools/p/reload", content=INLINE_LAUNCH, headers=headers
        )
        assert answer.status_code in (403, 415), answer.text
    answer = httpx.post(open_gw.url + "/v1/pools/p/reload", json={"variant": "two"})
    assert answer.status_code == 403
    assert answer.json()["error"]["code"] == "admin_token_not_configured"
    assert httpx.post(open_gw.url + "/v1/config/reload").status_code == 403
    assert not RCE_MARKER.exists()
    assert "starting managed replica" not in open_gw.log()


def test_the_admin_cannot_be_tricked_into_running_a_body_either(locked_gw: GatewayProcess) -> None:
    for field, value in [
        ("replicas", '[{"id": "x", "engine": "openai", "url": "http://evil.example"}]'),
        ("models", '["x"]'),
        ("launch", '["/bin/sh"]'),
        ("url", '"http://evil.example"'),
        ("api_key_env", '"AWS_SECRET_ACCESS_KEY"'),
        ("model_path", '"/etc/shadow"'),
    ]:
        answer = httpx.post(
            locked_gw.url + "/v1/pools/p/reload",
            content=f'{{"{field}": {value}}}',
            headers={**bearer(ADMIN_T), "content-type": "application/json"},
        )
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["param"] == field
    answer = httpx.post(
        locked_gw.url + "/v1/pools/p/reload",
        content=INLINE_LAUNCH,
        headers={**bearer(ADMIN_T), "content-type": "application/json"},
    )
    assert answer.status_code == 400 and not RCE_MARKER.exists()
    assert "evil.example" not in locked_gw.log()


# -- 2. the data token is not the admin token --------------------------------------------
def test_roles_who_can_do_what(locked_gw: GatewayProcess) -> None:
    url = locked_gw.url
    data, admin = bearer(DATA), bearer(ADMIN_T)
    # the data plane: data token or admin token
    assert httpx.get(url + "/v1/models", headers=data).status_code == 200
    assert httpx.get(url + "/v1/models", headers=admin).status_code == 200
    missing = httpx.get(url + "/v1/models")
    wrong = httpx.get(url + "/v1/models", headers=bearer("guess"))
    for answer in (missing, wrong):  # OpenAI's answer: 401 invalid_api_key
        assert answer.status_code == 401 and answer.json()["error"]["code"] == "invalid_api_key"
    # the control plane: admin only; the data token is recognised and refused
    swap = httpx.post(url + "/v1/pools/p/reload", json={"variant": "two"}, headers=data)
    assert swap.status_code == 403 and swap.json()["error"]["code"] == "admin_token_required"
    assert httpx.post(url + "/v1/pools/p/reload", json={"variant": "two"}).status_code == 401
    assert httpx.post(url + "/v1/config/reload", headers=data).status_code == 403
    # reservations: any data client may hold one; only the admin may force one away
    held = httpx.post(url + "/v1/pools/p/reservation", json={"holder": "eval"}, headers=data)
    assert held.status_code == 201
    forced = httpx.delete(url + "/v1/pools/p/reservation?force=true", headers=data)
    assert forced.status_code == 403
    forced = httpx.delete(url + "/v1/pools/p/reservation?force=true", headers=admin)
    assert forced.status_code == 204
    swap = httpx.post(url + "/v1/pools/p/reload", json={"variant": "two"}, headers=admin)
    assert swap.status_code == 202, swap.text  # a job, followed with the data token too
    job_url = url + swap.headers["location"]
    assert wait_until(lambda: httpx.get(job_url, headers=data).json()["phase"] == "swapped")
    job = httpx.get(job_url, headers=data).json()
    phases = [step["phase"] for step in job["phases"]]
    assert phases[0] == "queued" and "warming_up" in phases and phases[-1] == "swapped"
    assert job["kind"] == "reload" and job["result"]["variant"] == "two"
    back = httpx.post(url + "/v1/pools/p/reload?wait=true", json={"variant": "default"},
                      headers=admin)  # fmt: skip
    assert back.status_code == 200


# -- 3. nothing a client sends becomes a line of an upstream request head ---------------
def test_a_task_id_with_a_newline_is_refused(
    locked_gw: GatewayProcess, upstream: tuple[FakeUpstream, str]
) -> None:
    fake, _ = upstream
    before = len(fake.headers)
    for evil in ("abc\n", "abc\r\nX-Evil: 1", "a\tb", "a b", "x" * 129):
        answer = httpx.post(
            locked_gw.url + "/v1/tasks",
            json={"task_id": evil, "model_ref": "m", "prompt": "hi"},
            headers=bearer(DATA),
        )
        assert answer.status_code == 400, (evil, answer.text)
        assert answer.json()["code"] == "INVALID_PARAMS"
    # a sane one goes through, and the replica sees exactly it
    answer = httpx.post(
        locked_gw.url + "/v1/tasks",
        json={"task_id": "ok-1", "model_ref": "m", "prompt": "hi", "params": {"fake": {}}},
        headers=bearer(DATA),
    )
    assert answer.status_code == 202

    def request_ids() -> list[str]:
        return [
            v for h in fake.headers[before:] for k, v in h.items() if k.lower() == "x-request-id"
        ]

    assert wait_until(lambda: "ok-1" in request_ids())
    assert not any("abc" in rid for rid in request_ids())
    names = {k.lower() for h in fake.headers for k in h}
    assert "x-evil" not in names and "authorization" not in names


def test_generated_task_ids_are_random_uuids(locked_gw: GatewayProcess) -> None:
    ids = []
    for _ in range(3):
        answer = httpx.post(
            locked_gw.url + "/v1/tasks",
            json={"model_ref": "m", "prompt": "hi", "params": {"fake": {}}},
            headers=bearer(DATA),
        )
        assert answer.status_code == 202
        ids.append(answer.json()["task_id"])
    assert all(uuid.UUID(task_id).version == 4 for task_id in ids)
    assert len({task_id[:8] for task_id in ids}) == 3  # no shared, visible prefix


# -- 4, 5. the front door: memory and time bounded before any credential is checked -----
def test_unfinished_headers_cannot_grow_memory(locked_gw: GatewayProcess) -> None:
    """Before: 200 MB of never-ending headers on two connections grew RSS by 1.4 GB."""
    pid = locked_gw.process.pid
    before = rss_kib(pid)
    port = int(locked_gw.url.rsplit(":", 1)[1])
    piece = b"a" * 64 * 1024
    for _ in range(2):
        sent, answer = 0, b""
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: ")
            try:
                while sent < 100 * 1024 * 1024 and not answer:  # 100 MB, unless stopped
                    sock.sendall(piece)
                    sent += len(piece)
                    try:
                        answer = sock.recv(65536, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        pass
            except (BrokenPipeError, ConnectionResetError):
                pass
        assert answer.startswith(b"HTTP/1.1 431"), (sent, answer[:100])
        assert b'"code":"request_header_fields_too_large"' in body_of(answer)
        assert sent < 4 * 1024 * 1024  # answered right after the cap, not at the end
    grown_mib = (rss_kib(pid) - before) / 1024
    assert grown_mib < 20, f"RSS grew by {grown_mib:.0f} MiB"


def test_slowloris_connections_are_closed_at_the_header_deadline(
    locked_gw: GatewayProcess,
) -> None:
    port = int(locked_gw.url.rsplit(":", 1)[1])
    sockets = []
    for i in range(200):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        if i % 2:  # half send part of a head, half nothing at all
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-a: ")
        sockets.append(sock)
    started = time.monotonic()
    try:
        for sock in sockets:
            sock.settimeout(max(0.1, started + 5 - time.monotonic()))
            data = b""
            try:
                while chunk := sock.recv(4096):
                    data += chunk
            except ConnectionResetError:
                pass
            assert not data or data.startswith(b"HTTP/1.1 408"), data[:100]
        took = time.monotonic() - started
        assert took < 4, f"partial connections held for {took:.1f} s"
    finally:
        for sock in sockets:
            sock.close()
    assert httpx.get(locked_gw.url + "/v1/models", headers=bearer(DATA)).status_code == 200


def test_a_stalled_body_is_408(locked_gw: GatewayProcess) -> None:
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Authorization: Bearer " + DATA.encode() + b"\r\n"
        b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"model": '
    )
    started = time.monotonic()
    answer = raw(locked_gw, head)
    assert status_of(answer) == 408 and time.monotonic() - started < 3
    assert b'"code":"request_timeout"' in body_of(answer)


def test_oversize_bodies_get_413_not_a_reset(locked_gw: GatewayProcess) -> None:
    """A declared Content-Length over the limit is answered before the body is read, and
    the connection lingers so the client can read the answer while it is still sending."""
    port = int(locked_gw.url.rsplit(":", 1)[1])
    for path in ("/v1/chat/completions", "/v1/tasks", "/v1/pools/p/reload"):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(
                f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {10 * MAX_BODY}\r\n\r\n".encode()
            )
            try:
                sock.sendall(b"x" * 3 * MAX_BODY)  # the client keeps sending meanwhile
            except (BrokenPipeError, ConnectionResetError):
                pass
            answer = sock.recv(65536)
        assert status_of(answer) == 413, answer[:200]
        if path == "/v1/tasks":
            assert b'"code":"INVALID_PARAMS"' in body_of(answer)  # the task API's envelope
        else:
            assert b'"code":"request_too_large"' in body_of(answer)


def test_connection_cap(open_gw: GatewayProcess, tmp_path: Path) -> None:
    """Past ``max_connections`` (512 here) a new connection is answered 503 and closed."""
    port = int(open_gw.url.rsplit(":", 1)[1])
    held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(520)]
    try:
        last = held[-1]
        last.settimeout(3)
        assert last.recv(4096).startswith(b"HTTP/1.1 503")
    finally:
        for sock in held:
            sock.close()
    assert wait_until(lambda: httpx.get(open_gw.url + "/health").status_code == 200)


# -- 6, 7: bounds on what a client can make the gateway keep -----------------------------
@pytest.mark.parametrize(
    "params",
    [{"n": 128}, {"max_completion_tokens": 100_000_000}, {"n_predict": -1}, {"n": True}],
)
def test_task_budgets_are_guarded_as_on_the_openai_surface(
    locked_gw: GatewayProcess, params: dict[str, Any]
) -> None:
    answer = httpx.post(
        locked_gw.url + "/v1/tasks",
        json={"model_ref": "m", "prompt": "hi", "params": params},
        headers=bearer(DATA),
    )
    assert answer.status_code == 400 and answer.json()["code"] == "INVALID_PARAMS", answer.text


# -- 8. protocol-level and parser errors in the right envelope --------------------------
def test_deep_json_is_a_400_on_both_surfaces(locked_gw: GatewayProcess) -> None:
    deep = b'{"model": "m", "messages": [], "x": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"
    headers = {**bearer(DATA), "content-type": "application/json"}
    chat = httpx.post(locked_gw.url + "/v1/chat/completions", content=deep, headers=headers)
    assert chat.status_code == 400 and chat.json()["error"]["code"] == "invalid_json"
    deep_task = b'{"prompt": "x", "params": {"a": ' + b"[" * 5000 + b"]" * 5000 + b"}}"
    task = httpx.post(locked_gw.url + "/v1/tasks", content=deep_task, headers=headers)
    assert task.status_code == 400 and task.json()["code"] == "INVALID_PARAMS"
    assert "Traceback" not in locked_gw.log()


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header\r\n\r\n",
        # request smuggling: both framings at once
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /v1/models HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -1\r\n\r\n",
    ],
    ids=["garbage", "bad-header-line", "cl-and-te", "negative-length"],
)
def test_malformed_http_is_400_in_the_openai_envelope(
    open_gw: GatewayProcess, request_bytes: bytes
) -> None:
    answer = raw(open_gw, request_bytes)
    assert status_of(answer) == 400, answer[:300]
    assert b'"type":"invalid_request_error"' in body_of(answer)
    assert answer.count(b"HTTP/1.1 ") == 1  # nothing smuggled behind it


def test_auth_is_not_bypassed_by_path_tricks(locked_gw: GatewayProcess) -> None:
    def last_reload() -> Any:
        status = httpx.get(locked_gw.url + "/v1/status", headers=bearer(DATA)).json()
        return status["pools"][0]["lifecycle"]["reload"]

    before = last_reload()
    for path in (
        "/v1//pools/p/reload",
        "/V1/pools/p/reload",
        "/v1/pools/p/reload/",
        "/v1/pools/p/../p/reload",
        "/v1/pools/p/%72eload",
        "//v1/pools/p/reload",
    ):
        answer = raw(
            locked_gw,
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n"
            "Connection: close\r\n\r\n".encode(),
        )
        assert status_of(answer) in (400, 401, 404, 405), (path, answer[:200])
    assert last_reload() == before  # none of them started a reload


# -- 9. smaller leaks ------------------------------------------------------------------
def test_null_stream_options_does_not_duplicate_the_key(
    open_gw: GatewayProcess, upstream: tuple[FakeUpstream, str]
) -> None:
    fake, _ = upstream
    body = (
        b'{"model": "m", "stream": true, "stream_options": null, "fake": {}, '
        b'"messages": [{"role": "user", "content": "hi"}]}'
    )
    answer = httpx.post(
        open_gw.url + "/v1/chat/completions",
        content=body,
        headers={"content-type": "application/json"},
    )
    assert answer.status_code == 200
    sent = fake.bodies[-1]
    assert sent.count(b'"stream_options"') == 1 and b'"include_usage":true' in sent
    assert b'"choices":[]' not in answer.content  # the usage chunk stays hidden


def test_webhook_urls_are_redacted_in_logs(locked_gw: GatewayProcess) -> None:
    swap = httpx.post(
        locked_gw.url + "/v1/pools/p/reload?wait=true", json={"variant": "two"},
        headers=bearer(ADMIN_T),
    )  # fmt: skip
    assert swap.status_code == 200
    assert wait_until(lambda: "webhook swap_complete" in locked_gw.log(), timeout=10)
    assert "XOXB-SECRET-PART" not in locked_gw.log()
    assert "/services/…" in locked_gw.log()
    httpx.post(
        locked_gw.url + "/v1/pools/p/reload?wait=true", json={"variant": "default"},
        headers=bearer(ADMIN_T),
    )  # fmt: skip


def test_npu_worker_refuses_a_public_bind_without_a_token(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "ORCHGATE_WORKER_TOKEN"}
    for extra in ([], ["--allow-remote"]):
        result = subprocess.run(
            [sys.executable, "-m", "gateway", "npu-worker", "--host", "0.0.0.0",
             "--model", str(tmp_path / "none.gguf"), *extra],
            capture_output=True, text=True, timeout=60, cwd=REPO, env=env,
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert "not loopback" in result.stderr


def test_dns_rebinding_is_refused_by_host(open_gw: GatewayProcess) -> None:
    """A rebinding page reaches 127.0.0.1 under its own name: its Host header says so."""
    port = open_gw.url.rsplit(":", 1)[1]
    for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.1.nip.io"):
        answer = httpx.get(open_gw.url + "/v1/models", headers={"Host": host})
        assert answer.status_code == 421, (host, answer.text)
        assert answer.json()["error"]["code"] == "misdirected_request"
        chat = httpx.post(open_gw.url + "/v1/chat/completions", json=CHAT, headers={"Host": host})
        assert chat.status_code == 421
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}"):
        assert httpx.get(open_gw.url + "/v1/models", headers={"Host": host}).status_code == 200


def test_a_state_changing_request_from_another_origin_is_refused(open_gw: GatewayProcess) -> None:
    for headers in (
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
    ):
        answer = httpx.post(open_gw.url + "/v1/chat/completions", json=CHAT, headers=headers)
        assert answer.status_code == 403, (headers, answer.text)
        assert answer.json()["error"]["code"] == "cross_origin_refused"
    same = httpx.post(
        open_gw.url + "/v1/chat/completions",
        json={**CHAT, "fake": {}},
        headers={"Origin": open_gw.url, "Sec-Fetch-Site": "same-origin"},
    )
    assert same.status_code == 200
    # reading is not state-changing: a GET from elsewhere is answered (CORS keeps the
    # browser from handing the answer to the page)
    assert (
        httpx.get(open_gw.url + "/v1/models", headers={"Origin": "http://evil.example"}).status_code
        == 200
    )


def test_engine_output_reaches_the_log_only_at_debug(
    gateway_factory: Any, capfd: pytest.CaptureFixture[str]
) -> None:
    """An engine may print what it serves (llama-server -v prints prompts)."""
    import logging

    canary = "CANARY-ENGINE-OUTPUT-1f2e"
    launch = ["{python}", "-c", f"import time; print('{canary}', flush=True); time.sleep(60)"]
    replica = {"id": "r0", "engine": "openai", "url": f"http://127.0.0.1:{free_port()}"}
    logger = logging.getLogger("orchgate")
    for level, shown in ((logging.INFO, False), (logging.DEBUG, True)):
        previous = logger.level
        logger.setLevel(level)
        try:
            config = {
                "pools": [{"id": "p", "models": ["m"], "replicas": [{**replica, "launch": launch}]}]
            }
            with gateway_factory(config) as gw:
                process = gw.state.pools["p"].processes[0]
                tail = process.tail
                assert wait_until(lambda t=tail: any(canary in line for line in t), timeout=20)
        finally:
            logger.setLevel(previous)
        assert (canary in capfd.readouterr().err) is shown
