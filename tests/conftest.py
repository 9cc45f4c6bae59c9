"""Shared fixtures: real servers on loopback (llama-server, fakes, the gateway itself)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from gateway.config import Config, config_from_mapping
from gateway.logging import FLUSH_S
from gateway.state import GatewayState
from tests.fakes.servers import REPO, AiohttpThread, UvicornThread
from tests.fakes.upstream import FakeUpstream
from tests.fakes.vllm_sim import VLLMSimulator

sys.path.insert(0, str(REPO / "scripts"))
import test_assets  # noqa: E402


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that needs the llama-server build is slow by definition: mark it before
    ``-m "not slow"`` deselects anything."""
    for item in items:
        if item.get_closest_marker("llamacpp"):
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    """Build the real llama-server once per machine before any selected test runs (minutes
    on a fresh machine), so the build never counts against a test's timeout; a run whose
    selection needs neither asset fetches nothing."""
    if any(item.get_closest_marker("llamacpp") for item in session.items):
        test_assets.llama_server()
        test_assets.smollm2_model()


class Gateway:
    """A running gateway: its base URL and (read-only, from tests) its runtime state."""

    def __init__(self, server: UvicornThread, state: GatewayState, log_path: Path) -> None:
        self.server = server
        self.state = state
        self.log_path = log_path

    @property
    def url(self) -> str:
        return self.server.url

    def access_log(self) -> bytes:
        """The access log once the lines of the requests made so far are written (the
        gateway writes them in batches, ``gateway.logging.FLUSH_S`` apart)."""
        time.sleep(FLUSH_S + 0.1)
        return self.log_path.read_bytes()

    def slots_in_use(self) -> int:
        return sum(r.in_use for r in self.state.all_replicas())

    def queue_depth(self) -> int:
        return sum(p.queue.depth() for p in self.state.pools.values())


# the control plane's credential in tests that change what runs (reloads, forced releases)
ADMIN_TOKEN = "test-admin-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def variant_toml(variant_id: str, models: list[str], replica: str) -> str:
    """A ``[[pools.variants]]`` block (one replica, its keys as TOML lines) for a config
    file that defines one pool."""
    names = ", ".join(f'"{m}"' for m in models)
    return (
        f'\n[[pools.variants]]\nid = "{variant_id}"\nmodels = [{names}]\n\n'
        f"[[pools.variants.replicas]]\n{replica}\n"
    )


