"""What the gateway reads of a client's body: only the fields needed to route it.

Everything else (tools, response_format, images, seed, vendor extras) is never decoded and
is forwarded byte for byte. The decoders and encoders are created once, here.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta

from gateway.errors import TOO_DEEP, InvalidJson, InvalidRequest


class StreamOptions(msgspec.Struct):
    include_usage: bool | None = None


class RoutingView(msgspec.Struct):
    """The routing-relevant subset of a chat, completions or embeddings body."""

    model: Annotated[str, Meta(min_length=1)] | None = None
    stream: bool | None = None
    # UNSET: absent; None: the client sent ``null`` (both mean "no usage chunk asked for")
    stream_options: StreamOptions | None | msgspec.UnsetType = msgspec.UNSET
    # Raw: presence and shape are checked without decoding the (possibly large) content.
    messages: msgspec.Raw = msgspec.Raw()
    prompt: msgspec.Raw = msgspec.Raw()
    input: msgspec.Raw = msgspec.Raw()
    query: msgspec.Raw = msgspec.Raw()  # rerank
    documents: msgspec.Raw = msgspec.Raw()  # rerank
    texts: msgspec.Raw = msgspec.Raw()  # rerank, as Hugging Face TEI names the documents
    max_tokens: Annotated[int, Meta(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Meta(ge=1)] | None = None
    max_output_tokens: Annotated[int, Meta(ge=1)] | None = None  # Responses API
    n: Annotated[int, Meta(ge=1, le=128)] | None = None


_view_decoder = msgspec.json.Decoder(RoutingView)
_any_decoder = msgspec.json.Decoder()
encoder = msgspec.json.Encoder()


def _decode_view(body: bytes) -> RoutingView:
    if not body:
        raise InvalidJson("the request body is empty; expected a JSON object")
    try:
        return _view_decoder.decode(body)
    except msgspec.ValidationError as exc:
        message, _, path = str(exc).partition(" - at `$.")
        param = path.rstrip("`").split(".")[0].split("[")[0] or None
        if message.startswith("Expected `object`"):
            raise InvalidJson("the request body must be a JSON object") from None
        raise InvalidRequest(f"invalid field {param!r}: {message}", param=param) from None
    except msgspec.DecodeError as exc:
        raise InvalidJson(f"the request body is not valid JSON: {exc}") from None
    except UnicodeDecodeError as exc:  # bad UTF-8 inside a decoded string field
        raise InvalidJson(f"the request body is not valid UTF-8: {exc.reason}") from None
    except RecursionError:
        raise InvalidJson(TOO_DEEP) from None


def parse_routing_view(body: bytes) -> RoutingView:
    """Decode and check the routing fields; raise ``InvalidRequest`` with the field named.
    ``model`` may be absent: the route then picks the default model."""
    view = _decode_view(body)
    if not body.isascii():
        # msgspec skips unknown fields without validating them; never forward bad UTF-8
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidJson(f"the request body is not valid UTF-8 (byte {exc.start})") from None
    return view


def require(view: RoutingView, required: tuple[str, ...], arrays: tuple[str, ...] = ()) -> None:
    """``required``: fields that must be present and not null (``"a|b"``: either), and
    ``arrays`` those of them that must be arrays (each endpoint's own, ``gateway.endpoints``)."""
    for wanted in required:
        for field in wanted.split("|"):
            raw: msgspec.Raw = getattr(view, field)
            if raw and bytes(raw) != b"null":
                break
        else:
            first = wanted.split("|")[0]
            either = " or ".join(repr(f) for f in wanted.split("|"))
            raise InvalidRequest(f"missing required field {either}", param=first)
        if field in arrays and not bytes(raw).startswith(b"["):
            raise InvalidRequest(f"{field!r} must be an array", param=field)


class Multipart:
    """The form fields of a ``multipart/form-data`` body (audio uploads), found without
    copying the file part: ``fields`` holds the small text fields (``model``, ``stream``),
    ``files`` the names of the file parts."""

    __slots__ = ("boundary", "fields", "files", "_spans")

    def __init__(self, body: bytes, content_type: bytes | None) -> None:
        boundary = _boundary(content_type)
        if boundary is None:
            raise InvalidRequest(
                "send the upload as multipart/form-data with a boundary", param="Content-Type"
            )
        self.boundary = boundary
        self.fields: dict[str, bytes] = {}
        self.files: set[str] = set()
        self._spans: dict[str, tuple[int, int]] = {}  # field -> its value's offsets
        delimiter = b"--" + boundary
        position = body.find(delimiter)
        while position >= 0:
            start = position + len(delimiter)
            if body.startswith(b"--", start):
                return  # the closing delimiter
            head_end = body.find(b"\r\n\r\n", start)
            end = body.find(b"\r\n" + delimiter, head_end + 4) if head_end >= 0 else -1
            if end < 0:
                break
            name, is_file = _disposition(body[start:head_end])
            if name is not None:
                if is_file:
                    self.files.add(name)
                elif end - head_end - 4 <= 4096:
                    self.fields[name] = body[head_end + 4 : end]
                    self._spans[name] = (head_end + 4, end)
            position = end + 2
        raise InvalidRequest("the multipart body is truncated or malformed")

    def text(self, name: str) -> str | None:
        value = self.fields.get(name)
        if value is None:
            return None
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequest(f"form field {name!r} is not UTF-8", param=name) from None

    def replaced(self, body: bytes, name: str, value: str) -> bytes:
        """``body`` with the text field ``name`` set to ``value`` (an alias resolved)."""
        start, end = self._spans[name]
        return body[:start] + value.encode() + body[end:]


def _boundary(content_type: bytes | None) -> bytes | None:
    if content_type is None:
        return None
    media, _, params = content_type.partition(b";")
    if media.strip().lower() != b"multipart/form-data":
        return None
    for param in params.split(b";"):
        key, _, value = param.strip().partition(b"=")
        if key.lower() == b"boundary" and value:
            value = value.strip(b'"')
            return value if 0 < len(value) <= 70 else None
    return None


def _disposition(head: bytes) -> tuple[str | None, bool]:
    """The form name of a part and whether it is a file, from its headers."""
    for line in head.split(b"\r\n"):
        key, _, value = line.partition(b":")
        if key.strip().lower() != b"content-disposition":
            continue
        name = None
        is_file = False
        for param in value.split(b";")[1:]:
            k, _, v = param.strip().partition(b"=")
            k = k.lower()
            if k == b"name":
                name = v.strip(b'"').decode("utf-8", "replace")
            elif k in (b"filename", b"filename*"):
                is_file = True
        return name, is_file
    return None, False


def with_model(body: bytes, model: str) -> bytes:
    """The body with ``model`` replaced (aliases only); every other field kept as is."""
    decoded: dict[str, Any] = _any_decoder.decode(body)
    decoded["model"] = model
    return encoder.encode(decoded)


class Usage(msgspec.Struct):
    """The engine's own token counts: OpenAI chat and completions name them
    ``prompt_tokens``/``completion_tokens``, the Responses API and Anthropic
    ``input_tokens``/``output_tokens``."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    input_tokens: int = 0
    output_tokens: int = 0

    def tokens(self) -> tuple[int, int]:
        return (
            self.prompt_tokens or self.input_tokens,
            self.completion_tokens or self.output_tokens,
        )


class _WithUsage(msgspec.Struct):
    usage: Usage | None = None
    choices: list[msgspec.Raw] | None = None


_usage_decoder = msgspec.json.Decoder(_WithUsage)


def usage_of(data: bytes) -> tuple[Usage | None, bool]:
    """``(usage, usage_only)`` of a response body or one SSE event's JSON; ``usage_only``:
    the ``include_usage`` chunk (``"choices": []``). Never raises: accounting is best effort.
    """
    try:
        decoded = _usage_decoder.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None, False
    return decoded.usage, decoded.choices == []


def with_timings(chunk: bytes | None, usage_chunk: bytes) -> bytes | None:
    """``chunk`` (an event's JSON) with the ``timings`` of ``usage_chunk`` added, or None
    when either is not a JSON object or ``chunk`` has its own."""
    if chunk is None:
        return None
    try:
        target = _any_decoder.decode(chunk)
        source = _any_decoder.decode(usage_chunk)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None
    if not (isinstance(target, dict) and isinstance(source, dict)) or "timings" in target:
        return None
    target["timings"] = source.get("timings")
    return encoder.encode(target)


_ASK_FOR_USAGE = b'"stream_options":{"include_usage":true},'


def with_stream_usage(body: bytes, *, replace: bool = False) -> bytes:
    """Ask the engine for its final usage chunk (token metrics must not depend on the
    client asking). Only for bodies that do not ask themselves; the chunk is removed from
    the client's stream again (``SseReader(hide_usage=True)``). ``replace``: the body has
    ``"stream_options": null``, which is rewritten rather than given a second key."""
    if replace:
        decoded: dict[str, Any] = _any_decoder.decode(body)
        decoded["stream_options"] = {"include_usage": True}
        return encoder.encode(decoded)
    start = body.index(b"{") + 1  # the routing view proved it is a non-empty object
    return body[:start] + _ASK_FOR_USAGE + body[start:]


def model_object(name: str, canonical: str, pool: str, created: int) -> dict[str, Any]:
    """One OpenAI ``Model``: what ``GET /v1/models/{id}`` answers and the list holds."""
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "orchgate",
        "root": canonical,
        "pool": pool,
    }


def models_list(models: list[dict[str, Any]]) -> bytes:
    """``GET /v1/models``: OpenAI list shape of ``model_object`` entries."""
    return encoder.encode({"object": "list", "data": models})
