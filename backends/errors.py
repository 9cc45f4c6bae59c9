"""Upstream failures, translated at the boundary into one small hierarchy.

::

    BackendError (replica_id, engine, retryable=False, retry_after_s=None, status=None)
     ├─ BackendUnavailable   connect refused / reset before headers       retryable
     ├─ BackendTimeout       no headers within the deadline               retryable
     ├─ BackendOverloaded    upstream 429/503 (+ its Retry-After)         retryable
     ├─ BackendFailed        upstream 5xx other than 503                  retryable
     ├─ BackendRejected      upstream 4xx: the client's fault, passed on  not retryable
     │   └─ BackendUnservable  a 5xx the engine says is the request's fault (501,
     │                         ``not_supported_error``, "... not supported")  not retryable
     └─ BackendInterrupted   the gateway cut it (shutting down)           not retryable

``answered``: the replica sent a well-formed HTTP answer (any status, or an in-band error
event). Such a replica is alive, whatever the status says: health counts only transport
failures and timeouts against it (``policies.health``).

``retryable`` is explicit per class and defaults to ``False``. Every error carries the body
the client should see, already in the OpenAI envelope: vLLM and llama.cpp send integer
``code`` values and their own ``type`` names, which :func:`openai_error_body` normalises.
This module must not import an HTTP library.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import msgspec

_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()

# llama.cpp and vLLM type names -> the OpenAI vocabulary.
_TYPE_BY_UPSTREAM = {
    "invalid_request_error": "invalid_request_error",
    "BadRequestError": "invalid_request_error",
    "exceed_context_size_error": "invalid_request_error",
    "authentication_error": "authentication_error",
    "permission_error": "permission_error",
    "not_found_error": "invalid_request_error",
    "NotFoundError": "invalid_request_error",
    "server_error": "server_error",
    "InternalServerError": "server_error",
    "not_supported_error": "invalid_request_error",
    "unavailable_error": "service_unavailable_error",
    "ServiceUnavailableError": "service_unavailable_error",
}

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


def _type_for(status: int, upstream_type: object) -> str:
    if status == 429:
        return "rate_limit_error"
    if isinstance(upstream_type, str) and upstream_type in _TYPE_BY_UPSTREAM:
        return _TYPE_BY_UPSTREAM[upstream_type]
    if isinstance(upstream_type, str) and upstream_type.endswith("_error"):
        return upstream_type
    return _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")


def openai_error_body(status: int, raw: bytes) -> dict[str, Any]:
    """Any upstream error body as ``{"error": {message, type, param, code, ...}}``.

    An OpenAI envelope (``error.message`` and ``error.type`` strings: OpenAI's, llama.cpp's,
    vLLM's nested one) is passed on as the engine wrote it; other shapes (vLLM's older flat
    ``{"object": "error", ...}``, plain text, a bare ``{"error": "..."}``) are normalised,
    anything unreadable becomes a generic message.
    """
    try:
        parsed = _decoder.decode(raw) if raw else None
    except msgspec.DecodeError:
        parsed = None
    if (
        isinstance(parsed, dict)
        and isinstance(parsed.get("error"), dict)
        and isinstance(parsed["error"].get("message"), str)
        and _OPENAI_STYLE_TYPE.match(str(parsed["error"].get("type")))
    ):
        # already an OpenAI envelope (llama.cpp's and vLLM's are): passed on as written --
        # type and extra fields (llama.cpp's exceed_context_size_error with its
        # n_prompt_tokens and n_ctx). One exception: engines repeat the HTTP status as an
        # integer "code", which OpenAI types as a string; typed clients (Go, Rust, Java)
        # fail to decode the whole error on it, so a non-string code becomes null.
        as_written: dict[str, Any] = {"param": None, **parsed["error"]}
        if not isinstance(as_written.get("code"), str):
            as_written["code"] = None
        if status == 429:  # whatever the engine called it, a 429 is a rate limit to a client
            as_written["type"] = "rate_limit_error"
        return {"error": as_written}
    inner: dict[str, Any]
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        inner = parsed["error"]
    elif isinstance(parsed, dict) and ("message" in parsed or parsed.get("object") == "error"):
        inner = parsed
    elif isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
        inner = {"message": parsed["error"]}
    else:
        text = raw[:500].decode("utf-8", "replace").strip() if raw else ""
        inner = {"message": text or f"upstream returned HTTP {status}"}
    code = inner.get("code")
    upstream_type = inner.get("type")
    if not isinstance(code, str):
        # vLLM's flat shape puts the HTTP status in "code"; a specific type name is the
        # more useful code
        code = upstream_type if upstream_type in _SPECIFIC_TYPES else None
    error: dict[str, Any] = {
        **{k: v for k, v in inner.items() if k not in _ENVELOPE_KEYS},
        "message": str(inner.get("message") or f"upstream returned HTTP {status}"),
        "type": _type_for(status, upstream_type),
        "param": inner.get("param") if isinstance(inner.get("param"), str) else None,
        "code": code,
    }
    return {"error": error}


# OpenAI's vocabulary and llama.cpp's own (exceed_context_size_error, unavailable_error):
# snake_case names ending in _error. vLLM's are Python class names (BadRequestError): mapped.
_OPENAI_STYLE_TYPE = re.compile(r"^[a-z][a-z0-9_]*_error\Z")
_ENVELOPE_KEYS = frozenset({"message", "type", "param", "code", "object"})
# upstream type names specific enough to serve as the OpenAI "code"
_SPECIFIC_TYPES = frozenset({"exceed_context_size_error", "not_supported_error"})


class BackendError(Exception):
    """A replica failed to serve a call. ``body`` is an OpenAI error envelope."""

    retryable: ClassVar[bool] = False
    default_status: ClassVar[int] = 502
    kind: ClassVar[str] = "error"  # the ``kind`` label of upstream error metrics

    def __init__(
        self,
        message: str,
        *,
        replica_id: str = "",
        engine: str = "",
        status: int | None = None,
        retry_after_s: float | None = None,
        body: dict[str, Any] | None = None,
        answered: bool = False,
        raw: bytes | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.replica_id = replica_id
        self.engine = engine
        self.status = status or self.default_status
        self.retry_after_s = retry_after_s
        self.attempts = 1  # set by dispatch when retries were exhausted
        self.answered = answered  # the upstream answered this error itself (module doc)
        self.raw = raw  # the upstream's own error body, for surfaces that pass it on as is
        self.body = body or {
            "error": {
                "message": message,
                "type": _type_for(self.status, None),
                "param": None,
                "code": None,
            }
        }

    def encoded_body(self) -> bytes:
        return _encoder.encode(self.body)


class BackendUnavailable(BackendError):
    retryable = True
    default_status = 502
    kind = "unavailable"


class BackendTimeout(BackendError):
    retryable = True
    default_status = 504
    kind = "timeout"


class BackendOverloaded(BackendError):
    retryable = True
    default_status = 503
    kind = "overloaded"


class BackendFailed(BackendError):
    retryable = True
    default_status = 502
    kind = "failed"


class BackendRejected(BackendError):
    retryable = False
    default_status = 400
    kind = "rejected"


class BackendUnservable(BackendRejected):
    """Engines answer some bad requests with a 5xx (llama-server: embeddings without
    ``--embeddings`` is 501, an image to a text model 500): the request's error, passed
    on as it is, never retried elsewhere and never held against the replica."""

    default_status = 501
    kind = "unservable"


class BackendDeviceError(BackendError):
    """An accelerator worker's own error answer (the OpenVINO worker's 503 when the NPU's
    busy time did not move, its 500 when generation failed): the device's word on this
    request, passed on as the worker said it. Never retried: another attempt would run a
    whole generation again on the same device, and a 503 here is not overload."""

    retryable = False
    default_status = 500
    kind = "device"


class BackendInterrupted(BackendError):
    retryable = False
    default_status = 503
    kind = "interrupted"


def error_from_status(
    status: int,
    raw: bytes,
    *,
    replica_id: str,
    engine: str,
    retry_after: str | None,
) -> BackendError:
    """Map an upstream non-2xx answer to the right class, keeping its status and message."""
    body = openai_error_body(status, raw)
    message = body["error"]["message"]
    retry_after_s = parse_retry_after(retry_after)
    cls: type[BackendError]
    if status in (429, 503):
        cls = BackendOverloaded
    elif status in (408, 504):
        cls = BackendTimeout
    elif status >= 500 and _names_the_request(status, raw, message):
        cls = BackendUnservable
    elif status >= 500:
        cls = BackendFailed
    elif status == 409:
        cls = BackendFailed  # a conflict is transient by OpenAI convention; try again
    else:
        cls = BackendRejected
    return cls(
        message,
        replica_id=replica_id,
        engine=engine,
        status=status,
        retry_after_s=retry_after_s,
        body=body,
        answered=True,
        raw=raw,
    )


# what engines say when a request asks for something this server cannot do
_UNSERVABLE_TYPES = (b'"not_supported_error"', b'"NotImplementedError"')
_UNSERVABLE_WORDS = ("not supported", "unsupported", "does not support", "not implemented")


def _names_the_request(status: int, raw: bytes, message: str) -> bool:
    if status == 501 or any(t in raw for t in _UNSERVABLE_TYPES):
        return True
    lowered = message.lower()
    return any(word in lowered for word in _UNSERVABLE_WORDS)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header; HTTP-dates are treated as unknown."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None
