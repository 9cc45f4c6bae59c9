"""Pure translation: routing view, upstream error normalisation, the SSE event cutter."""

from __future__ import annotations

from typing import Any

import pytest

from backends.errors import error_from_status, openai_error_body
from gateway.errors import InvalidJson, InvalidRequest
from gateway.streaming import SseReader
from gateway.wire import Multipart, parse_routing_view, require, with_model


def test_routing_view_reads_only_what_it_needs() -> None:
    view = parse_routing_view(
        b'{"model":"m","messages":[{"a":1}],"stream":true,"tools":[{"deep":{"er":[1,2,3]}}]}'
    )
    assert view.model == "m" and view.stream is True
    require(view, ("messages",), ("messages",))
    with pytest.raises(InvalidJson):
        parse_routing_view(b"{")
    with pytest.raises(InvalidRequest, match="'prompt'"):
        require(parse_routing_view(b'{"model":"m"}'), ("prompt",))
    with pytest.raises(InvalidRequest, match="'input'"):
        require(parse_routing_view(b'{"model":"m","input":null}'), ("input",))
    with pytest.raises(InvalidRequest, match="'documents' must be an array"):
        view = parse_routing_view(b'{"query":"q","documents":"d"}')
        require(view, ("query", "documents"), ("documents",))


def test_multipart_fields_are_found_without_copying_the_file() -> None:
    body = (
        b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        b"Content-Type: audio/wav\r\n\r\nRIFF\x00\x01--xy\r\n"
        b'--xyz\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper\r\n'
        b"--xyz--\r\n"
    )
    form = Multipart(body, b'multipart/form-data; boundary="xyz"')
    assert form.files == {"file"} and form.text("model") == "whisper"
    renamed = form.replaced(body, "model", "whisper-large")
    assert Multipart(renamed, b"multipart/form-data; boundary=xyz").text("model") == (
        "whisper-large"
    )
    with pytest.raises(InvalidRequest, match="truncated"):
        Multipart(body[:60], b"multipart/form-data; boundary=xyz")
    with pytest.raises(InvalidRequest, match="boundary"):
        Multipart(body, b"multipart/form-data")


def test_with_model_keeps_every_other_field() -> None:
    out = with_model(b'{"model":"a","x":{"y":[1,"\\u00e9"]},"z":null}', "b")
    assert out == '{"model":"b","x":{"y":[1,"é"]},"z":null}'.encode()


@pytest.mark.parametrize(
    "raw,expected",
    [
        (
            b'{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}',
            {  # llama.cpp's envelope: as written, but for its integer code
                "message": "Loading model",
                "type": "unavailable_error",
                "param": None,
                "code": None,
            },
        ),
        (
            b'{"object":"error","message":"m","type":"BadRequestError","param":"n","code":400}',
            {"message": "m", "type": "invalid_request_error", "param": "n", "code": None},
        ),
        (
            b'{"error":{"message":"k","type":"invalid_request_error","param":null,"code":"bad_key"}}',
            {"message": "k", "type": "invalid_request_error", "param": None, "code": "bad_key"},
        ),
        (
            b"<html>oops</html>",
            {
                "message": "<html>oops</html>",
                "type": "service_unavailable_error",
                "param": None,
                "code": None,
            },
        ),
    ],
)
def test_openai_error_body(raw: bytes, expected: dict) -> None:
    assert (
        openai_error_body(503 if b"html" in raw or b"503" in raw else 400, raw)["error"] == expected
    )


def test_status_classes() -> None:
    assert error_from_status(503, b"", replica_id="r", engine="e", retry_after="3").retryable
    assert (
        error_from_status(503, b"", replica_id="r", engine="e", retry_after="3").retry_after_s
        == 3.0
    )
    assert error_from_status(500, b"", replica_id="r", engine="e", retry_after=None).retryable
    assert not error_from_status(400, b"", replica_id="r", engine="e", retry_after=None).retryable
    assert not error_from_status(404, b"", replica_id="r", engine="e", retry_after=None).retryable


class Upstream:
    """An upstream body in fixed pieces, pulled (the relay's pipe is tested end to end)."""

    def __init__(self, parts: list[bytes]) -> None:
        self.parts = parts
        self._left = list(parts)
        self.status = 200
        self.content_type = "text/event-stream"

    async def next_chunk(self) -> bytes | None:
        return self._left.pop(0) if self._left else None

    def pipe(self, on_data: Any, on_end: Any) -> bool:
        return False

    def hold(self) -> None:
        pass

    def release(self) -> None:
        pass

    async def read(self) -> bytes:
        return b"".join(self.parts)

    async def aclose(self) -> None:
        pass


async def collect(parts: list[bytes]) -> list[bytes]:
    """What the relay sends for ``parts``, pulled (``rest``); pushed (``take`` per piece,
    then ``ending``, as ``gateway.splice`` drives it) must send exactly the same."""
    reader = SseReader(Upstream(parts))
    out = [await reader.first()]
    out += [b async for b in reader.rest()]
    pushed = SseReader(upstream := Upstream(parts))
    same = [await pushed.first()]
    same += [batch for part in list(upstream._left) if (batch := pushed.take(part))]
    if ending := pushed.ending(None):
        same.append(ending)
    assert same == out, (same, out)
    assert (pushed.stats.events, pushed.stats.done) == (reader.stats.events, reader.stats.done)
    return out


async def test_events_are_never_split_or_reordered() -> None:
    out = await collect(
        [b'data: {"a"', b":1}\n", b'\ndata: {"b":2}\n\ndata: {"c"', b":3}\n\ndata: [DONE]\n\n"]
    )
    # whole events only, as soon as they are complete, in upstream order
    assert out == [b'data: {"a":1}\n\ndata: {"b":2}\n\n', b'data: {"c":3}\n\ndata: [DONE]\n\n']


async def test_llamacpp_error_line_is_translated() -> None:
    out = await collect(
        [
            b'data: {"a":1}\n\n',
            b'error: {"code":500,"message":"boom","type":"server_error"}\n\n',
            b"data: [DONE]\n\n",
        ]
    )
    assert out[1] == (
        b'data: {"error":{"message":"boom","type":"server_error","param":null,"code":null}}\n\n'
    )


async def test_truncated_stream_gets_error_and_done() -> None:
    out = await collect([b'data: {"a":1}\n\n', b'data: {"b":'])
    events = b"".join(out).split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""]  # the stream's last event
    assert b"without [DONE]" in events[-3] and events[-4] == b'data: {"b":'  # tail kept


def test_upstream_errors_keep_what_the_engine_said() -> None:
    llama = (
        b'{"error":{"code":400,"message":"the request exceeds the available context size",'
        b'"type":"exceed_context_size_error","n_prompt_tokens":5000,"n_ctx":4096}}'
    )
    error = openai_error_body(400, llama)["error"]
    assert error["type"] == "exceed_context_size_error"  # as llama.cpp wrote it
    assert error["code"] is None  # its integer status: OpenAI types code as a string
    assert (error["n_prompt_tokens"], error["n_ctx"]) == (5000, 4096)
    openai_shape = (
        b'{"error":{"message":"m","type":"invalid_request_error","param":"x","code":"c"}}'
    )
    assert openai_error_body(400, openai_shape)["error"] == {
        "message": "m", "type": "invalid_request_error", "param": "x", "code": "c",
    }  # fmt: skip
    vllm = b'{"object":"error","message":"bad","type":"BadRequestError","param":null,"code":400}'
    assert openai_error_body(400, vllm)["error"] == {
        "message": "bad", "type": "invalid_request_error", "param": None, "code": None,
    }  # fmt: skip
