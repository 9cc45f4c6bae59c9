"""The live status page in a real headless Chromium, against a real gateway.

It must show real data (pools, replicas, state, engine and version, slots, queue depth per
priority, tokens, model states), follow the gateway live without a reload, and show
nothing but a token form when the gateway has a token and the browser does not.
"""

from __future__ import annotations

import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.browser import Browser
from tests.conftest import LlamaServer, pool
from tests.fakes.servers import wait_until

MODEL = "smollm2-135m"


def _replica_cells(browser: Browser) -> str:
    return str(browser.evaluate("document.querySelector('[data-pool=chat] table').innerText"))


@pytest.mark.llamacpp
def test_status_page_shows_a_live_pool(
    llama_server: LlamaServer, gateway_factory: Any, tmp_path: Path
) -> None:
    config = {
        "pools": [
            pool("chat", [MODEL, "smol"], [{"id": "llama0", "engine": "llamacpp",
                                            "url": llama_server.url}]),
        ]
    }  # fmt: skip
    with gateway_factory(config) as gw, Browser() as browser:
        assert wait_until(lambda: gw.state.pools["chat"].queue.is_ready(), timeout=20)
        version = gw.state.pools["chat"].replicas[0].engine_version
        assert version
        browser.goto(gw.url + "/")  # redirects to /status
        assert browser.wait_for(lambda: "llama0" in browser.text()), browser.text()
        text = browser.text()
        assert "pool chat" in text and "ready" in text
        assert "queue: interactive 0, batch 0" in text
        assert f"slots 0 / {llama_server.slots} ready" in text
        assert re.search(rf"llama0\s+ready\s+llamacpp\s+{re.escape(version)}", text), text
        assert re.search(rf"{MODEL}\s+Active\s+chat", text), text
        assert "0 / 0" in _replica_cells(browser)  # no tokens yet

        # traffic arrives: the page follows without a reload
        updates = browser.evaluate("Number(document.body.dataset.updates)")
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
        answer = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5
        )
        assert answer.usage is not None
        counts = f"{answer.usage.prompt_tokens} / {answer.usage.completion_tokens}"
        assert browser.wait_for(lambda: counts in _replica_cells(browser)), _replica_cells(browser)
        assert browser.evaluate("Number(document.body.dataset.updates)") > updates
        assert browser.evaluate("performance.getEntriesByType('navigation').length") == 1

        png = browser.screenshot(tmp_path / "status-page.png")
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
        keep = os.environ.get("ORCHGATE_SCREENSHOT_DIR")
        if keep:  # e.g. to attach the screenshot to a CI run
            shutil.copy(tmp_path / "status-page.png", Path(keep) / "status-page.png")


@pytest.mark.slow  # a real browser
def test_status_page_data_is_behind_the_token(
    fake_upstream: Any, gateway_factory: Any, tmp_path: Path
) -> None:
    _, server = fake_upstream
    replica = {"id": "f0", "engine": "openai", "url": server.url, "slots": 3}
    config = {"auth": {"token": "s3cret"}, "pools": [pool("chat", ["m"], [replica])]}
    with gateway_factory(config) as gw, Browser() as browser:
        assert httpx.get(gw.url + "/v1/status").status_code == 401
        assert httpx.get(gw.url + "/v1/status/history").status_code == 401  # the charts too
        assert httpx.get(gw.url + "/ready").status_code == 200  # a probe needs no token
        shell = httpx.get(gw.url + "/status")
        assert shell.status_code == 200 and shell.headers["content-type"].startswith("text/html")
        assert b"f0" not in shell.content  # the page itself holds no data

        browser.goto(gw.url + "/status")
        assert browser.wait_for(lambda: "token needed" in browser.text()), browser.text()
        assert "f0" not in browser.text()
        browser.evaluate(
            "document.getElementById('token').value = 's3cret';"
            "document.getElementById('login-form').requestSubmit();"
        )
        assert browser.wait_for(lambda: "f0" in browser.text()), browser.text()
        assert "token needed" not in browser.text()
        assert re.search(r"f0\s+ready\s+openai", browser.text())
        browser.screenshot(tmp_path / "status-page-token.png")


@pytest.mark.llamacpp
def test_status_page_charts_follow_traffic(
    llama_server: LlamaServer, gateway_factory: Any, tmp_path: Path
) -> None:
    """Tokens/s, queue depth per priority and time to first byte, drawn from the gateway's
    ring buffer while twice the slots' worth of streams run on a real llama-server."""
    config = {
        "metrics": {"history_interval_s": 0.25},
        "pools": [pool("chat", [MODEL], [{"id": "llama0", "engine": "llamacpp",
                                          "url": llama_server.url}])],
    }  # fmt: skip
    with gateway_factory(config) as gw, Browser() as browser:
        assert wait_until(lambda: gw.state.pools["chat"].queue.is_ready(), timeout=20)
        browser.goto(gw.url + "/status")
        assert browser.wait_for(lambda: "Last minutes" in browser.text() and "tokens / s" in
                                browser.text()), browser.text()  # fmt: skip
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)

        def stream() -> int:
            chunks = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}],
                max_tokens=96, stream=True, temperature=0,
            )  # fmt: skip
            return sum(1 for _ in chunks)

        with ThreadPoolExecutor(2 * llama_server.slots) as pool_:
            runs = [pool_.submit(stream) for _ in range(2 * llama_server.slots)]

            def peak(series: str) -> float:
                return float(browser.evaluate(
                    f"Math.max(0, ...(history?.pools.chat?.{series} ?? []).filter(v => v != null))"
                ))  # fmt: skip

            # while the streams run, the page already shows their tokens and the queue
            assert browser.wait_for(lambda: peak("tokens_per_s") > 10, timeout=20)
            assert not all(run.done() for run in runs)
            assert all(run.result() > 10 for run in runs)
        assert browser.wait_for(lambda: peak("queue_interactive") >= 1, timeout=5)
        assert browser.wait_for(lambda: peak("ttft_ms") > 0, timeout=5)
        lines = browser.evaluate(
            "Object.fromEntries([...document.querySelectorAll('[data-chart]')]"
            ".map(f => [f.dataset.chart, Number(f.dataset.lines)]))"
        )
        assert lines == {"tokens": 1, "queue": 2, "ttft": 1}, lines  # no GPU chart here
        assert "no GPU telemetry" in browser.text()
        assert re.search(r"tokens / s\s*now [\d.]+ · max [\d.]+", browser.text()), browser.text()
        png = browser.screenshot(tmp_path / "status-charts.png")
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
        keep = os.environ.get("ORCHGATE_SCREENSHOT_DIR")
        if keep:
            shutil.copy(tmp_path / "status-charts.png", Path(keep) / "status-charts.png")
