"""A real headless Chromium driven over the DevTools protocol (aiohttp's WebSocket client):
enough to load a page, read what it renders, type into it and take a screenshot.

Chromium is Debian's ``chromium`` package (``.ci/run`` installs it); a missing browser is a
failure with that instruction, never a skip.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import httpx

from tests.conftest import free_port


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise AssertionError("headless Chromium is needed: apt-get install chromium (see .ci/run)")


class Browser:
    """One headless Chromium with one page, controlled synchronously from a test."""

    def __init__(self) -> None:
        self.port = free_port()
        # Chromium's helper processes may still write the profile for a moment after the
        # browser exits: cleanup must not fail the test on a file that appeared meanwhile
        self._profile = tempfile.TemporaryDirectory(
            prefix="orchgate-chromium-", ignore_cleanup_errors=True
        )
        self._process = subprocess.Popen(
            [
                chromium_binary(),
                "--headless",
                "--no-sandbox",  # CI runs as root
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                f"--user-data-dir={self._profile.name}",
                f"--remote-debugging-port={self.port}",
                "--window-size=1400,700",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its helpers in one process group, ended together
        )
        self._loop = asyncio.new_event_loop()
        self._ids = itertools.count(1)
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._run(self._connect())

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def _run(self, coro: Any) -> Any:
        return self._loop.run_until_complete(coro)

    async def _connect(self) -> None:
        deadline = time.monotonic() + 30
        target = None
        while time.monotonic() < deadline:
            try:
                pages = httpx.get(f"http://127.0.0.1:{self.port}/json/list", timeout=1).json()
                target = next(p for p in pages if p["type"] == "page")
                break
            except (httpx.HTTPError, StopIteration, ValueError):
                await asyncio.sleep(0.2)
        assert target is not None, "Chromium did not open its DevTools port"
        self._session = aiohttp.ClientSession()
        self._ws = await self._session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0)
        await self._call("Page.enable")

    async def _call(self, method: str, **params: Any) -> dict[str, Any]:
        assert self._ws is not None
        call_id = next(self._ids)
        await self._ws.send_json({"id": call_id, "method": method, "params": params})
        while True:
            message = await asyncio.wait_for(self._ws.receive_json(), timeout=30)
            if message.get("id") == call_id:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                return message.get("result", {})

    def goto(self, url: str) -> None:
        self._run(self._call("Page.navigate", url=url))

    def evaluate(self, expression: str) -> Any:
        result = self._run(
            self._call("Runtime.evaluate", expression=expression, returnByValue=True)
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def text(self) -> str:
        return str(self.evaluate("document.body ? document.body.innerText : ''"))

    def wait_for(self, predicate: Any, timeout: float = 15) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.1)
        return False

    def screenshot(self, path: Path) -> bytes:
        result = self._run(self._call("Page.captureScreenshot", format="png"))
        data = base64.b64decode(result["data"])
        path.write_bytes(data)
        return data

    def close(self) -> None:
        async def shutdown() -> None:
            if self._ws is not None:
                await self._ws.close()
            if self._session is not None:
                await self._session.close()

        try:
            self._run(shutdown())
        finally:
            self._loop.close()
            self._signal_group(signal.SIGTERM)
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
            self._signal_group(signal.SIGKILL)  # helpers that outlived the browser
            self._profile.cleanup()

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self._process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
