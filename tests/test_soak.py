"""A bounded soak: 64 concurrent clients for about a minute against the real gateway
process, with random upstream faults and random client disconnects on both surfaces.

Asserts what users and operators would: no gateway-made 5xx (a 500 the upstream itself
sent is passed on and counted apart), no hung client, no task left unfinished, queue and
slots back to zero, and the gateway's RSS flat between warm-up and the end.
``ORCHGATE_SOAK_S`` changes the duration (default 60).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import msgspec
import pytest

from tests.conftest import free_port
from tests.fakes.servers import gateway_process, wait_until
from tests.fakes.upstream import FakeUpstream

pytestmark = pytest.mark.slow  # a 60 s soak

CLIENTS = 64
DURATION_S = float(os.environ.get("ORCHGATE_SOAK_S", "60"))
WARMUP_S = min(30.0, DURATION_S / 2)  # allocator pools fill in the first ~30 s
CLIENT_TIMEOUT_S = 20.0  # far above every gateway limit: hitting it means a hung client
MSG = [{"role": "user", "content": "hi"}]

FAULTS: list[dict[str, Any] | None] = [
    None, None, None, None, None, None,
    {"mode": "status", "status": 500},
    {"mode": "status", "status": 503, "retry_after": 0},
    {"mode": "status", "status": 429, "retry_after": 0},
    {"mode": "reset_before_headers"},
    {"mode": "reset_after", "chunks": 2},
    {"mode": "error_event", "chunks": 2},
    {"mode": "llamacpp_error", "chunks": 2},
    {"mode": "no_done", "chunks": 2},
    {"mode": "hang"},
    {"mode": "drip", "chunks": 3, "delay_s": 1.0},
]  # fmt: skip


def write_config(path: Path, upstream_url: str, port: int) -> None:
    replicas = "".join(
        f"""
[[pools.replicas]]
id = "{name}"
engine = "openai"
url = "{upstream_url}"
slots = 8
"""
        for name in ("r0", "r1")
    )
    path.write_text(
        f"""
[server]
bind = "127.0.0.1:{port}"
access_log = false

[tasks]
retention_s = 5  # finished tasks are kept this long by design; keep that out of the RSS

[[pools]]
id = "p"
models = ["m"]
queue_capacity = 32
queue_timeout_s = 10
health_interval_s = 0.5

[pools.timeouts]
first_token_s = 0.5
idle_s = 0.5
total_s = 8

