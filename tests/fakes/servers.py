"""Run servers on real loopback sockets in background threads (httpx's TestServer pattern).

In-process transports buffer whole bodies, so streaming and disconnect behaviour is only
observable over real sockets.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from aiohttp import web

from gateway.logging import FLUSH_S

REPO = Path(__file__).resolve().parents[2]


class _PromptServer(uvicorn.Server):
    """uvicorn polls ``should_exit`` every 0.1 s; over hundreds of test gateways that is
    most of a fast suite's time. This one wakes as soon as ``stop()`` asks."""

    async def main_loop(self) -> None:
        self.wake = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 10) % 864000  # on_tick refreshes the Date header at % 10
            try:
                async with asyncio.timeout(1.0):
                    await self.wake.wait()
            except TimeoutError:
                pass

    async def shutdown(self, sockets: Any = None) -> None:
        """uvicorn's shutdown without its fixed 0.1 s sleeps: the same steps, polled
        every 5 ms (connections told to close, then waited for, then the lifespan)."""
        for server in self.servers:
            server.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()
        deadline = time.monotonic() + 10
        while (
            self.server_state.connections or self.server_state.tasks
        ) and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        for task in self.server_state.tasks:
            task.cancel()
        for server in self.servers:
            await server.wait_closed()
        if not self.force_exit:
            await self.lifespan.shutdown()

    def exit_now(self) -> None:
        self.should_exit = True
        loop = getattr(self, "loop", None)
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.wake.set)


class UvicornThread:
    """An ASGI app served by uvicorn (uvloop + httptools, as in production) on port 0."""

    def __init__(self, app: Any, *, keepalive_s: float = 5.0) -> None:
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            loop="uvloop",
            # the gateway's own front door (limits while parsing), as `orchgate serve` runs
            http=getattr(app, "front_door", "httptools"),
            lifespan="on",
            ws="none",  # as `orchgate serve`
            log_level="warning",
            access_log=False,
            proxy_headers=False,
            server_header=False,  # as `orchgate serve`
            timeout_keep_alive=keepalive_s,  # type: ignore[arg-type]  # floats work
        )
        self.server = _PromptServer(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.port = 0

    def start(self, timeout: float = 30) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]

    def stop(self) -> None:
        self.server.exit_now()
        self.thread.join(timeout=15)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextmanager
def serve_asgi(app: Any, *, keepalive_s: float = 5.0) -> Iterator[UvicornThread]:
    server = UvicornThread(app, keepalive_s=keepalive_s)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class AiohttpThread:
    """An aiohttp.web application on its own event loop in a thread, on port 0."""

    def __init__(self, make_app: Callable[[], web.Application]) -> None:
        self._make_app = make_app
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.port = 0
        self._runner: web.AppRunner | None = None

    def start(self) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=15)

    async def _start(self) -> None:
        self._runner = web.AppRunner(
            self._make_app(),
            handle_signals=False,
            handler_cancellation=True,  # see a client leave
            shutdown_timeout=1.0,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the server's loop (to read its state safely)."""

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout=5)

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(timeout=15)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


class GatewayProcess:
    """A real ``orchgate serve`` process, for tests that need the whole process: signals,
    its RSS, its environment (``LD_LIBRARY_PATH``) or every byte it writes."""

    def __init__(self, process: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
        self.process = process
        self.url = url
        self.log_path = log_path

    def ready(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def serving(self) -> bool:
        """``GET /ready`` is 200: a load balancer would send it traffic (in a cluster: the
        leader, or in active mode every member)."""
        try:
            return httpx.get(self.url + "/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def log(self) -> str:
        return self.log_path.read_text()

    def access_log(self) -> bytes:
        """Everything it wrote once the access lines of the requests so far are out (they
        are written in batches, ``gateway.logging.FLUSH_S`` apart)."""
        time.sleep(FLUSH_S + 0.1)
        return self.log_path.read_bytes()


@contextmanager
def gateway_process(
    config: Path, port: int, *, args: Sequence[str] = (), env: dict[str, str] | None = None
) -> Iterator[GatewayProcess]:
    """Start ``orchgate serve --config CONFIG`` (listening on ``port``), wait until its
    ``/health`` is 200, and stop it afterwards unless the test already did. Its output goes
    to ``gateway.log`` beside the config."""
    log_path = config.parent / "gateway.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config), *args],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    gateway = GatewayProcess(process, f"http://127.0.0.1:{port}", log_path)
    try:
        assert wait_until(gateway.ready, timeout=30), gateway.log()
        yield gateway
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
