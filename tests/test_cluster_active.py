"""``[cluster] mode = "active"`` with a real ``redis-server`` and three real ``orchgate
serve`` processes on loopback, in front of two fake engines of 4 slots each.

The design study's acceptance scenarios (``../shared/reference/scale-out.md``): a
synchronised burst of 90 requests over the three nodes with ``queue_capacity = 16`` admits
exactly 24 (8 running, 16 queued) and refuses 66 with the same ``Retry-After`` on every
node, never more than 4 at once on either engine; a node SIGKILLed while holding every slot
has its leases reaped within the lease; a task running on one node streams from, and is
cancelled through, another, with no token after the 204.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import RedisServer, free_port, serve_aiohttp
from tests.fakes.servers import GatewayProcess, gateway_process, wait_until
from tests.fakes.upstream import FakeUpstream
from tests.sse import parse_task_frames

pytestmark = pytest.mark.slow  # three gateway processes and a redis-server

NODES = ("gw-a", "gw-b", "gw-c")
LEASE_S = 2.0


def node_config(directory: Path, node: str, port: int, upstreams: list[str], redis: str) -> Path:
    directory.mkdir()
    replicas = "".join(
        f"""
[[pools.replicas]]
id = "e{i}"
engine = "openai"
url = "{url}"
slots = 4
"""
        for i, url in enumerate(upstreams, 1)
    )
    path = directory / "orchgate.toml"
    path.write_text(
        f"""
[server]
bind = "127.0.0.1:{port}"
max_connections = 512

[cluster]
mode = "active"
url = "{redis}"
node_id = "{node}"
lease_s = {LEASE_S}
heartbeat_s = 0.5