[pools.ejection]
consecutive_failures = 8
cooldown_s = 1
max_cooldown_s = 4
{replicas}"""
    )


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class Tally:
    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()
        self.problems: list[str] = []
        self.task_ids: list[str] = []

    def status(self, surface: str, status: int, body: bytes) -> None:
        """A 5xx is fine only as a well-formed answer about the upstream: the upstream's
        own 500 passed on, or 502/503/504 once the retries ran out."""
        if status >= 500 and not _upstream_answer(status, body):
            self.problems.append(f"{surface}: HTTP {status}: {body[:200]!r}")
        self.outcomes[f"{surface} {status}"] += 1


def _upstream_answer(status: int, body: bytes) -> bool:
    try:
        decoded = msgspec.json.decode(body)
        error = decoded.get("error", decoded)  # OpenAI envelope, or the task API's flat one
        message = error["message"]
    except (msgspec.DecodeError, KeyError, TypeError, AttributeError):
        return False
    if status == 500:
        return "fake failure" in message
    return status in (502, 503, 504) and "internal gateway error" not in message


async def backoff(response: aiohttp.ClientResponse) -> None:
    """Like the SDKs: a refused client waits what the gateway asked (capped, jittered)."""
    if response.status in (429, 503):
        wait_ms = float(response.headers.get("retry-after-ms", "100"))
        await asyncio.sleep(random.uniform(0.5, 1.0) * min(wait_ms / 1000, 1.0))


async def openai_client(session: aiohttp.ClientSession, url: str, tally: Tally) -> None:
    fault = random.choice(FAULTS)
    stream = random.random() < 0.7
    body: dict[str, Any] = {"model": "m", "messages": MSG, "stream": stream}
    if fault is not None:
        body["fake"] = fault
    elif stream:
        body["fake"] = {"chunks": random.randint(1, 20), "delay_s": 0.01}
    leave_after = random.random() < 0.15  # a client that walks away mid-request
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        if leave_after:
            await asyncio.sleep(random.uniform(0, 0.2))
            tally.outcomes["openai left"] += 1
            response.close()
            return
        raw = await response.read()
    tally.status("openai", response.status, raw)
    await backoff(response)
    if response.status == 200 and stream and not raw.endswith(b"data: [DONE]\n\n"):
        tally.problems.append(f"stream without [DONE]: {raw[-200:]!r}")


async def task_client(session: aiohttp.ClientSession, url: str, tally: Tally) -> None:
    fault = random.choice(FAULTS)
    params = {"fake": fault} if fault else {"fake": {"chunks": 5, "delay_s": 0.01}}
    async with session.post(
        url + "/v1/tasks", json={"model_ref": "m", "prompt": "x", "params": params}
    ) as response:
        raw = await response.read()
    tally.status("task-submit", response.status, raw)
    if response.status != 202:
        await backoff(response)
        return
    task_id = msgspec.json.decode(raw)["task_id"]
    tally.task_ids.append(task_id)
    roll = random.random()
    if roll < 0.15:
        await asyncio.sleep(random.uniform(0, 0.3))
        async with session.post(f"{url}/v1/tasks/{task_id}/cancel") as response:
            await response.read()
            tally.outcomes[f"task-cancel {response.status}"] += 1
            if response.status not in (204, 409):
                tally.problems.append(f"cancel: HTTP {response.status}")
        return
    async with session.get(f"{url}/v1/tasks/{task_id}/stream") as response:
        if roll < 0.3:  # attach, then walk away
            await asyncio.sleep(random.uniform(0, 0.2))
            response.close()
            tally.outcomes["task left"] += 1
            return
        raw = await response.read()
    last = [f for f in raw.split(b"\n\n") if f and not f.startswith(b":")][-1]
    kind = next(line for line in last.split(b"\n") if line.startswith(b"event: "))[7:].decode()
    tally.outcomes[f"task {kind}"] += 1
    if kind not in ("end", "error"):
        tally.problems.append(f"task stream ended with {kind!r}")


async def client_loop(url: str, deadline: float, tally: Tally) -> None:
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while time.monotonic() < deadline:
            kind = openai_client if random.random() < 0.6 else task_client
            try:
                await kind(session, url, tally)
            except TimeoutError:
                tally.problems.append(f"{kind.__name__}: client timed out (hung)")
            except aiohttp.ClientError as exc:
                tally.problems.append(f"{kind.__name__}: {type(exc).__name__}: {exc}")


async def soak(url: str, pid: int) -> tuple[Tally, list[tuple[float, int]]]:
    tally = Tally()
    started = time.monotonic()
    samples: list[tuple[float, int]] = []

    async def sample() -> None:
        while time.monotonic() - started < DURATION_S:
            samples.append((time.monotonic() - started, rss_kib(pid)))
            await asyncio.sleep(1)

    sampler = asyncio.create_task(sample())
    await asyncio.gather(*(client_loop(url, started + DURATION_S, tally) for _ in range(CLIENTS)))
    await sampler
    return tally, samples


def test_soak_random_faults_and_disconnects(fake_upstream: Any, tmp_path: Path) -> None:
    random.seed(20261123)
    fake: FakeUpstream = fake_upstream[0]
    port = free_port()
    config = tmp_path / "orchgate.toml"
    write_config(config, fake_upstream[1].url, port)
    with gateway_process(config, port, args=["--log-level", "error"]) as gateway:
        url = gateway.url
        began = time.monotonic()
        tally, samples = asyncio.run(soak(url, gateway.process.pid))
        ran_s = time.monotonic() - began
        requests = sum(tally.outcomes.values())
        # everything settles: no queue, no slot, no running task, no open upstream request
        assert wait_until(lambda: _settled(url), timeout=15), _health(url)
        assert wait_until(lambda: fake.active == 0, timeout=5)
        with httpx.Client(base_url=url, timeout=5) as client:
            unfinished = [t for t in tally.task_ids if not _task_finished(client, t)]
        warm = [rss for t, rss in samples if t >= WARMUP_S]
        growth_kib = warm[-1] - warm[0]
        report = (
            f"{requests} requests in {ran_s:.0f}s by {CLIENTS} clients; RSS after warm-up "
            f"{warm[0] / 1024:.1f} MiB -> end {warm[-1] / 1024:.1f} MiB "
            f"(peak {max(warm) / 1024:.1f}); every 10 s: "
            f"{' '.join(f'{rss / 1024:.1f}' for t, rss in samples[::10])} MiB; "
            f"outcomes {dict(sorted(tally.outcomes.items()))}"
        )
        print(report)
        (tmp_path / "soak.txt").write_text(report)
        assert not tally.problems, tally.problems[:20]
        assert not unfinished, unfinished[:10]
        assert requests > DURATION_S * 20, report  # it really ran under load
        assert growth_kib < 4 * 1024, report  # flat: 180 s runs grow ~0.4 MiB after 30 s
        assert "Traceback" not in gateway.log(), gateway.log()[-3000:]


def _health(url: str) -> dict[str, Any] | None:
    try:
        return httpx.get(url + "/health", timeout=2).json()
    except httpx.HTTPError:
        return None


def _settled(url: str) -> bool:
    health = _health(url)
    if health is None:
        return False
    pool = health["pools"]["p"]
    return pool["queue_depth"] == 0 and pool["slots_in_use"] == 0 and health["tasks_active"] == 0


def _task_finished(client: httpx.Client, task_id: str) -> bool:
    """Finished, or finished and already past ``retention_s`` (only finished tasks expire)."""
    response = client.get(f"/v1/tasks/{task_id}")
    if response.status_code == 404:
        return True
    return response.json()["state"] in ("completed", "failed", "cancelled")
