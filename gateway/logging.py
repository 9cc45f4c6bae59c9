"""JSON-lines access log: one line per request with method, path, status, timings, pool,
replica, engine, attempts and the request id. Never prompts, completions, tokens or auth
headers: the record type has no field that could hold them."""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

import msgspec


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
    error: str | None = None


class AccessLog:
    __slots__ = ("_buffer", "_encoder", "_stream", "enabled")

    def __init__(self, *, enabled: bool, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self._stream = stream or sys.stderr
        # write bytes straight to the binary buffer when there is one (no str round trip)
        self._buffer = getattr(self._stream, "buffer", None)
        self._encoder = msgspec.json.Encoder()

    def write(self, record: AccessRecord) -> None:
        if not self.enabled:
            return
        line = self._encoder.encode(record) + b"\n"
        if self._buffer is not None:
            self._buffer.write(line)
            self._buffer.flush()
        else:
            self._stream.write(line.decode())


def now() -> float:
    return time.time()


def configure_logging(level: str = "INFO") -> None:
    """Plain JSON-ish lines for the gateway's own loggers; client libraries stay quiet."""
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format='{"ts": "%(asctime)s", "level": "%(levelname)s", "logger": "%(name)s", '
        '"message": "%(message)s"}',
    )
    for noisy in ("httpx", "httpcore", "aiohttp.access", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
