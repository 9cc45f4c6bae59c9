"""The OpenVINO GenAI worker with the real runtime on CPU and the real SmolLM2 GGUF:
the contract's routes and bounds, the busy-time rule, the CLI, serialisation, log hygiene,
and the worker as a gateway engine (OpenAI SDK, task API, managed replica)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from backends.npu_worker.app import run_job
from backends.npu_worker.pipeline import Generator, WorkerConfig, _openvino_pipeline
from gateway.cli import EMBEDDED_WORKER_LAUNCH
from tests.conftest import REPO, Gateway, free_port, pool, test_assets
from tests.fakes.servers import wait_until
from tests.test_tasks_api import read_events

pytestmark = pytest.mark.slow  # the real OpenVINO runtime on the real SmolLM2 GGUF

CANARY = "CANARY-7f3e9b-never-log-me"


@pytest.fixture(scope="module")
def model_path() -> str:
    return str(test_assets.smollm2_model())


def start_worker(model: str, log_path: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    log = open(log_path, "wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway",
            "npu-worker",
            "--model",
            model,
            "--model-id",
            "smollm2-135m",
            "--port",
            str(port),
            *extra,
        ],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    ok = wait_until(lambda: _loaded(url) or process.poll() is not None, timeout=60, interval=0.2)
    assert ok and process.poll() is None, log_path.read_text()
    return process, url


def _loaded(url: str) -> bool:
    try:
        return bool(httpx.get(url + "/healthz", timeout=1).json()["loaded"])
    except (httpx.HTTPError, ValueError):
        return False


@pytest.fixture(scope="module")
def worker(model_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    process, url = start_worker(model_path, log_path)
    try:
        yield url, log_path
    finally:
        process.terminate()
        process.wait(timeout=15)


def generate(url: str, path: str = "/v1/worker/generate", **body: Any) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=60)


def test_healthz_has_every_contract_field(worker: tuple[str, Path]) -> None:
    url, _ = worker
    health = httpx.get(url + "/healthz").json()
    for field in (
        "ok",
        "model",
        "model_path",
        "device",
        "cache_dir",
        "cache_exists",
        "loaded",
        "initial_load_ms",
        "busy_time_us",
        "max_input_chars",
        "jobs",
        "bind",
    ):
        assert field in health, field
    assert health["ok"] is True and health["loaded"] is True and health["device"] == "CPU"
    assert health["busy_time_us"] is None  # not on NPU: never invented
    assert health["max_input_chars"] == 6000
    assert health["jobs"] == ["memory_candidate", "notification", "summary", "title"]
    assert health["initial_load_ms"] > 0
    assert httpx.get(url + "/models").json()["data"][0]["id"] == "smollm2-135m"


@pytest.mark.parametrize(
    "path,body,job",
    [
        ("/v1/worker/generate", {"job": "title"}, "title"),
        ("/v1/worker/generate", {"job": "summary"}, "summary"),
        ("/v1/worker/generate", {"job": "notification"}, "notification"),
        ("/v1/worker/generate", {"job": "memory_candidate"}, "memory_candidate"),
        ("/v1/worker/generate", {"job": "memory"}, "memory_candidate"),
        ("/v1/worker/extract-memory-candidates", {}, "memory_candidate"),
        ("/v1/worker/condense-notification", {}, "notification"),
    ],
)
def test_jobs_and_aliases(
    worker: tuple[str, Path], path: str, body: dict[str, Any], job: str
) -> None:
    url, _ = worker
    r = generate(
        url, path, input="Synthetic alert: disk 95% full on host atlas.", max_new_tokens=24, **body
    )
    assert r.status_code == 200, r.text
    payload = r.json()
    assert payload["job"] == job and payload["device"] == "CPU"
    assert payload["device_actual"] == "CPU" and payload["text"]
    assert set(payload["timing_ms"]) == {"load", "initial_load", "generate", "total"}
    assert payload["timing_ms"]["generate"] > 0
    assert payload["npu_busy_delta_us"] is None and payload["npu_busy_before_us"] is None
    if job in ("title", "summary"):
        assert payload["json"] is None
    else:
        assert payload["json"] is None or isinstance(payload["json"], dict)


@pytest.mark.parametrize(
    "body,needle",
    [
        ({"job": "title", "input": ""}, "non-empty"),
        ({"job": "title", "input": "x" * 6001}, "6000"),
        ({"job": "poem", "input": "x"}, "unsupported job"),
        ({"job": "title", "input": "x", "max_new_tokens": 0}, "between 1 and 256"),
        ({"job": "title", "input": "x", "max_new_tokens": 257}, "between 1 and 256"),
        ({"input": "x"}, "job must be"),
    ],
)
def test_bounds(worker: tuple[str, Path], body: dict[str, Any], needle: str) -> None:
    url, _ = worker
    r = httpx.post(url + "/v1/worker/generate", json=body, timeout=10)
    assert r.status_code == 400 and needle in r.json()["error"]


def test_unknown_path_is_404_json(worker: tuple[str, Path]) -> None:
    url, _ = worker
    r = httpx.get(url + "/v1/worker/nope")
    assert r.status_code == 404 and r.json() == {"error": "not found"}


def test_concurrent_requests_are_serialised(worker: tuple[str, Path]) -> None:
    url, _ = worker
    results: list[httpx.Response] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(
                generate(url, job="summary", input="Two requests at once.", max_new_tokens=32)
            )
        )
        for _ in range(2)
    ]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall_ms = (time.perf_counter() - started) * 1000
    assert [r.status_code for r in results] == [200, 200]
    generate_ms = [r.json()["timing_ms"]["generate"] for r in results]
    assert wall_ms >= sum(generate_ms) * 0.95  # one after the other, never overlapping


def test_canary_in_the_input_never_reaches_the_log(worker: tuple[str, Path]) -> None:
    url, log_path = worker
    assert (
        generate(url, job="title", input=f"Title for {CANARY}", max_new_tokens=8).status_code == 200
    )
    text = log_path.read_text()
    assert '"path": "/v1/worker/generate"' in text
    assert CANARY not in text


def test_cli_exit_codes(model_path: str) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway", "npu-worker", "--model", model_path, *args],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
        )

    ok = cli("--job", "title", "--input", "A synthetic smoke test.", "--max-new-tokens", "8")
    assert ok.returncode == 0, ok.stderr
    import msgspec

    assert msgspec.json.decode(ok.stdout)["job"] == "title"
    bad = cli("--job", "title", "--input", "", "--max-new-tokens", "8")
    assert bad.returncode != 0 and "non-empty" in bad.stdout


class CountingPipeline:
    """The real CPU pipeline, plus a stand-in for the ivpu driver's sysfs counter."""

    def __init__(self, pipe: Any, counter: Path, rises: bool) -> None:
        self.pipe, self.counter, self.rises = pipe, counter, rises

    def generate(self, *args: Any) -> Any:
        result = self.pipe.generate(*args)
        if self.rises:
            self.counter.write_text(str(int(self.counter.read_text()) + 12_345))
        return result


