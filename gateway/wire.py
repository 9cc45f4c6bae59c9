"""What the gateway reads of a client's body: only the fields needed to route it.

Everything else (tools, response_format, images, seed, vendor extras) is never decoded and
is forwarded byte for byte. The decoders and encoders are created once, here.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta

from backends.base import Endpoint
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
    max_tokens: Annotated[int, Meta(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Meta(ge=1)] | None = None
    n: Annotated[int, Meta(ge=1, le=128)] | None = None


_view_decoder = msgspec.json.Decoder(RoutingView)
_any_decoder = msgspec.json.Decoder()
encoder = msgspec.json.Encoder()

_REQUIRED = {
    Endpoint.CHAT: "messages",
    Endpoint.COMPLETIONS: "prompt",
    Endpoint.EMBEDDINGS: "input",
}


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


def parse_routing_view(body: bytes, endpoint: Endpoint) -> RoutingView:
    """Decode and check the routing fields; raise ``InvalidRequest`` with the field named.
    ``model`` may be absent: the route then picks the default model (``default_model``)."""
    view = _decode_view(body)
    if not body.isascii():
        # msgspec skips unknown fields without validating them; never forward bad UTF-8
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidJson(f"the request body is not valid UTF-8 (byte {exc.start})") from None
    required = _REQUIRED[endpoint]
    raw: msgspec.Raw = getattr(view, required)
    if not raw or bytes(raw) == b"null":
        raise InvalidRequest(f"missing required field {required!r}", param=required)
    if endpoint is Endpoint.CHAT and not bytes(raw).startswith(b"["):
        raise InvalidRequest("'messages' must be an array", param="messages")
    return view


def with_model(body: bytes, model: str) -> bytes:
    """The body with ``model`` replaced (aliases only); every other field kept as is."""
    decoded: dict[str, Any] = _any_decoder.decode(body)
    decoded["model"] = model
    return encoder.encode(decoded)


class Usage(msgspec.Struct):
    """The engine's own token counts (OpenAI ``usage``)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0


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
