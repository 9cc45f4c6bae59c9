"""JSON-lines access log: one line per request with method, path, status, timings, pool,
replica, engine, attempts, token counts in/out and the request id. Never prompts,
completions, token text or auth headers: the record type has no field that could hold
them."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import TextIO

import msgspec

FLUSH_S = 0.05  # access lines reach the log at most this late...
_MAX_PENDING = 512  # ...or once this many wait


class AccessRecord(msgspec.Struct, omit_defaults=True):
    ts: float
    method: str
    path: str
    status: int
    duration_ms: float
    request_id: str
    pool: str | None = None
    replica: str | None = None
    engine: str | None = None
    attempts: int | None = None
    ttfb_ms: float | None = None
    events: int | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None
    error: str | None = None


class TaskRecord(msgspec.Struct, omit_defaults=True, tag="task", tag_field="event"):
    """One line per finished OrchQueue task (its HTTP requests have their own lines)."""

    ts: float
    task_id: str
    state: str
    pool: str
    engine: str
    priority: str
    duration_ms: float
    replica: str | None = None
    queue_ms: float | None = None
    tokens_in: int | None = None
    tokens_out: int = 0
    error: str | None = None


class AccessLog:
    """Lines are written in batches: the first line after a flush arms one timer, and
    every line until it fires goes out in the same write (a system call per request cost
    a tenth of the gateway's CPU per request; stderr's own buffer writes each line
    through). ``flush`` at shutdown."""

    __slots__ = ("_armed", "_buffer", "_encoder", "_pending", "_stream", "enabled")

    def __init__(self, *, enabled: bool, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self._stream = stream or sys.stderr
        # write bytes straight to the binary buffer when there is one (no str round trip)
        self._buffer = getattr(self._stream, "buffer", None)
        self._encoder = msgspec.json.Encoder()
        self._pending: list[bytes] = []
        self._armed = False

    def write(self, record: AccessRecord | TaskRecord) -> None:
        if not self.enabled:
            return
        pending = self._pending
        pending.append(self._encoder.encode(record))
        if len(pending) >= _MAX_PENDING:
            self.flush()
        elif not self._armed:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (a tool, a test): at once
                self.flush()
                return
            self._armed = True
            loop.call_later(FLUSH_S, self.flush)

    def flush(self) -> None:
        self._armed = False
        if not self._pending:
            return
        data = b"\n".join(self._pending) + b"\n"
        self._pending.clear()
        try:
            if self._buffer is not None:
                self._buffer.write(data)
                self._buffer.flush()
            else:
                self._stream.write(data.decode())
                self._stream.flush()
        except (OSError, ValueError):  # a closed or full stream must not stop serving
            pass


def now() -> float:
    return time.time()


class JsonFormatter(logging.Formatter):
    """The gateway's own log records as JSON lines, like the access log."""

    def __init__(self) -> None:
        super().__init__()
        self._encoder = msgspec.json.Encoder()

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return self._encoder.encode(line).decode()


def configure_logging(level: str = "INFO") -> None:
    """JSON lines for the gateway's own loggers on stderr; client libraries stay quiet."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for noisy in ("httpx", "httpcore", "aiohttp.access", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
