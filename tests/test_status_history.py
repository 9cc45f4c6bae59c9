"""``GET /v1/status/history``: the ring buffer behind the status page's charts.

Against a real gateway and a fake engine that streams at a set pace: tokens/s moves while
a stream runs (not only when it ends) and integrates to the tokens relayed, queue depth
and running slots follow a burst past the slots, time to first byte is the mean of the
interval, ``since`` returns only newer points, and ``history_s = 0`` turns it off.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx

from tests.conftest import pool
from tests.fakes.servers import wait_until

INTERVAL_S = 0.1


def _config(url: str, **metrics: Any) -> dict[str, Any]:
    replica = {"id": "f0", "engine": "openai", "url": url, "slots": 2}
    return {
        "metrics": {"history_interval_s": INTERVAL_S, **metrics},
        "pools": [pool("chat", ["m"], [replica])],
    }


def _stream(url: str, chunks: int, delay_s: float) -> None:
    body = {
        "model": "m",
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
        "fake": {"chunks": chunks, "delay_s": delay_s},
    }
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        for _ in response.iter_bytes():
            pass


def _history(url: str, **params: Any) -> dict[str, Any]:
    response = httpx.get(url + "/v1/status/history", params=params, timeout=5)
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    assert len(body["t"]) == len(body["pools"].get("chat", {}).get("tokens_per_s", body["t"]))
    return body


def test_history_follows_a_running_stream_and_a_burst(
    fake_upstream: Any, gateway_factory: Any
) -> None:
    _, server = fake_upstream
    with gateway_factory(_config(server.url)) as gw:
        assert wait_until(lambda: gw.state.pools["chat"].queue.is_ready(), timeout=10)
        time.sleep(3 * INTERVAL_S)
        before = _history(gw.url)
        assert before["interval_s"] == INTERVAL_S and before["window_s"] == 600
        assert set(before["pools"]["chat"]["tokens_per_s"][1:]) == {0}  # idle so far

        # one stream of 40 tokens over 2 s: the rate is non-zero while it still runs
        streaming = threading.Thread(target=_stream, args=(gw.url, 40, 0.05))
        started = _history(gw.url)["t"][-1]
        streaming.start()

        def moving() -> bool:
            # before the next sample there is no point after ``started``, nor a "chat" entry
            chat = _history(gw.url, since=started)["pools"].get("chat", {})
            return any(v for v in chat.get("tokens_per_s", []))

        assert wait_until(moving, timeout=1.5)
        assert streaming.is_alive(), "the rate moved only once the stream ended"
        streaming.join()
        time.sleep(3 * INTERVAL_S)
        after = _history(gw.url, since=started)
        chat = after["pools"]["chat"]
        # the points integrate to the stream's tokens (the engine's usage replaces the
        # estimate at the end: the fake reports completion_tokens = chunks)
        points = zip(chat["tokens_per_s"][1:], after["t"], after["t"][1:], strict=False)
        integral = sum((rate or 0) * (t1 - t0) for rate, t0, t1 in points)
        assert 34 <= integral <= 46, (integral, chat["tokens_per_s"])
        assert max(chat["running"]) == 1 and chat["slots"][-1] == 2
        ttft = [v for v in chat["ttft_ms"] if v is not None]
        assert len(ttft) == 1 and 0 < ttft[0] < 1000
        assert set(chat["vram_used_bytes"]) == {None}  # no GPU telemetry here

        # a burst of 5 against 2 slots: 3 wait, the queue chart shows it
        mark = after["t"][-1]
        burst = [threading.Thread(target=_stream, args=(gw.url, 10, 0.05)) for _ in range(5)]
        for thread in burst:
            thread.start()
        for thread in burst:
            thread.join()
        time.sleep(3 * INTERVAL_S)
        newer = _history(gw.url, since=mark)
        assert newer["t"] and min(newer["t"]) > mark  # only what came after
        chat = newer["pools"]["chat"]
        assert max(chat["queue_interactive"]) == 3, chat["queue_interactive"]
        assert max(chat["running"]) == 2 and set(chat["queue_batch"]) == {0}


def test_history_can_be_turned_off(fake_upstream: Any, gateway_factory: Any) -> None:
    _, server = fake_upstream
    with gateway_factory(_config(server.url, history_s=0)) as gw:
        time.sleep(3 * INTERVAL_S)
        assert _history(gw.url) == {"interval_s": INTERVAL_S, "window_s": 0, "t": [], "pools": {}}
