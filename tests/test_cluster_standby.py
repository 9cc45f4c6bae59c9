"""``[cluster] mode = "standby"`` with a real ``redis-server`` and three real ``orchgate
serve`` processes on loopback, in front of one fake engine.

One node leads (``/ready`` 200) and serves; the standbys answer 503 with ``Retry-After`` and
the leader's name. The leader SIGKILLed mid-stream: another node is ready within the lease
(≤ 6 s with the defaults). A leader stopped gracefully resigns: the next one leads within a
heartbeat or two. Redis frozen: the leader steps down by its own clock before its lease can
expire (no two leaders), and a node leads again once Redis answers. Without ``[cluster]``
the Redis client is never imported.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway.config import ConfigError, config_from_mapping
from tests.browser import Browser
from tests.conftest import REPO, RedisServer, free_port
from tests.fakes.servers import GatewayProcess, gateway_process, wait_until
from tests.sse import parse_task_frames

pytestmark = pytest.mark.slow  # three gateway processes and a redis-server

NODES = ("gw-a", "gw-b", "gw-c")


def node_config(directory: Path, node: str, port: int, upstream: str, redis_url: str) -> Path:
    directory.mkdir()
    path = directory / "orchgate.toml"
    path.write_text(
        f"""
[server]
bind = "127.0.0.1:{port}"

[cluster]
mode = "standby"
url = "{redis_url}"
node_id = "{node}"

[[pools]]
id = "p"
models = ["m"]

