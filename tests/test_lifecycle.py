"""Model swaps on real managed llama-server replicas, under continuous OpenAI SDK traffic.

The pool ``chat`` runs SmolLM2 as model ``smollm2-a`` (2 slots, 1024-token context) and
has a variant ``b`` serving it as ``smollm2-b`` (4 slots, 4096 tokens); clients use the
alias ``chat`` that both settings keep. Every request of the traffic runs with the SDK's
own retries off, so one failed request anywhere fails the test.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway.config import load_config
from tests.conftest import (
    ADMIN,
    ADMIN_TOKEN,
    free_port,
    run_gateway,
    test_assets,
    variant_toml,
)
from tests.fakes.servers import wait_until
from tests.prom import scrape, value

pytestmark = pytest.mark.llamacpp


def llama_replica(port: int, slots: int, context: int) -> str:
    """The keys of a managed llama-server replica ``r0`` serving SmolLM2."""
    binary, model = test_assets.llama_server(), test_assets.smollm2_model()
    launch = (
        f'["{binary}", "-m", "{{model}}", "--host", "{{host}}", "--port", "{{port}}", '
        f'"-np", "{slots}", "-c", "{context}", "-t", "1", "--no-webui"]'
    )
    return (
        f'id = "r0"\nengine = "llamacpp"\nurl = "http://127.0.0.1:{port}"\n'
        f'model_path = "{model}"\nlaunch = {launch}\n'
    )


def write_config(
    path: Path, *, port: int, replica_port: int, extra: str = "", pool_extra: str = ""
) -> None:
    path.write_text(
        f"""
[server]
bind = "127.0.0.1:{port}"

[auth]
admin_token = "{ADMIN_TOKEN}"

[[pools]]
id = "chat"
models = ["smollm2-a", "chat"]
reload_timeout_s = 60
health_interval_s = 0.5
{pool_extra}

[[pools.replicas]]
{llama_replica(replica_port, 2, 1024)}
[[pools.variants]]
id = "b"
models = ["smollm2-b", "chat"]