[[pools]]
id = "p"
models = ["m"]
queue_capacity = 16
queue_timeout_s = 60
health_interval_s = 0.5
{replicas}"""
    )
    return path


@pytest.fixture
def engines() -> Iterator[list[FakeUpstream]]:
    fakes = [FakeUpstream(), FakeUpstream()]
    with ExitStack() as stack:
        servers = [stack.enter_context(serve_aiohttp(f.app)) for f in fakes]
        for fake, server in zip(fakes, servers, strict=True):
            fake.url = server.url  # type: ignore[attr-defined]
        yield fakes


@pytest.fixture
def nodes(
    engines: list[FakeUpstream], redis_server: RedisServer, tmp_path: Path
) -> Iterator[dict[str, GatewayProcess]]:
    urls = [e.url for e in engines]  # type: ignore[attr-defined]
    with ExitStack() as stack:
        running = {}
        for node in NODES:
            port = free_port()
            config = node_config(tmp_path / node, node, port, urls, redis_server.url)
            running[node] = stack.enter_context(gateway_process(config, port))
        assert wait_until(lambda: all(gw.serving() for gw in running.values()), timeout=10)
        yield running


def _body(delay_s: float) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "fake": {"mode": "json", "delay_s": delay_s}}  # fmt: skip


async def _burst(urls: list[str], per_node: int, delay_s: float) -> list[httpx.Response]:
    """``per_node`` requests on each node, sent at once over connections opened before."""
    limits = httpx.Limits(max_connections=per_node, max_keepalive_connections=per_node)
    clients = [httpx.AsyncClient(base_url=u, limits=limits, timeout=60) for u in urls]
    try:
        # open every connection first, so the burst is the requests, not the handshakes
        await asyncio.gather(*(c.get("/health") for c in clients for _ in range(per_node)))
        calls = [c.post("/v1/chat/completions", json=_body(delay_s))
                 for c in clients for _ in range(per_node)]  # fmt: skip
        return list(await asyncio.gather(*calls))
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))


def test_a_burst_over_three_nodes_admits_exactly_the_capacity(
    nodes: dict[str, GatewayProcess], engines: list[FakeUpstream]
) -> None:
    urls = [gw.url for gw in nodes.values()]
    # each admitted request holds its slot 3 s: the whole burst lands long before one ends
    answers = asyncio.run(_burst(urls, per_node=30, delay_s=3.0))
    codes = [a.status_code for a in answers]
    admitted, refused = codes.count(200), codes.count(429)
    print(f"burst of 90 over 3 nodes: {admitted} admitted, {refused} refused, "
          f"peaks {[e.peak for e in engines]}")  # fmt: skip
    assert (admitted, refused) == (24, 66), codes
    assert all(e.peak <= 4 for e in engines), [e.peak for e in engines]
    assert sum(e.peak for e in engines) == 8  # and every slot was used
    waits = [int(a.headers["retry-after"]) for a in answers if a.status_code == 429]
    assert max(waits) - min(waits) <= 1, sorted(set(waits))
    by_node = [sum(1 for a in answers[i * 30 : (i + 1) * 30] if a.status_code == 200)
               for i in range(3)]  # fmt: skip
    assert sum(by_node) == 24  # any node may have won any place
    for gw in nodes.values():  # every lease given back: the shared queue is empty
        view = httpx.get(gw.url + "/health", timeout=5).json()["cluster"]
        assert view["role"] == "member" and view["pools"]["p"]["queued_cluster_wide"] == 0
        metrics = httpx.get(gw.url + "/metrics", timeout=5).text
        assert 'orchgate_cluster_member{node="' in metrics


def test_a_killed_nodes_leases_are_reaped_within_the_lease(
    nodes: dict[str, GatewayProcess], engines: list[FakeUpstream]
) -> None:
    doomed, survivor = nodes["gw-c"], nodes["gw-a"]
    holding: list[threading.Thread] = []
    for _ in range(8):  # every slot, held for a minute by the node about to die
        thread = threading.Thread(target=_post_quietly, args=(doomed.url, 60.0), daemon=True)
        thread.start()
        holding.append(thread)
    assert wait_until(lambda: sum(e.active for e in engines) == 8, timeout=10)
    waited: list[httpx.Response] = []
    waiting = threading.Thread(target=lambda: waited.append(httpx.post(
        survivor.url + "/v1/chat/completions", json=_body(0.0), timeout=30)))  # fmt: skip
    waiting.start()
    time.sleep(0.3)  # queued behind the dead node's leases
    killed = time.monotonic()
    doomed.process.send_signal(signal.SIGKILL)
    doomed.process.wait()
    waiting.join(timeout=15)
    took = time.monotonic() - killed
    print(f"leases of a SIGKILLed node reaped and reused after {took:.2f} s")
    assert waited and waited[0].status_code == 200, waited and waited[0].text
    assert took <= LEASE_S + 0.5 + 0.5, took  # the lease, one sync, the answer
    view = httpx.get(survivor.url + "/health", timeout=5).json()["cluster"]
    reaped = view["pools"]["p"]["reaped"]
    others = httpx.get(nodes["gw-b"].url + "/health", timeout=5).json()["cluster"]
    assert reaped + others["pools"]["p"]["reaped"] == 8  # each lease reaped exactly once


def _post_quietly(url: str, delay_s: float) -> None:
    try:
        httpx.post(url + "/v1/chat/completions", json=_body(delay_s), timeout=90)
    except httpx.HTTPError:
        pass  # its gateway was killed


def test_a_task_streams_and_is_cancelled_through_another_node(
    nodes: dict[str, GatewayProcess],
) -> None:
    owner, other = nodes["gw-a"].url, nodes["gw-b"].url
    body = {"model_ref": "m", "prompt": "hi", "max_tokens": 400,
            "params": {"fake": {"chunks": 400, "delay_s": 0.02}}}  # fmt: skip
    accepted = httpx.post(owner + "/v1/tasks", json=body, timeout=10)
    assert accepted.status_code == 202, accepted.text
    task_id = accepted.json()["task_id"]
    seen = b""
    with httpx.stream("GET", f"{other}/v1/tasks/{task_id}/stream", timeout=10) as response:
        assert response.status_code == 200
        chunks = response.iter_bytes()
        for chunk in chunks:
            seen += chunk
            if seen.count(b"event: token") >= 5 and seen.endswith(b"\n\n"):
                break
        cancelled = httpx.post(f"{other}/v1/tasks/{task_id}/cancel", timeout=10)
        assert cancelled.status_code == 204, cancelled.text
        # by the 204 the task has ended in the log: nothing is added to it afterwards
        at_204 = httpx.get(f"{nodes['gw-c'].url}/v1/tasks/{task_id}/stream", timeout=10)
        after_cancel = b"".join(chunks)
    frames = parse_task_frames(seen + after_cancel)
    kinds = [kind for _, kind, _ in frames]
    assert kinds[-1] == "end" and frames[-1][2].get("cancelled") is True, frames[-1]
    assert kinds.count("token") < 400
    # the whole log, read on a third node: the same events, ids in order, ended cancelled
    time.sleep(0.3)
    whole = parse_task_frames(
        httpx.get(f"{nodes['gw-c'].url}/v1/tasks/{task_id}/stream", timeout=10).content
    )
    assert whole == frames == parse_task_frames(at_204.content)
    assert [i for i, _, _ in whole] == list(range(1, len(whole) + 1))
    assert httpx.get(f"{other}/v1/tasks/{task_id}", timeout=10).json()["state"] == "cancelled"
    assert httpx.post(f"{owner}/v1/tasks/{task_id}/cancel", timeout=10).status_code == 204

    # a task that runs to its end, followed from another node while it runs: every event,
    # the same bytes as on its own node
    body["params"] = {"fake": {"chunks": 40, "delay_s": 0.02}}
    short = httpx.post(owner + "/v1/tasks", json=body, timeout=10).json()["task_id"]
    followed = httpx.get(f"{other}/v1/tasks/{short}/stream", timeout=20).content
    assert parse_task_frames(followed)[-1][1] == "end"
    assert followed == httpx.get(f"{owner}/v1/tasks/{short}/stream", timeout=10).content


def test_redis_frozen_under_load_refuses_fast_and_never_overfills(
    nodes: dict[str, GatewayProcess], engines: list[FakeUpstream], redis_server: RedisServer
) -> None:
    """Redis SIGSTOPped for 10 s while every node takes requests: no request waits on it
    longer than the command timeout (0.5 s by default) and a little, the engines never
    hold more than their slots, and every node admits again once Redis answers."""
    stop = threading.Event()
    timings: list[tuple[float, int, float]] = []  # (sent, status, seconds)

    def load(url: str) -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            while not stop.is_set():
                sent = time.monotonic()
                status = client.post("/v1/chat/completions", json=_body(0.05)).status_code
                timings.append((sent, status, time.monotonic() - sent))

    threads = [threading.Thread(target=load, args=(gw.url,)) for gw in nodes.values()
               for _ in range(3)]  # fmt: skip
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    redis_server.pause()
    frozen = time.monotonic()
    time.sleep(10.0)
    redis_server.resume()
    thawed = time.monotonic()
    assert wait_until(lambda: all(gw.serving() for gw in nodes.values()), timeout=10)
    rejoined = time.monotonic()
    time.sleep(2.0)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    during = [(status, took) for sent, status, took in timings if frozen <= sent < thawed]
    slowest = max(took for _, took in during)
    refused = sum(1 for status, _ in during if status == 503)
    print(f"Redis frozen 10 s: {len(during)} requests meanwhile, {refused} refused (503), "
          f"slowest {slowest * 1000:.0f} ms; peaks {[e.peak for e in engines]}")  # fmt: skip
    assert {status for status, _ in during} <= {200, 503}
    assert slowest <= 0.5 + 0.05 + 0.25, slowest  # the timeout, the upstream's 50 ms, slack
    assert all(e.peak <= 4 for e in engines)
    after = [status for sent, status, _ in timings if sent > rejoined + 1.0]  # breaker shut
    assert after and all(status == 200 for status in after), after[-5:]