[[pools.replicas]]
id = "fake"
engine = "openai"
url = "{upstream}"
slots = 8
"""
    )
    return path


@pytest.fixture
def nodes(
    fake_upstream: Any, redis_server: RedisServer, tmp_path: Path
) -> Iterator[dict[str, GatewayProcess]]:
    """Three standby-mode gateways on one redis-server, in front of one fake engine."""
    _, upstream = fake_upstream
    with ExitStack() as stack:
        running = {}
        for node in NODES:
            port = free_port()
            config = node_config(tmp_path / node, node, port, upstream.url, redis_server.url)
            running[node] = stack.enter_context(gateway_process(config, port))
        yield running


def leaders(nodes: dict[str, GatewayProcess]) -> list[str]:
    return [name for name, gw in nodes.items() if gw.process.poll() is None and gw.serving()]


def one_leader(nodes: dict[str, GatewayProcess], timeout: float = 10) -> str:
    assert wait_until(lambda: len(leaders(nodes)) == 1, timeout=timeout), leaders(nodes)
    return leaders(nodes)[0]


def chat(gateway: GatewayProcess) -> httpx.Response:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    return httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=10)


def test_one_leader_serves_and_the_standbys_point_to_it(nodes: dict[str, GatewayProcess]) -> None:
    leader = one_leader(nodes)
    client = openai.OpenAI(base_url=nodes[leader].url + "/v1", api_key="x", max_retries=0)
    answer = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content
    for name, gw in nodes.items():
        health = httpx.get(gw.url + "/health", timeout=5)
        assert health.status_code == 200  # every node is alive and its pools are ready
        view = health.json()["cluster"]
        assert view["node"] == name and view["leader"] == leader
        if name == leader:
            assert view["role"] == "leader" and view["epoch"] >= 1
            metrics = httpx.get(gw.url + "/metrics", timeout=5).text
            assert f'orchgate_cluster_leader{{node="{name}"}} 1.0' in metrics
            continue
        assert view["role"] == "standby" and view["epoch"] is None
        refused = chat(gw)
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "1"
        assert refused.headers["x-orchgate-leader"] == leader
        assert refused.json()["error"]["code"] == "not_leader"
        assert httpx.get(gw.url + "/ready", timeout=5).json()["pools_ready"] is True
        metrics = httpx.get(gw.url + "/metrics", timeout=5)
        assert f'orchgate_cluster_leader{{node="{name}"}} 0.0' in metrics.text
    standby = next(gw for name, gw in nodes.items() if name != leader)
    with Browser() as browser:  # the status page says what a standby is, and who leads
        browser.goto(standby.url + "/status")
        assert browser.wait_for(lambda: f"the leader is {leader}" in browser.text()), browser.text()
        assert "standby" in browser.text()


def test_the_leader_killed_mid_stream_is_replaced_within_the_lease(
    nodes: dict[str, GatewayProcess],
) -> None:
    first = one_leader(nodes)
    cut: list[BaseException] = []

    def stream() -> None:
        body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}],
                "fake": {"chunks": 200, "delay_s": 0.05}}  # fmt: skip
        try:
            with httpx.stream("POST", nodes[first].url + "/v1/chat/completions", json=body,
                              timeout=30) as response:  # fmt: skip
                for _ in response.iter_bytes():
                    pass
        except httpx.HTTPError as exc:
            cut.append(exc)

    streaming = threading.Thread(target=stream)
    streaming.start()
    assert wait_until(lambda: nodes[first].process.poll() is None, timeout=1)
    time.sleep(0.5)  # mid-stream
    killed_at = time.monotonic()
    nodes[first].process.send_signal(signal.SIGKILL)
    nodes[first].process.wait()
    second = one_leader(nodes, timeout=10)
    took = time.monotonic() - killed_at
    print(f"standby failover after SIGKILL: {took:.2f} s")
    assert second != first and took <= 6.0, took
    streaming.join(timeout=10)
    assert cut, "the stream through the killed node ended without an error"
    assert chat(nodes[second]).status_code == 200

    # a graceful stop resigns the lead: the last node takes it within a heartbeat or two
    stopped_at = time.monotonic()
    nodes[second].process.terminate()
    third = one_leader(nodes, timeout=10)
    handover = time.monotonic() - stopped_at
    print(f"graceful handover: {handover:.2f} s")
    assert third not in (first, second) and handover <= 3.0
    assert chat(nodes[third]).status_code == 200


def test_tasks_outlive_their_leader(nodes: dict[str, GatewayProcess]) -> None:
    """Task events are stored in Redis before a client sees them: after the leader is
    SIGKILLed, the next one serves a finished task's stream byte for byte, and a task that
    was running resumes from the client's Last-Event-ID with what it missed, then ends with
    a retriable WORKER_RESET -- every id the client already held has the same content."""
    first = one_leader(nodes)
    url = nodes[first].url

    def submit(chunks: int, delay_s: float) -> str:
        body = {"model_ref": "m", "prompt": "hi", "max_tokens": chunks,
                "params": {"fake": {"chunks": chunks, "delay_s": delay_s}}}  # fmt: skip
        accepted = httpx.post(url + "/v1/tasks", json=body, timeout=10)
        assert accepted.status_code == 202, accepted.text
        return str(accepted.json()["task_id"])

    done = submit(5, 0.0)
    done_raw = httpx.get(f"{url}/v1/tasks/{done}/stream", timeout=10).content
    assert parse_task_frames(done_raw)[-1][1] == "end"
    running = submit(400, 0.02)
    seen = b""
    with httpx.stream("GET", f"{url}/v1/tasks/{running}/stream", timeout=10) as response:
        for chunk in response.iter_bytes():
            seen += chunk
            if seen.count(b"event: token") >= 5 and seen.endswith(b"\n\n"):
                break
    held = parse_task_frames(seen)
    nodes[first].process.send_signal(signal.SIGKILL)
    nodes[first].process.wait()
    second = one_leader(nodes, timeout=10)
    url = nodes[second].url

    assert httpx.get(f"{url}/v1/tasks/{done}/stream", timeout=10).content == done_raw
    assert httpx.get(f"{url}/v1/tasks/{done}", timeout=10).json()["state"] == "completed"
    resumed = httpx.get(f"{url}/v1/tasks/{running}/stream", timeout=10,
                        headers={"Last-Event-ID": str(held[-1][0])})  # fmt: skip
    rest = parse_task_frames(resumed.content)
    assert rest[0][0] == held[-1][0] + 1, (held[-1], rest[:2])
    assert rest[-1][1] == "error" and rest[-1][2]["code"] == "WORKER_RESET"
    assert rest[-1][2]["retriable"] is True
    whole = parse_task_frames(httpx.get(f"{url}/v1/tasks/{running}/stream", timeout=10).content)
    assert whole[: len(held)] == held and whole[len(held) :] == rest  # same ids, same bytes
    view = httpx.get(f"{url}/v1/tasks/{running}", timeout=10).json()
    assert view["state"] == "failed" and view["error"]["code"] == "WORKER_RESET"
    late = httpx.post(f"{url}/v1/tasks/{running}/cancel", timeout=10)
    assert late.status_code == 409 and "already failed" in late.json()["message"], late.text
    assert httpx.post(f"{url}/v1/tasks/no-such-task/cancel", timeout=10).status_code == 404


def test_a_reservation_outlives_its_leader(nodes: dict[str, GatewayProcess]) -> None:
    """Granted on one leader, honoured by the next: the holder keeps it (its token still
    works, others get 409), and it ends when the holder releases it there."""
    first = one_leader(nodes)
    url = f"{nodes[first].url}/v1/pools/p/reservation"
    granted = httpx.post(url, json={"holder": "bench-7", "ttl_s": 60}, timeout=5)
    assert granted.status_code == 201, granted.text
    token = granted.json()["token"]
    nodes[first].process.send_signal(signal.SIGKILL)
    nodes[first].process.wait()
    second = one_leader(nodes, timeout=10)
    url = f"{nodes[second].url}/v1/pools/p/reservation"
    held = httpx.get(url, timeout=5).json()
    assert held["reserved"] is True and held["holder"] == "bench-7"
    assert 40 < held["expires_in_s"] <= 60
    other = httpx.post(url, json={"holder": "someone-else", "ttl_s": 60}, timeout=5)
    assert other.status_code == 409, other.text
    renewed = httpx.post(url, json={"holder": "bench-7", "ttl_s": 30},
                         headers={"X-Reservation-Token": token}, timeout=5)  # fmt: skip
    assert renewed.status_code == 200 and renewed.json()["token"] == token
    wrong = httpx.delete(url, headers={"X-Reservation-Token": "guess"}, timeout=5)
    assert wrong.status_code == 423
    released = httpx.delete(url, headers={"X-Reservation-Token": token}, timeout=5)
    assert released.status_code == 204
    assert httpx.get(url, timeout=5).json()["reserved"] is False


def test_redis_frozen_the_leader_steps_down_before_its_lease_ends(
    nodes: dict[str, GatewayProcess], redis_server: RedisServer
) -> None:
    leader = one_leader(nodes)
    redis_server.pause()
    paused_at = time.monotonic()
    try:
        # by its own clock: 0.7 x the 5 s lease after its last renewal
        assert wait_until(lambda: not leaders(nodes), timeout=6)
        stepped_down = time.monotonic() - paused_at
        print(f"leader stepped down {stepped_down:.2f} s after Redis froze")
        assert stepped_down < 5.0  # before the lease could have ended
        refused = chat(nodes[leader])
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "not_leader"
        view = httpx.get(nodes[leader].url + "/health", timeout=5).json()["cluster"]
        assert view["store_reachable"] is False
    finally:
        redis_server.resume()
    assert one_leader(nodes, timeout=12)


def test_without_a_cluster_section_redis_is_never_imported() -> None:
    probe = (
        "import sys\n"
        "from gateway.app import create_app\n"
        "from gateway.config import config_from_mapping\n"
        "create_app(config_from_mapping({'pools': [{'id': 'p', 'models': ['m'], 'replicas': "
        "[{'id': 'r', 'engine': 'openai', 'url': 'http://127.0.0.1:1'}]}]}, env={}))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('redis', 'hiredis')))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    assert out.strip() == "[]", out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"cluster": {"lease_s": 2, "heartbeat_s": 1.5}}, "heartbeat_s"),
        ({"cluster": {"url": "http://x"}}, "cluster.url"),
        ({"cluster": {}, "catalog": {"dirs": []}}, "[catalog]"),
        ({"cluster": {"mode": "both"}}, "mode"),
    ],
)
def test_cluster_config_is_checked(extra: dict[str, Any], message: str) -> None:
    replica = {"id": "r", "engine": "openai", "url": "http://h:1"}
    base = {"pools": [{"id": "p", "models": ["m"], "replicas": [replica]}]}
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        config_from_mapping({**base, **extra}, env={})
    managed = {"id": "r", "engine": "llamacpp", "url": "http://127.0.0.1:{port}", "launch": ["x"]}
    with pytest.raises(ConfigError, match="launch"):
        pools = [{"id": "p", "models": ["m"], "replicas": [managed]}]
        config_from_mapping({"cluster": {}, "pools": pools}, env={})