def pool(
    pool_id: str, models: list[str], replicas: list[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    return {"id": pool_id, "models": models, "replicas": replicas, **extra}


@contextmanager
def run_gateway(
    config: Config | dict[str, Any], tmp_path: Path, config_path: Path | None = None
) -> Iterator[Gateway]:
    """An in-process gateway; with ``config_path``, reloads re-read that file. A mapping
    without ``[auth] admin_token`` gets ``ADMIN_TOKEN``, so tests can use the control plane
    (``"admin_token": None`` tests a gateway without one)."""
    if isinstance(config, dict):
        auth = config.get("auth", {})
        if "admin_token" not in auth:
            config = {**config, "auth": {**auth, "admin_token": ADMIN_TOKEN}}
        config = config_from_mapping(config, env={})
    log_path = tmp_path / f"access-{time.monotonic_ns()}.log"
    with open(log_path, "w", buffering=1) as log_stream:
        app = create_app(config, config_path=config_path, access_log_stream=log_stream)
        server = UvicornThread(app)
        server.start()
        try:
            yield Gateway(server, app.state, log_path)
        finally:
            server.stop()


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Any:
    def factory(config: Config | dict[str, Any]) -> Any:
        return run_gateway(config, tmp_path)

    return factory


@contextmanager
def serve_aiohttp(make_app: Any) -> Iterator[AiohttpThread]:
    server = AiohttpThread(make_app)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fake_upstream() -> Iterator[tuple[FakeUpstream, AiohttpThread]]:
    fake = FakeUpstream()
    with serve_aiohttp(fake.app) as server:
        yield fake, server


@pytest.fixture
def sick_upstream() -> Iterator[tuple[FakeUpstream, AiohttpThread]]:
    """A replica that passes its health probe but resets every request it gets."""
    sick = FakeUpstream()
    sick.reset_posts = True
    with serve_aiohttp(sick.app) as server:
        yield sick, server


def sick_and_live(sick_url: str, live_url: str) -> list[dict[str, Any]]:
    """Two replicas; placement tries "sick" first (it has the most free slots)."""
    return [
        {"id": "sick", "engine": "openai", "url": sick_url, "slots": 8},
        {"id": "live", "engine": "openai", "url": live_url, "slots": 1},
    ]


@pytest.fixture
def vllm_sim() -> Iterator[tuple[VLLMSimulator, AiohttpThread]]:
    sim = VLLMSimulator()
    with serve_aiohttp(sim.app) as server:
        yield sim, server


@pytest.fixture
def dead_url() -> Iterator[str]:
    """A loopback address where nothing listens, held for the test: a socket bound there
    without listening refuses every connect, and no other socket (an ephemeral client
    port, which could connect to itself) can take the number meanwhile."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def schemathesis(schema: str, base_url: str | None, tmp_path: Path, *args: str) -> None:
    """Run the schemathesis CLI (the test extra's ``st``) and fail with its report's tail.
    ``schema`` is a file or URL; ``base_url`` where to send the requests, when the schema
    does not live on the server itself. Seeded, so a failure is reproducible."""
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    assert st is not None, "schemathesis is part of the test extra"
    command = [st, "run", schema, *(["--url", base_url] if base_url else []), *args,
               "--no-color", "--request-timeout", "10", "--report-dir", str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    summary = result.stdout.rsplit("SUMMARY", 1)[-1].lower()
    assert "failures" not in summary or "0 failures" in summary, result.stdout[-8000:]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LlamaServer:
    def __init__(self, url: str, process: subprocess.Popen[bytes], slots: int) -> None:
        self.url = url
        self.process = process
        self.slots = slots

    def busy_slots(self) -> int:
        slots = httpx.get(f"{self.url}/slots", timeout=5).json()
        return sum(1 for slot in slots if slot["is_processing"])


def start_llama_server(slots: int, log_path: Path) -> LlamaServer:
    binary = test_assets.llama_server()
    model = test_assets.smollm2_model()
    port = free_port()
    log = open(log_path, "wb")
    process = subprocess.Popen(
        [
            str(binary),
            "-m",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "-np",
            str(slots),
            "-c",
            str(1024 * slots),
            "-t",
            "2",
            "--no-webui",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace").splitlines()[-15:]
            raise RuntimeError(
                f"the llama-server test asset {binary} exited with {process.returncode} at "
                f"start (-11 is SIGSEGV; on AMX CPUs see scripts/test_assets.py). Its last "
                "lines:\n" + "\n".join(tail)
            )
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return LlamaServer(url, process, slots)
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"llama-server did not become healthy; see {log_path}")


STANDIN = REPO / "tests" / "fakes" / "nvml" / "libnvml_standin.c"


@pytest.fixture(scope="session")
def nvml_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    compiler = shutil.which("gcc") or shutil.which("cc")
    assert compiler, "gcc is part of every machine this project runs on"
    out = tmp_path_factory.mktemp("nvml")
    subprocess.run(
        [compiler, "-shared", "-fPIC", "-O1", "-o", str(out / "libnvidia-ml.so.1"), str(STANDIN)],
        check=True,
    )
    return out


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    server = start_llama_server(4, tmp_path_factory.mktemp("llama") / "llama-server.log")
    try:
        yield server
    finally:
        server.process.terminate()
        try:
            server.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.process.kill()


os.environ.pop("ORCHGATE_API_TOKEN", None)  # a developer's shell must not change test results


class RedisServer:
    """A real ``redis-server`` (Debian's package; ``.ci/run`` installs it) on a free port,
    nothing persisted."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is required: apt-get install redis-server (.ci/run does)"
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def pause(self) -> None:
        """Freeze it (SIGSTOP): connections stay open, nothing answers."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        self.resume()
        self.process.terminate()
        self.process.wait(timeout=10)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    try:
        yield server
    finally:
        server.stop()
