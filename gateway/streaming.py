"""SSE relay: upstream bytes to the client, event for event, never merged or re-split.

Events are cut only at their ``\\n\\n`` boundary, so a client always receives whole events
exactly as the engine wrote them (several events that arrived in one read go out in one
write; no event is ever split across writes by us). The relay also:

* holds the response until the first whole event, so a failure before it can still be
  retried elsewhere (:meth:`SseReader.first`);
* translates llama.cpp's non-standard ``error:`` SSE field, which OpenAI clients silently
  drop, into ``data: {"error": ...}``;
* ends a stream that failed or stopped without ``[DONE]`` with an in-band error event and
  ``data: [DONE]`` -- never a silent truncation.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec

from backends.base import UpstreamResponse
from backends.errors import (
    BackendError,
    BackendFailed,
    BackendInterrupted,
    BackendTimeout,
    openai_error_body,
)
from gateway.wire import Usage, usage_of

DONE = b"data: [DONE]\n\n"

# in-band error codes after the first byte (the task API maps them to its own codes)
CODE_TIMEOUT = "upstream_timeout"
CODE_SHUTDOWN = "gateway_shutting_down"
CODE_LOST = "upstream_stream_error"
CODE_TRUNCATED = "upstream_stream_truncated"


def _code_for(error: BackendError) -> str:
    if isinstance(error, BackendTimeout):
        return CODE_TIMEOUT
    if isinstance(error, BackendInterrupted):
        return CODE_SHUTDOWN
    return CODE_LOST


_encoder = msgspec.json.Encoder()


class StreamStats:
    """What the relay saw, for logs and metrics: events relayed and whether it completed."""

    __slots__ = ("done", "events", "failed", "usage")

    def __init__(self) -> None:
        self.events = 0
        self.done = False
        self.failed: str | None = None
        self.usage: Usage | None = None  # the engine's count, when it sent one

    def tokens(self) -> tuple[int, int]:
        """``(in, out)``: the engine's usage, or for a stream cut before it, the relayed
        events less the role and finish chunks (one event per token on vLLM and llama.cpp)
        and no prompt count."""
        if self.usage is not None:
            return self.usage.prompt_tokens, self.usage.completion_tokens
        return 0, max(0, self.events - 2 - self.done)


def error_event(message: str, *, type_: str = "server_error", code: str | None = None) -> bytes:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return b"data: " + _encoder.encode(body) + b"\n\n"


def _translate_error_fields(events: bytes) -> bytes:
    """Rewrite ``error: {...}`` lines (llama.cpp) as OpenAI in-band ``data:`` errors."""
    out = []
    for line in events.split(b"\n"):
        if line.startswith(b"error:"):
            payload = line[len(b"error:") :].strip()
            body = openai_error_body(500, payload)
            line = b"data: " + _encoder.encode(body)
        out.append(line)
    return b"\n".join(out)


class SseReader:
    """Cuts an upstream byte stream into whole-event batches: ``first()`` once (still
    retryable), then ``rest()`` for everything after it."""

    __slots__ = ("_batches", "_buffer", "_chunks", "_hide_usage", "stats")

    def __init__(self, upstream: UpstreamResponse, *, hide_usage: bool = False) -> None:
        self._chunks = upstream.chunks()
        self._buffer = b""
        self._hide_usage = hide_usage  # the gateway asked for usage, the client did not
        self.stats = StreamStats()
        self._batches = self._cut()

    def _take_usage(self, events: bytes) -> bytes:
        kept = []
        for event in events.split(b"\n\n"):
            if event.startswith(b"data: {") and b'"usage":{' in event:
                usage, usage_only = usage_of(event[6:])
                if usage is not None:
                    self.stats.usage = usage
                    if usage_only and self._hide_usage:
                        self.stats.events -= 1
                        continue
            kept.append(event)
        return b"\n\n".join(kept)

    def _inspect(self, events: bytes) -> bytes:
        stats = self.stats
        stats.events += events.count(b"\n\n")
        if b"error:" in events and (events.startswith(b"error:") or b"\nerror:" in events):
            events = _translate_error_fields(events)
        if b'"usage":{' in events:  # the last chunk or two; null usage never matches
            events = self._take_usage(events)
        # JSON strings hold no raw newlines, so only a real event can match these
        if events.startswith(b"data: [DONE]") or b"\n\ndata: [DONE]" in events:
            stats.done = True
        return events

    async def _cut(self) -> AsyncIterator[bytes]:
        """Whole events as they complete; at EOF, any unterminated tail is flushed."""
        async for data in self._chunks:
            buffer = self._buffer + data if self._buffer else data
            cut = buffer.rfind(b"\n\n")
            if cut < 0:
                self._buffer = buffer
                continue
            cut += 2
            self._buffer = buffer[cut:]
            batch = self._inspect(buffer[:cut])
            if batch:  # empty only when it held nothing but a hidden usage chunk
                yield batch
        if self._buffer.strip():
            tail, self._buffer = self._buffer, b""
            batch = self._inspect(tail + b"\n\n")
            if batch:
                yield batch

    async def first(self) -> bytes:
        """The first batch of whole events; a failure here is still retryable.

        Raises ``BackendFailed`` if the stream ends before any event or opens with an
        in-band error (vLLM and llama.cpp both report some failures that way).
        """
        try:
            first = await anext(self._batches)
        except StopAsyncIteration:
            raise BackendFailed("upstream closed the stream before the first event") from None
        if first.startswith(b'data: {"error"'):
            error = BackendFailed(
                "upstream stream opened with an error event",
                body=openai_error_body(502, first[6:].split(b"\n", 1)[0]),
            )
            error.answered = True  # the engine is alive and said why
            raise error
        return first

    async def rest(self) -> AsyncIterator[bytes]:
        """Everything after ``first()``, ending in ``[DONE]`` even when the upstream fails."""
        stats = self.stats
        try:
            async for batch in self._batches:
                yield batch
        except BackendError as exc:
            code = _code_for(exc)
            stats.failed = code
            yield error_event(f"upstream failed mid-stream: {exc.message}", code=code)
            yield DONE
            return
        if not stats.done:
            stats.failed = CODE_TRUNCATED
            yield error_event("upstream ended the stream without [DONE]", code=CODE_TRUNCATED)
            yield DONE
