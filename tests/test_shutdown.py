"""Graceful shutdown of the real ``orchgate serve`` process on SIGTERM.

Running streams that end within the grace period end normally; longer ones get an in-band
error and ``[DONE]`` when it runs out; queued requests and queued tasks are refused at
once with a retriable 503; nothing new is accepted; every upstream connection is closed.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port
from tests.fakes.servers import gateway_process, wait_until
from tests.fakes.upstream import FakeUpstream
from tests.prom import scrape
from tests.sse import read_task_events

pytestmark = pytest.mark.slow  # a real orchgate serve process, signals, a 2 s grace

GRACE_S = 2.0
MSG = [{"role": "user", "content": "hi"}]


def write_config(path: Path, upstream_url: str, port: int) -> None:
    path.write_text(
        f"""
[server]
bind = "127.0.0.1:{port}"
shutdown_grace_s = {GRACE_S}

[[pools]]
id = "p"
models = ["m"]
queue_capacity = 8

[[pools.replicas]]
id = "f0"
engine = "openai"
url = "{upstream_url}"
slots = 3
"""
    )


def stream_body(chunks: int, delay_s: float) -> dict[str, Any]:
    return {
        "model": "m",
        "messages": MSG,
        "stream": True,
        "fake": {"mode": "stream", "chunks": chunks, "delay_s": delay_s},
    }


class Recorder(threading.Thread):
    """Runs one client call in the background and keeps what it saw."""

    def __init__(self, fn: Any) -> None:
        super().__init__(daemon=True)
        self.fn = fn
        self.result: Any = None
        self.finished_at = 0.0

    def run(self) -> None:
        try:
            self.result = self.fn()
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            self.result = exc
        self.finished_at = time.monotonic()


def raw_stream(url: str, body: dict[str, Any]) -> tuple[int, bytes]:
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
        return r.status_code, b"".join(r.iter_bytes())


def test_sigterm_drains_gracefully(fake_upstream: Any, tmp_path: Path) -> None:
    fake: FakeUpstream = fake_upstream[0]
    port = free_port()
    config = tmp_path / "orchgate.toml"
    write_config(config, fake_upstream[1].url, port)
    with gateway_process(config, port) as gateway:
        url, process = gateway.url, gateway.process
        short = Recorder(lambda: raw_stream(url, stream_body(8, 0.1)))  # ~0.8 s
        long = Recorder(lambda: raw_stream(url, stream_body(400, 0.05)))  # ~20 s
        task_id = httpx.post(
            url + "/v1/tasks",
            json={
                "model_ref": "m",
                "prompt": "x",
                "params": {"fake": {"chunks": 400, "delay_s": 0.05}},
            },
            timeout=5,
        ).json()["task_id"]
        task_events = Recorder(lambda: _task_stream(url, task_id))
        for client in (short, long, task_events):
            client.start()
        assert wait_until(lambda: fake.active == 3, timeout=5)
        queued = Recorder(
            lambda: httpx.post(
                url + "/v1/chat/completions", json={"model": "m", "messages": MSG}, timeout=10
            )
        )
        queued.start()
        queued_task = httpx.post(
            url + "/v1/tasks", json={"model_ref": "m", "prompt": "x"}, timeout=5
        )
        assert queued_task.status_code == 202
        queued_task_events = Recorder(lambda: _task_stream(url, queued_task.json()["task_id"]))
        queued_task_events.start()
        assert wait_until(lambda: _queued(url) == 2, timeout=5)  # the request and the task

        sigterm_at = time.monotonic()
        process.send_signal(signal.SIGTERM)

        _assert_queued_work_refused_at_once(queued, queued_task_events, sigterm_at)

        # nothing new is accepted: the listener closes right after SIGTERM
        def refused() -> bool:
            try:
                httpx.post(
                    url + "/v1/chat/completions", json={"model": "m", "messages": MSG}, timeout=2
                )
            except httpx.HTTPError:
                return True
            return False

        assert wait_until(refused, timeout=3)

        _assert_running_work_drained(short, long, task_events, sigterm_at)

        # the process exits promptly, and the upstream saw every connection closed
        process.wait(timeout=GRACE_S + 5)
        assert process.returncode in (0, -signal.SIGTERM)
        assert time.monotonic() - sigterm_at < GRACE_S + 3
        assert wait_until(lambda: fake.active == 0, timeout=2)
        assert "Traceback" not in gateway.log()


def _queued(url: str) -> float:
    return sum(v for _, v in scrape(url)["queue_depth"])


def _assert_queued_work_refused_at_once(
    queued: Recorder, queued_task_events: Recorder, sigterm_at: float
) -> None:
    # queued work is refused at once with a retriable 503
    queued.join(timeout=3)
    response = queued.result
    assert isinstance(response, httpx.Response), response
    assert response.status_code == 503
    assert response.json()["error"]["message"].startswith("the gateway is shutting down")
    assert int(response.headers["retry-after"]) >= 1
    assert queued.finished_at - sigterm_at < 1.0
    queued_task_events.join(timeout=3)
    assert queued_task_events.result[-1][0] == "error"
    assert queued_task_events.result[-1][1]["code"] == "POOL_UNAVAILABLE"
    assert queued_task_events.result[-1][1]["retriable"] is True


def _assert_running_work_drained(
    short: Recorder, long: Recorder, task_events: Recorder, sigterm_at: float
) -> None:
    # a stream that ends within the grace period ends normally
    short.join(timeout=5)
    status, raw = short.result
    assert status == 200 and raw.count(b'"content"') == 8 and b'"error"' not in raw
    assert raw.endswith(b"data: [DONE]\n\n")

    # one that does not is ended at the grace period, in-band, with [DONE]
    long.join(timeout=GRACE_S + 5)
    status, raw = long.result
    events = [e for e in raw.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    assert b"gateway_shutting_down" in events[-2] and b"shutting down" in events[-2]
    assert GRACE_S - 0.2 <= long.finished_at - sigterm_at < GRACE_S + 1.5
    task_events.join(timeout=GRACE_S + 5)
    names = [name for name, _ in task_events.result]
    assert names[0] == "started" and names[-1] == "error"
    assert task_events.result[-1][1]["code"] == "POOL_UNAVAILABLE"


def _task_stream(url: str, task_id: str) -> list[tuple[str, dict[str, Any]]]:
    return read_task_events(url, task_id, timeout=30)