@pytest.mark.parametrize("rises,status", [(True, 200), (False, 503)])
def test_npu_busy_time_rule(model_path: str, tmp_path: Path, rises: bool, status: int) -> None:
    counter = tmp_path / "npu_busy_time_us"
    counter.write_text("1000")
    seen_props: list[dict[str, Any]] = []

    def factory(path: str, device: str, props: dict[str, Any]) -> Any:
        seen_props.append(props)  # NPU properties were prepared for the NPU...
        return CountingPipeline(_openvino_pipeline(path, "CPU", {}), counter, rises)

    config = WorkerConfig(
        model_path=model_path, model_id="m", device="NPU", busy_time_path=str(counter)
    )
    code, payload = asyncio.run(
        run_job(
            Generator(config, factory=factory), {"job": "title", "input": "x", "max_new_tokens": 4}
        )
    )
    assert seen_props[0]["MAX_PROMPT_LEN"] == 1024 and "GENERATE_HINT" in seen_props[0]
    assert code == status
    assert payload["npu_busy_before_us"] == 1000
    if rises:
        assert payload["npu_busy_delta_us"] == 12_345 and "error" not in payload
    else:
        assert payload["npu_busy_delta_us"] == 0 and "NPU busy time" in payload["error"]
        assert payload["text"] is not None  # the generation payload stays in the answer


def test_cpu_pipeline_gets_no_npu_properties() -> None:
    from backends.npu_worker.pipeline import pipeline_properties

    assert pipeline_properties(
        WorkerConfig(model_path="m", model_id="m", device="CPU", cache_dir="/tmp/c")
    ) == {"CACHE_DIR": "/tmp/c"}


# -- the worker as a gateway engine --------------------------------------------------------


@pytest.fixture
def gw(worker: tuple[str, Path], gateway_factory: Any) -> Iterator[Gateway]:
    url, _ = worker
    config = {
        "pools": [pool("npu", ["smollm2-135m"], [{"id": "w0", "engine": "openvino", "url": url}])]
    }
    with gateway_factory(config) as gateway:
        yield gateway


