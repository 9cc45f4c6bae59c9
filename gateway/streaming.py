"""SSE relay: upstream bytes to the client, event for event, never merged or re-split.

Events are cut only at their boundary -- a blank line, with any of the line endings the SSE
format allows (LF, CRLF, CR; sse-starlette and so many Python servers send CRLF) -- so a
client always receives whole events exactly as the engine wrote them (several events that
arrived in one read go out in one write; no event is ever split across writes by us, nor
re-framed). ``data:`` is read with or without its space. The relay also:

* holds the response until the first whole event, so a failure before it can still be
  retried elsewhere (:meth:`SseReader.first`);
* translates llama.cpp's non-standard ``error:`` SSE field, which OpenAI clients silently
  drop, into ``data: {"error": ...}``;
* ends a stream that failed or stopped before its end with an in-band error event in the
  surface's own words -- never a silent truncation.

How a stream ends, fails and reports usage differs per surface: a :class:`Dialect` says it.
OpenAI's chat and completions end in ``data: [DONE]``; the Responses API ends with a
``response.completed`` (``incomplete``, ``failed``) event and Anthropic's messages with
``message_stop``, neither with ``[DONE]``. Engine-native streams (llama-server's
``/completion``) and audio are relayed as raw bytes (:class:`RawReader`).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec

from backends.base import UpstreamResponse
from backends.errors import (
    BackendError,
    BackendFailed,
    BackendInterrupted,
    BackendTimeout,
    openai_error_body,
)
from gateway.wire import Usage, usage_of, with_timings

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
_decoder = msgspec.json.Decoder()

# a blank line: two line ends in a row, each CRLF, LF or CR
# (a CR directly followed by LF is one CRLF, never a CR line end plus an LF one)
_BOUNDARY = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")
_LINE_END = re.compile(rb"\r\n|\r|\n")
_DONE_LINE = re.compile(rb"(?:^|[\r\n])data: ?\[DONE\](?:\r\n|\r|\n|$)")


def last_boundary(buffer: bytes) -> int:
    """The offset just after the last complete event in ``buffer``, or -1. LF-only streams
    (every engine this gateway ships adapters for) take one ``rfind``."""
    if b"\r" not in buffer:
        cut = buffer.rfind(b"\n\n")
        return cut + 2 if cut >= 0 else -1
    end = -1
    for match in _BOUNDARY.finditer(buffer):
        end = match.end()
    return end


def count_events(events: bytes) -> int:
    if b"\r" not in events:
        return events.count(b"\n\n")
    return len(_BOUNDARY.findall(events))


def event_data(event: bytes) -> bytes | None:
    """The ``data`` of one event (its ``data:`` lines joined by LF, per the SSE rules), or
    None when it has none. ``event:``/``id:``/``retry:``/comment lines are skipped."""
    if event.startswith(b"data: ") and b"\n" not in event and b"\r" not in event:
        return event[6:]  # the common one-line event
    lines = [line for line in _LINE_END.split(event) if line.startswith(b"data:")]
    if not lines:
        return None
    return b"\n".join(line[6:] if line.startswith(b"data: ") else line[5:] for line in lines)


def event_spans(batch: bytes) -> Iterator[tuple[int, int, int]]:
    """``(start, end, next)`` of each event in a batch: the event is ``batch[start:end]``,
    its blank line runs to ``next``."""
    start = 0
    for match in _BOUNDARY.finditer(batch):
        if match.start() > start:
            yield start, match.start(), match.end()
        start = match.end()
    if start < len(batch):
        yield start, len(batch), len(batch)


def split_events(batch: bytes) -> Iterator[bytes]:
    """The events of a batch of whole events, each without its blank line."""
    if b"\r" not in batch:  # LF only: one C-level split
        for event in batch.split(b"\n\n"):
            if event:
                yield event
        return
    for start, end, _ in event_spans(batch):
        yield batch[start:end]


def has_done(events: bytes) -> bool:
    """Whether a batch holds the ``[DONE]`` event (``data:[DONE]`` too)."""
    if b"[DONE]" not in events:
        return False
    if events.startswith(b"data: [DONE]") or b"\n\ndata: [DONE]" in events:
        return True  # JSON strings hold no raw newlines, so only a real event matches
    return _DONE_LINE.search(events) is not None


class StreamStats:
    """What the relay saw, for logs and metrics: events relayed and whether it completed."""

    __slots__ = ("done", "events", "failed", "usage")

    def __init__(self) -> None:
        self.events = 0
        self.done = False
        self.failed: str | None = None
        self.usage: Usage | None = None  # the engine's count, when it sent one

    def tokens(self, *, estimate: bool = True) -> tuple[int, int]:
        """``(in, out)``: the engine's usage, or for an OpenAI stream cut before it
        (``estimate``), the relayed events less the role and finish chunks (one event per
        token on vLLM and llama.cpp) and no prompt count."""
        if self.usage is not None:
            return self.usage.tokens()
        return 0, max(0, self.events - 2 - self.done) if estimate else 0


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


def _opening_error(first: bytes) -> BackendFailed | None:
    """A stream whose first event is an in-band error (any framing, any JSON spacing)."""
    if b'"error"' not in first:
        return None
    data = event_data(next(split_events(first), b""))
    if data is None or not data.lstrip().startswith(b"{"):
        return None
    try:
        decoded = _decoder.decode(data)
    except msgspec.DecodeError:
        return None
    if not (isinstance(decoded, dict) and "error" in decoded):
        return None
    return BackendFailed(
        "upstream stream opened with an error event",
        body=openai_error_body(502, data),
        answered=True,  # the engine is alive and said why
    )


class Dialect:
    """The OpenAI stream (chat, completions): ends with ``data: [DONE]``; the usage chunk
    (``choices: []``) is read and, when the gateway asked for it, hidden."""

    __slots__ = ()
    estimates_tokens = True  # one event per token: a count survives a cut stream
    truncated = "upstream ended the stream without [DONE]"

    def inspect(self, reader: SseReader, events: bytes) -> bytes:
        if b'"usage"' in events:  # the last chunk or two (and "usage":null on some engines)
            events = reader.take_usage(events)
        if has_done(events):
            reader.stats.done = True
        return events

    def failure(self, message: str, code: str) -> tuple[bytes, ...]:
        """What ends a stream that failed after its first byte."""
        return error_event(message, code=code), DONE

    def opening_error(self, first: bytes) -> BackendFailed | None:
        return _opening_error(first)


class _TypedEvent(msgspec.Struct):
    type: str = ""
    usage: Usage | None = None


class _ResponseBody(msgspec.Struct):
    usage: Usage | None = None


class _MessageBody(msgspec.Struct):
    usage: Usage | None = None


class _ResponsesEvent(_TypedEvent):
    response: _ResponseBody | None = None


class _MessagesEvent(_TypedEvent):
    message: _MessageBody | None = None


_responses_decoder = msgspec.json.Decoder(_ResponsesEvent)
_messages_decoder = msgspec.json.Decoder(_MessagesEvent)


def _typed_events(events: bytes, needles: tuple[bytes, ...]) -> Iterator[bytes]:
    """The data of each event that mentions one of ``needles`` (the rest is not decoded)."""
    for event in split_events(events):
        if any(needle in event for needle in needles):
            data = event_data(event)
            if data is not None and data.lstrip().startswith(b"{"):
                yield data


class ResponsesDialect(Dialect):
    """OpenAI's Responses API: typed events; the stream ends with ``response.completed``,
    ``response.incomplete``, ``response.failed`` or ``error``; usage rides on the final
    ``response`` object (``input_tokens``/``output_tokens``)."""

    __slots__ = ()
    estimates_tokens = False
    truncated = "upstream ended the stream before response.completed"
    _ENDS = frozenset({"response.completed", "response.incomplete", "response.failed", "error"})
    _NEEDLES = (b"response.completed", b"response.incomplete", b"response.failed", b"error")

    def inspect(self, reader: SseReader, events: bytes) -> bytes:
        for data in _typed_events(events, self._NEEDLES):
            try:
                event = _responses_decoder.decode(data)
            except msgspec.DecodeError:
                continue
            if event.type in self._ENDS:
                reader.stats.done = True
                if event.response is not None and event.response.usage is not None:
                    reader.stats.usage = event.response.usage
        return events

    def failure(self, message: str, code: str) -> tuple[bytes, ...]:
        body = {"type": "error", "code": code, "message": message, "param": None}
        return (b"event: error\ndata: " + _encoder.encode(body) + b"\n\n",)

    def opening_error(self, first: bytes) -> BackendFailed | None:
        return _typed_opening_error(first, _responses_decoder)


class MessagesDialect(Dialect):
    """Anthropic's messages: ends with ``message_stop`` (or ``error``); input tokens come in
    ``message_start``, the output count (cumulative) in each ``message_delta``."""

    __slots__ = ()
    estimates_tokens = False
    truncated = "upstream ended the stream before message_stop"
    _NEEDLES = (b"message_start", b"message_delta", b"message_stop", b"error")

    def inspect(self, reader: SseReader, events: bytes) -> bytes:
        stats = reader.stats
        for data in _typed_events(events, self._NEEDLES):
            try:
                event = _messages_decoder.decode(data)
            except msgspec.DecodeError:
                continue
            if event.type in ("message_stop", "error"):
                stats.done = True
            elif event.type == "message_start" and event.message is not None:
                stats.usage = event.message.usage
            elif event.type == "message_delta" and event.usage is not None:
                tokens_in = stats.usage.tokens()[0] if stats.usage is not None else 0
                stats.usage = Usage(prompt_tokens=tokens_in, output_tokens=event.usage.tokens()[1])
        return events

    def failure(self, message: str, code: str) -> tuple[bytes, ...]:
        body = {"type": "error", "error": {"type": "api_error", "message": message, "code": code}}
        return (b"event: error\ndata: " + _encoder.encode(body) + b"\n\n",)

    def opening_error(self, first: bytes) -> BackendFailed | None:
        return _typed_opening_error(first, _messages_decoder)


def _typed_opening_error(first: bytes, decoder: msgspec.json.Decoder[Any]) -> BackendFailed | None:
    """A typed-event stream whose first event is ``error``."""
    if b"error" not in first:
        return None
    data = event_data(next(split_events(first), b""))
    if data is None:
        return None
    try:
        event = decoder.decode(data)
    except msgspec.DecodeError:
        return None
    if event.type != "error":
        return None
    return BackendFailed(
        "upstream stream opened with an error event",
        body=openai_error_body(502, data),
        answered=True,
    )


OPENAI = Dialect()
RESPONSES = ResponsesDialect()
MESSAGES = MessagesDialect()


class SseReader:
    """Cuts an upstream byte stream into whole-event batches: ``first()`` once (still
    retryable), then the rest -- pulled (``rest()``) or pushed from the upstream's own
    callbacks (``take`` per piece, ``ending`` once: ``gateway.splice``)."""

    __slots__ = ("_buffer", "_dialect", "_hide_usage", "_upstream", "stats")

    def __init__(
        self, upstream: UpstreamResponse, *, hide_usage: bool = False, dialect: Dialect = OPENAI
    ) -> None:
        self._upstream = upstream
        self._buffer = b""
        self._hide_usage = hide_usage  # the gateway asked for usage, the client did not
        self._dialect = dialect
        self.stats = StreamStats()

    @property
    def upstream(self) -> UpstreamResponse:
        return self._upstream

    @property
    def estimates_tokens(self) -> bool:
        return self._dialect.estimates_tokens

    def take_usage(self, events: bytes) -> bytes:
        """Read the engine's usage by decoding each event that mentions it (any JSON
        spacing, any framing); drop the usage-only chunk the gateway asked for itself."""
        for start, end, after in event_spans(events):
            event = events[start:end]
            if b'"usage"' not in event or b'"usage":null' in event:
                continue  # (a spaced null is decoded: correct, only slower)
            data = event_data(event)
            if data is None or not data.startswith(b"{"):
                continue
            usage, usage_only = usage_of(data)
            if usage is not None:
                self.stats.usage = usage
                if usage_only and self._hide_usage:  # once per stream at most
                    self.stats.events -= 1
                    return _without_usage_chunk(events, start, after, data)
        return events

    def _inspect(self, events: bytes) -> bytes:
        self.stats.events += count_events(events)
        if b"error:" in events and (events.startswith(b"error:") or b"\nerror:" in events):
            events = _translate_error_fields(events)
        return self._dialect.inspect(self, events)

    def take(self, data: bytes) -> bytes:
        """The whole events ``data`` completes, inspected; b"" while an event is open (or
        when all it held was a hidden usage chunk)."""
        buffer = self._buffer + data if self._buffer else data
        cut = last_boundary(buffer)
        if cut < 0:
            self._buffer = buffer
            return b""
        self._buffer = buffer[cut:]
        return self._inspect(buffer[:cut])

    def flush(self) -> bytes:
        """At EOF, what is left: an unterminated event gets its blank line; anything else
        goes as it came (the LF of a split CRLF, say)."""
        tail, self._buffer = self._buffer, b""
        if not tail:
            return b""
        if tail.strip() and last_boundary(tail) != len(tail):
            tail += b"\n\n"  # an unterminated last event: end it so clients dispatch it
        return self._inspect(tail)

    async def first(self) -> bytes:
        """The first batch of whole events; a failure here is still retryable.

        Raises ``BackendFailed`` if the stream ends before any event or opens with an
        in-band error (vLLM and llama.cpp both report some failures that way).
        """
        first = b""
        while not first:
            data = await self._upstream.next_chunk()
            if data is None:
                first = self.flush()
                if not first:
                    raise BackendFailed("upstream closed the stream before the first event")
                break
            first = self.take(data)
        error = self._dialect.opening_error(first)
        if error is not None:
            raise error
        return first

    async def rest(self) -> AsyncIterator[bytes]:
        """Everything after ``first()``, properly ended even when the upstream fails."""
        upstream = self._upstream
        try:
            while (data := await upstream.next_chunk()) is not None:
                batch = self.take(data)
                if batch:
                    yield batch
        except BackendError as exc:
            ending = self.ending(exc)
        else:
            ending = self.ending(None)
        if ending:
            yield ending

    def ending(self, error: BackendError | None) -> bytes:
        """What follows the last piece: the tail at EOF, then, for a stream that failed
        (``error``) or stopped before its end, the dialect's in-band error."""
        stats = self.stats
        tail = self.flush() if error is None else b""
        if stats.done:  # complete; whatever followed its end does not matter
            return tail
        dialect = self._dialect
        if error is not None:
            code = stats.failed = _code_for(error)
            message = f"upstream failed mid-stream: {error.message}"
        else:
            code = stats.failed = CODE_TRUNCATED
            message = dialect.truncated
        return tail + b"".join(dialect.failure(message, code))

    def failure(self, message: str) -> bytes:
        """What the relay sends when it fails itself (a gateway bug) mid-stream."""
        return b"".join(self._dialect.failure(message, "internal_error"))