[[pools.variants.replicas]]
{llama_replica(replica_port, 4, 4096)}{extra}"""
    )


class Traffic:
    """Clients in threads sending chats (half of them streamed) until stopped, and one
    OrchQueue client submitting tasks and following each to its ``end`` event."""

    def __init__(self, base_url: str, clients: int = 3) -> None:
        self.ok = 0
        self.tasks_ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(base_url, i % 2 == 0), daemon=True)
            for i in range(clients)
        ]
        self._threads.append(threading.Thread(target=self._tasks, args=(base_url,), daemon=True))

    def _tasks(self, base_url: str) -> None:
        with httpx.Client(base_url=base_url, timeout=60) as http:
            while not self._stop.is_set():
                try:
                    accepted = http.post(
                        "/v1/tasks", json={"model_ref": "chat", "prompt": "Hi", "max_tokens": 8}
                    )
                    assert accepted.status_code == 202, accepted.text
                    stream = http.get(f"/v1/tasks/{accepted.json()['task_id']}/stream")
                    events = [
                        line[7:] for line in stream.text.splitlines() if line.startswith("event: ")
                    ]
                    assert events[0] == "started" and events[-1] == "end", events
                    assert "token" in events
                    with self._lock:
                        self.tasks_ok += 1
                except Exception as exc:  # every failure is the test's business
                    with self._lock:
                        self.failures.append(f"task: {type(exc).__name__}: {exc}")

    def _run(self, base_url: str, stream: bool) -> None:
        client = openai.OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0)
        while not self._stop.is_set():
            try:
                messages = [{"role": "user", "content": "Say something short."}]
                if stream:
                    chunks = client.chat.completions.create(
                        model="chat",
                        messages=messages,
                        max_tokens=8,
                        stream=True,  # type: ignore[arg-type]
                    )
                    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                else:
                    reply = client.chat.completions.create(
                        model="chat",
                        messages=messages,
                        max_tokens=8,  # type: ignore[arg-type]
                    )
                    text = reply.choices[0].message.content or ""
                assert text, "an empty completion"
                with self._lock:
                    self.ok += 1
            except Exception as exc:  # every failure is the test's business
                with self._lock:
                    self.failures.append(f"{type(exc).__name__}: {exc}")

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def wait_for(self, requests: int, timeout: float = 60) -> None:
        start = self.ok
        assert wait_until(lambda: self.ok >= start + requests, timeout=timeout), self.failures


@contextmanager
def chat_gateway(tmp_path: Path, extra: str = "", pool_extra: str = "") -> Iterator[Any]:
    config_path = tmp_path / "orchgate.toml"
    write_config(
        config_path, port=free_port(), replica_port=free_port(), extra=extra,
        pool_extra=pool_extra,
    )  # fmt: skip
    with run_gateway(load_config(config_path, env={}), tmp_path, config_path) as gw:
        assert wait_until(lambda: gw.state.pools["chat"].queue.is_ready(), timeout=60)
        yield gw


def llama_pids(gw: Any) -> set[int]:
    pools = [*gw.state.pools.values(), *gw.state.retiring]
    return {p.pid for pool in pools for p in pool.processes if p.pid is not None}


def model_states(url: str) -> dict[tuple[str, str], float]:
    series = scrape(url)
    return {(labels["model_id"], labels["state"]): v for labels, v in series.get("model_state", [])}


def test_swap_under_load_fails_no_request(tmp_path: Path) -> None:
    with chat_gateway(tmp_path) as gw, Traffic(gw.url) as traffic:
        traffic.wait_for(6)
        first_pids = llama_pids(gw)
        tokens_before = value(scrape(gw.url), "tokens_out_total", replica_id="r0")

        started = time.monotonic()
        swapped = reload(gw.url, {"variant": "b"})
        to_b_s = time.monotonic() - started
        assert swapped.status_code == 200, swapped.text
        result = swapped.json()
        assert result["status"] == "swapped" and result["variant"] == "b"
        assert result["models"] == ["smollm2-b", "chat"]
        assert result["previous"] == {"variant": "default", "models": ["smollm2-a", "chat"]}
        # the new set ran beside the old one, so it got a port of its own
        configured = load_config(tmp_path / "orchgate.toml", env={}).pools[0].replicas[0].url
        assert result["replicas"][0]["url"] != configured
        traffic.wait_for(6)

        # the new replica really is the new setting: 4 slots discovered from /props
        status = httpx.get(f"{gw.url}/v1/status", timeout=5).json()
        pool = status["pools"][0]
        assert pool["variant"] == "b" and pool["slots_ready"] == 4
        assert pool["lifecycle"]["reload"]["state"] == "swapped"
        assert model_states(gw.url)[("smollm2-a", "Retired")] == 1
        assert model_states(gw.url)[("smollm2-b", "Active")] == 1
        models = httpx.get(f"{gw.url}/v1/models", timeout=5).json()
        assert {m["id"] for m in models["data"]} == {"smollm2-b", "chat"}

        # the old set finished what it held and was stopped
        assert wait_until(lambda: not gw.state.retiring, timeout=30)
        assert wait_until(lambda: all(not _alive(pid) for pid in first_pids), timeout=15)
        # counters continue across the swap (same replica id)
        assert value(scrape(gw.url), "tokens_out_total", replica_id="r0") >= tokens_before

        # back to the file's own setting: a reload without a body
        started = time.monotonic()
        back = reload(gw.url)
        to_a_s = time.monotonic() - started
        assert back.status_code == 200, back.text
        assert back.json()["variant"] == "default"
        traffic.wait_for(6)
        states = model_states(gw.url)
        assert states[("smollm2-a", "Active")] == 1 and states[("smollm2-b", "Retired")] == 1

    assert traffic.failures == [], traffic.failures
    assert traffic.ok >= 18 and traffic.tasks_ok >= 3
    print(
        f"\nswap to b {to_b_s:.2f}s, back {to_a_s:.2f}s, {traffic.ok} requests and "
        f"{traffic.tasks_ok} tasks, 0 failed"
    )
    assert wait_until(lambda: gw.slots_in_use() == 0, timeout=10)


def test_swap_to_a_broken_launch_rolls_back_and_the_old_model_keeps_serving(
    tmp_path: Path,
) -> None:
    with (
        chat_gateway(tmp_path, EXITS_VARIANT + missing_model_variant()) as gw,
        Traffic(gw.url) as traffic,
    ):
        traffic.wait_for(4)
        pids = llama_pids(gw)
        failed = reload(gw.url, {"variant": "exits"})
        assert failed.status_code == 409, failed.text
        body = failed.json()
        assert body["error"]["code"] == "reload_failed" and body["rolled_back"] is True
        # the reason names the replica and carries the process's own last words
        assert "r0 exited with code 1" in body["error"]["message"]
        assert "no model at /nonexistent/model.gguf" in body["error"]["message"]

        # a launch that starts but never serves: llama-server with a missing model file
        failed = reload(gw.url, {"variant": "missing"})
        assert failed.status_code == 409, failed.text
        assert "exited with code" in failed.json()["error"]["message"]
        traffic.wait_for(4)

        # everything as it was: same process, same model, same variant
        assert llama_pids(gw) == pids
        assert gw.state.pools["chat"].variant == "default"
        states = model_states(gw.url)
        assert states[("smollm2-a", "Active")] == 1
        assert ("smollm2-b", "Retired") not in states
        status = httpx.get(f"{gw.url}/v1/status", timeout=5).json()
        assert status["pools"][0]["lifecycle"]["reload"]["state"] == "failed"
    assert traffic.failures == [], traffic.failures


def test_sighup_reloads_the_file_and_an_invalid_file_is_never_applied(tmp_path: Path) -> None:
    from tests.fakes.servers import gateway_process

    port = free_port()
    config_path = tmp_path / "orchgate.toml"
    write_config(config_path, port=port, replica_port=free_port())
    with gateway_process(config_path, port) as gw:

        def aliases() -> set[str]:
            return {m["id"] for m in httpx.get(gw.url + "/v1/models", timeout=5).json()["data"]}

        assert aliases() == {"smollm2-a", "chat"}
        good = config_path.read_text()
        config_path.write_text(
            good.replace('pools]]\nid = "chat"', 'pools]]\nid = "chat"\nqueue_capacity = -1')
        )
        invalid = httpx.post(gw.url + "/v1/config/reload", headers=ADMIN, timeout=30)
        assert invalid.status_code == 422, invalid.text
        assert "queue_capacity" in invalid.json()["error"]["message"]
        os.kill(gw.process.pid, 1)  # SIGHUP with the invalid file: logged, nothing applied
        assert wait_until(lambda: "SIGHUP: config reload failed" in gw.log(), timeout=10)
        assert aliases() == {"smollm2-a", "chat"}

        config_path.write_text(
            good.replace('models = ["smollm2-a", "chat"]', 'models = ["smollm2-a", "chat", "smol"]')
        )
        os.kill(gw.process.pid, 1)
        assert wait_until(lambda: "smol" in aliases(), timeout=60), gw.log()[-3000:]
        assert "not applied" in gw.log()
        done = httpx.post(
            gw.url + "/v1/chat/completions",
            json={
                "model": "smol",
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 4,
            },
            timeout=30,
        )
        assert done.status_code == 200, done.text
    assert "Traceback" not in gw.log()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie that the gateway has not reaped yet is gone for our purposes
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except OSError:
        return False


def reload(url: str, body: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{url}/v1/pools/chat/reload?wait=true", json=body, headers=ADMIN, timeout=90)


_NOWHERE = 'id = "r0"\nengine = "llamacpp"\nurl = "http://127.0.0.1:1"\n'

# a launch that exits at once, with its reason on stderr
EXITS_VARIANT = variant_toml(
    "exits",
    ["smollm2-a", "chat"],
    _NOWHERE + 'model_path = "/nonexistent/model.gguf"\n'
    'launch = ["{python}", "-c", "import sys; sys.exit(\'no model at /nonexistent/model.gguf\')"]',
)


def missing_model_variant() -> str:
    """A launch that starts but never serves: llama-server with a missing model file."""
    return variant_toml(
        "missing",
        ["smollm2-a", "chat"],
        _NOWHERE + 'model_path = "/nonexistent/model.gguf"\n'
        f'launch = ["{test_assets.llama_server()}", "-m", "{{model}}", "--port", "{{port}}"]',
    )


BROKEN_VARIANT = variant_toml(
    "broken",
    ["smollm2-x", "chat"],
    _NOWHERE + 'launch = ["{python}", "-c", "import sys; sys.exit(\'cannot load the weights\')"]',
)


def test_swap_from_the_status_page_under_load_respecting_the_lock(tmp_path: Path) -> None:
    from tests.browser import Browser

    def swap_box() -> str:
        return str(browser.evaluate("document.querySelector('[data-swap=chat]').innerText"))

    def click(action: str) -> None:
        browser.evaluate(
            f"document.querySelector('[data-swap=chat] button[data-action={action}]').click()"
        )

    def choose(variant: str) -> None:
        browser.evaluate(
            "(() => { const s = document.querySelector('[data-swap=chat] select');"
            f"s.value = '{variant}'; s.dispatchEvent(new Event('change')); }})()"
        )

    with (
        chat_gateway(tmp_path, BROKEN_VARIANT) as gw,
        Browser() as browser,
        Traffic(gw.url) as traffic,
    ):
        browser.goto(gw.url + "/status")
        assert browser.wait_for(lambda: "model: smollm2-a" in browser.text()), browser.text()
        options = browser.evaluate(
            "[...document.querySelectorAll('[data-swap=chat] option')].map(o => o.value).join()"
        )
        assert options == "default,b,broken"

        # pick b, confirm, watch it happen
        choose("b")
        click("swap")
        assert browser.wait_for(lambda: "Swap pool chat to b?" in swap_box()), swap_box()
        # a swap changes what runs: the page asks for the admin token (kept in the tab)
        browser.evaluate(
            "(() => { const i = document.querySelector('[data-swap=chat] input[data-field="
            f"admin-token]'); i.value = '{ADMIN_TOKEN}'; i.dispatchEvent(new Event('input')); }})()"
        )
        click("confirm")
        assert browser.wait_for(lambda: "swapped to b in" in swap_box(), timeout=90), swap_box()
        assert browser.wait_for(lambda: "model: smollm2-b" in swap_box()), swap_box()
        assert re.search(r"smollm2-a\s+Retired", browser.text()), browser.text()
        assert gw.state.pools["chat"].variant == "b"

        # a broken setting: the page reports the failure, the model stays
        choose("broken")
        click("swap")
        assert browser.wait_for(lambda: "Swap pool chat to broken?" in swap_box()), swap_box()
        click("confirm")
        assert browser.wait_for(lambda: "swap failed (409)" in swap_box(), timeout=90), swap_box()
        assert "cannot load the weights" in swap_box()
        assert "model: smollm2-b" in swap_box() and gw.state.pools["chat"].variant == "b"

        # someone reserves the pool: the page shows who, and offers no swap
        held = httpx.post(
            f"{gw.url}/v1/pools/chat/reservation", json={"holder": "eval-job", "ttl_s": 300}
        )
        assert held.status_code == 201
        assert browser.wait_for(lambda: "reserved by eval-job" in swap_box()), swap_box()
        assert "swaps are locked" in swap_box()
        assert browser.evaluate("document.querySelector('[data-swap=chat] button')") is None
        browser.screenshot(tmp_path / "status-swap.png")
        traffic.wait_for(3)
    assert traffic.failures == [], traffic.failures


def test_replace_swap_holds_requests_instead_of_running_two_sets(tmp_path: Path) -> None:
    """``swap_strategy = "replace"``, for a GPU that cannot hold both models: requests that
    arrive during the swap wait; the old server stops before the new one starts on the same
    port; a broken setting brings the previous one back. Nothing fails either way."""
    with chat_gateway(tmp_path, BROKEN_VARIANT, 'swap_strategy = "replace"') as gw:
        configured = load_config(tmp_path / "orchgate.toml", env={}).pools[0].replicas[0].url
        with Traffic(gw.url) as traffic:
            traffic.wait_for(6)
            old_pids = llama_pids(gw)
            started = time.monotonic()
            swapped = reload(gw.url, {"variant": "b"})
            took = time.monotonic() - started
            assert swapped.status_code == 200, swapped.text
            # the same address: the old server was gone before the new one started
            assert swapped.json()["replicas"][0]["url"] == configured
            assert all(not _alive(pid) for pid in old_pids)
            assert gw.state.pools["chat"].queue.ready_slots() == 4
            traffic.wait_for(6)

            # a broken setting: the previous one (b) is started again, requests wait for it
            failed = reload(gw.url, {"variant": "broken"})
            assert failed.status_code == 409, failed.text
            assert "cannot load the weights" in failed.json()["error"]["message"]
            assert "did not come back" not in failed.json()["error"]["message"]
            assert gw.state.pools["chat"].variant == "b" and not gw.state.holds
            assert gw.state.pools["chat"].queue.ready_slots() == 4
            traffic.wait_for(6)
        assert traffic.failures == [], traffic.failures
        assert traffic.tasks_ok >= 2
        states = model_states(gw.url)
        assert states[("smollm2-b", "Active")] == 1 and states[("smollm2-a", "Retired")] == 1
    print(
        f"\nreplace swap {took:.2f}s, {traffic.ok} requests and {traffic.tasks_ok} tasks, 0 failed"
    )