def test_gateway_streams_from_the_worker_via_the_openai_sdk(gw: Gateway) -> None:
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    chunks = list(
        client.chat.completions.create(
            model="smollm2-135m",
            messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    whole = client.chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8
    )
    assert whole.choices[0].message.content


def test_gateway_task_api_over_the_worker(gw: Gateway) -> None:
    r = httpx.post(
        gw.url + "/v1/tasks",
        json={
            "model_ref": "smollm2-135m",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 8,
        },
    )
    assert r.status_code == 202
    events = read_events(gw, r.json()["task_id"])
    assert events[0][0] == "started" and events[-1][0] == "end"
    assert events[-1][1]["tokens_out"] == sum(1 for n, _ in events if n == "token") > 0


def test_worker_routes_through_the_gateway_with_auth(
    worker: tuple[str, Path], gateway_factory: Any
) -> None:
    url, _ = worker
    config = {
        "auth": {"token": "tok"},
        "pools": [pool("npu", ["smollm2-135m"], [{"id": "w0", "engine": "openvino", "url": url}])],
    }
    with gateway_factory(config) as gateway:
        body = {"job": "title", "input": "Gateway smoke.", "max_new_tokens": 8}
        assert httpx.post(gateway.url + "/v1/worker/generate", json=body).status_code == 401
        r = httpx.post(
            gateway.url + "/v1/worker/generate",
            json=body,
            timeout=60,
            headers={"Authorization": "Bearer tok"},
        )
        assert r.status_code == 200 and r.json()["job"] == "title"
        r = httpx.post(
            gateway.url + "/v1/worker/condense-notification",
            timeout=60,
            json={"input": "Disk full."},
            headers={"Authorization": "Bearer tok"},
        )
        assert r.status_code == 200 and r.json()["job"] == "notification"


def test_managed_worker_restarts_after_sigkill_and_leaves_no_child(
    model_path: str, gateway_factory: Any
) -> None:
    port = free_port()
    launch = EMBEDDED_WORKER_LAUNCH  # the embedded default's own managed worker
    config = {
        "pools": [
            pool(
                "npu",
                ["smollm2-135m"],
                [
                    {
                        "id": "managed",
                        "engine": "openvino",
                        "url": f"http://127.0.0.1:{port}",
                        "launch": launch,
                        "model_path": model_path,
                    }
                ],
                health_interval_s=0.5,
            )
        ]
    }
    body = {
        "model": "smollm2-135m",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 4,
    }
    with gateway_factory(config) as gateway:
        process = next(iter(gateway.state.pools.values())).processes[0]
        assert wait_until(lambda: httpx.get(gateway.url + "/health").status_code == 200, timeout=60)
        assert (
            httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=30).status_code
            == 200
        )
        first_pid = process.pid
        assert first_pid is not None
        os.kill(first_pid, signal.SIGKILL)
        assert wait_until(lambda: httpx.get(gateway.url + "/health").status_code == 503, timeout=5)
        assert wait_until(lambda: httpx.get(gateway.url + "/health").status_code == 200, timeout=60)
        assert process.pid != first_pid and process.restarts == 1
        assert (
            httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=30).status_code
            == 200
        )
        last_pid = process.pid
    assert last_pid is not None
    assert wait_until(lambda: not _alive(last_pid), timeout=5)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return (
        Path(f"/proc/{pid}/status").exists()
        and "zombie" not in Path(f"/proc/{pid}/status").read_text()
    )


def test_openvino_pools_serve_completions_and_prompt_tasks(gw: Gateway) -> None:
    """The embedded default's engine: /v1/completions (raw prompt, no chat template) and
    prompt tasks, with bounds in OpenAI's terms."""
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    whole = client.completions.create(
        model="smollm2-135m", prompt="Once upon a time", max_tokens=8, seed=3
    )
    assert whole.object == "text_completion" and whole.choices[0].text
    assert whole.choices[0].finish_reason in ("length", "stop") and whole.usage is not None
    again = client.completions.create(
        model="smollm2-135m", prompt="Once upon a time", max_tokens=8, seed=3
    )
    assert again.choices[0].text == whole.choices[0].text  # seeded: the same text
    pieces = list(
        client.completions.create(
            model="smollm2-135m", prompt="Once upon a time", max_tokens=8, seed=3, stream=True
        )
    )
    assert "".join(p.choices[0].text for p in pieces if p.choices) == whole.choices[0].text
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="smollm2-135m", prompt="x", max_tokens=512)
    assert "max_tokens must be between 1 and 256" in str(caught.value.body)
    task = httpx.post(
        gw.url + "/v1/tasks", json={"model_ref": "smollm2-135m", "prompt": "Hi", "max_tokens": 6}
    )
    assert task.status_code == 202
    events = read_events(gw, task.json()["task_id"])
    assert [name for name, _ in events][0] == "started" and events[-1][0] == "end"
    assert any(name == "token" for name, _ in events)