def _without_usage_chunk(events: bytes, start: int, after: int, data: bytes) -> bytes:
    """``events`` less the hidden usage chunk at ``[start:after]``. llama-server puts its
    ``timings`` on that chunk when usage is asked for (on the finish chunk otherwise), so
    they move to the chunk before it when that one is in the same batch -- where the
    client would have found them had the gateway not asked (in practice always: the engine
    writes both at once)."""
    head, tail = events[:start], events[after:]
    if b'"timings"' not in data or not head:
        return head + tail
    spans = list(event_spans(head))
    if not spans:
        return head + tail
    prev_start, prev_end, _ = spans[-1]
    patched = with_timings(event_data(head[prev_start:prev_end]), data)
    if patched is None:
        return head + tail
    return head[:prev_start] + b"data: " + patched + head[prev_end:] + tail


class RawReader:
    """An engine-native or binary body relayed chunk for chunk as it arrives (llama-server's
    ``/completion`` stream, audio): no events to cut, no end marker to expect, nothing
    appended -- a failure after the first byte can only end the body early."""

    __slots__ = ("_upstream", "estimates_tokens", "stats")

    def __init__(self, upstream: UpstreamResponse) -> None:
        self._upstream = upstream
        self.stats = StreamStats()
        self.estimates_tokens = False

    @property
    def upstream(self) -> UpstreamResponse:
        return self._upstream

    async def first(self) -> bytes:
        return await self._upstream.next_chunk() or b""  # an empty body is a body

    def take(self, data: bytes) -> bytes:
        return data

    async def rest(self) -> AsyncIterator[bytes]:
        upstream = self._upstream
        try:
            while (data := await upstream.next_chunk()) is not None:
                yield data
        except BackendError as exc:
            self.ending(exc)
            return
        self.ending(None)

    def ending(self, error: BackendError | None) -> bytes:
        if error is not None:
            self.stats.failed = _code_for(error)
        else:
            self.stats.done = True
        return b""

    def failure(self, message: str) -> bytes:
        return b""


Reader = SseReader | RawReader
