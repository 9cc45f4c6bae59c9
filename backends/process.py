"""Managed replicas: a backend process the gateway starts, restarts and stops.

The child runs in its own session (its process group is signalled as a whole) and, on
Linux, gets SIGTERM if the gateway itself dies, so no orphan outlives the gateway. Exits
are restarted with exponential backoff (1 s doubling to 30 s, reset after a minute of
uptime); readiness is left to the health probes. The child's output is passed through to
the gateway's stderr as it comes at ``--log-level debug`` only (engines can print what they
serve), and its last lines are always kept: a reload that fails because a replica would
not start answers with them (``llama_model_load: failed ...``).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable

log = logging.getLogger("orchgate.process")

_PR_SET_PDEATHSIG = 1
STOP_GRACE_S = 10.0
TAIL_LINES = 20


def _die_with_parent() -> None:  # runs in the child, between fork and exec
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except OSError:
            pass


class ManagedProcess:
    def __init__(
        self, name: str, argv: list[str], *, on_exit: Callable[[int], None] | None = None
    ) -> None:
        self.name = name
        self.argv = argv
        self.on_exit = on_exit
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self._stopping = False
        self._supervisor: asyncio.Task[None] | None = None
        self._relay: asyncio.Task[None] | None = None
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)  # the child's last output lines

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    async def start(self) -> None:
        await self._spawn()
        self._supervisor = asyncio.create_task(self._supervise(), name=f"process:{self.name}")

    async def _spawn(self) -> None:
        log.info("starting managed replica %s (its output: --log-level debug)", self.name)
        self.process = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        assert self.process.stdout is not None
        self._relay = asyncio.create_task(
            self._pass_through(self.process.stdout), name=f"output:{self.name}"
        )

    async def _pass_through(self, output: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await output.readline()
            except ValueError:  # a line over the stream limit: take what is there
                line = await output.read(65536)
            if not line:
                return
            text = line.decode(errors="replace")
            # an engine may print what it serves (llama-server -v prints prompts): passed
            # through only when the operator asked for debug output
            if log.isEnabledFor(logging.DEBUG):
                try:
                    sys.stderr.write(text)
                    sys.stderr.flush()
                except (OSError, ValueError):  # stderr closed: keep draining the pipe
                    pass
            self.tail.append(text.rstrip())

    def last_output(self, lines: int = 5) -> str:
        return " | ".join(list(self.tail)[-lines:])

    async def _supervise(self) -> None:
        backoff = 1.0
        while not self._stopping:
            assert self.process is not None
            started = time.monotonic()
            code = await self.process.wait()
            if self._relay is not None:
                await asyncio.wait({self._relay}, timeout=1.0)  # the last lines, for on_exit
            if self._stopping:
                return
            log.warning(
                "managed replica %s exited with %s; restarting in %.0fs", self.name, code, backoff
            )
            if self.on_exit is not None:
                self.on_exit(code)
            if time.monotonic() - started > 60:
                backoff = 1.0
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)
            if self._stopping:
                return
            self.restarts += 1
            try:
                await self._spawn()
            except OSError as exc:
                log.error("cannot start managed replica %s: %s", self.name, exc)

    async def stop(self) -> None:
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
        process = self.process
        if process is not None and process.returncode is None:
            self._signal(process.pid, signal.SIGTERM)
            try:
                async with asyncio.timeout(STOP_GRACE_S):
                    await process.wait()
            except TimeoutError:
                self._signal(process.pid, signal.SIGKILL)
                await process.wait()
        if self._relay is not None:
            await asyncio.wait({self._relay}, timeout=1.0)
            self._relay.cancel()

    @staticmethod
    def _signal(pid: int, sig: int) -> None:
        try:
            os.killpg(pid, sig)  # the child leads its own session and process group
        except ProcessLookupError:
            pass
