"""Errors the gateway itself produces, and how each surface renders them.

Every ``GatewayError`` carries its own status, OpenAI ``type``/``code``/``param`` and extra
headers, so renderers never branch on who raised it. The OpenAI surface renders
``{"error": {"message", "type", "param", "code"}}``; nothing ever renders a traceback or a
framework-default body.
"""

from __future__ import annotations

from typing import Any, ClassVar

import msgspec

from backends.errors import BackendError
from policies.estimates import retry_after_seconds

_encoder = msgspec.json.Encoder()


class GatewayError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}
        self.extra = extra  # control plane: details beside the envelope (a fit breakdown)

    def envelope(self) -> dict[str, Any]:
        envelope: dict[str, Any] = {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }
        if self.extra:
            envelope.update(self.extra)
        return envelope


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class InvalidJson(InvalidRequest):
    code = "invalid_json"


# msgspec's decoders recurse; past the interpreter's limit they raise RecursionError
TOO_DEEP = "the JSON body is nested too deeply"


class Unauthorized(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(GatewayError):
    """A valid credential without the right role."""

    status = 403
    type = "permission_error"
    code = "admin_token_required"


class AdminNotConfigured(Forbidden):
    code = "admin_token_not_configured"


class MisdirectedRequest(GatewayError):
    """A ``Host`` this gateway does not answer for (DNS rebinding)."""

    status = 421
    type = "invalid_request_error"
    code = "misdirected_request"


class CrossOriginRefused(Forbidden):
    """A state-changing request from a browser page the CORS allow-list does not name."""

    code = "cross_origin_refused"


class UnsupportedMediaType(GatewayError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class RequestTimeout(GatewayError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class TooManyConnections(GatewayError):
    status = 503
    type = "service_unavailable_error"
    code = "too_many_connections"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class EndpointNotServed(NotFound):
    """The model exists, but its pool's engine does not serve this route."""

    code = "endpoint_not_supported"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class Conflict(GatewayError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class InvalidConfigError(GatewayError):
    """A config (file or reload body) that must not be applied; nothing was changed."""

    status = 422
    type = "invalid_request_error"
    code = "invalid_config"


class LockedError(GatewayError):
    status = 423
    type = "invalid_request_error"
    code = "pool_reserved"


class ReloadFailedError(GatewayError):
    """The new replica set did not come up; it was stopped and the old one kept serving.
    ``409`` as llama-orch's control contract answers it: the pool is in a state that
    refused the change (SPEC.md)."""

    status = 409
    type = "server_error"
    code = "reload_failed"


class BodyTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class HeadersTooLarge(GatewayError):
    status = 431
    type = "invalid_request_error"
    code = "request_header_fields_too_large"


class QueueFullError(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "queue_full"


class PoolUnavailable(GatewayError):
    status = 503
    type = "service_unavailable_error"
    code = "pool_unavailable"


class InsufficientMemoryError(GatewayError):
    status = 503
    type = "service_unavailable_error"
    code = "insufficient_memory"


class ModelUnavailableError(GatewayError):
    status = 503
    type = "service_unavailable_error"
    code = "model_unavailable"


class InternalError(GatewayError):
    status = 500
    type = "server_error"
    code = "internal_error"


def openai_error_bytes(error: GatewayError) -> bytes:
    return _encoder.encode(error.envelope())


def backend_error_status(error: BackendError) -> int:
    """The status a client sees for an upstream failure that exhausted the retries."""
    return error.status if 400 <= error.status < 600 else 502


def backoff_headers(retry_after_s: float) -> dict[str, str]:
    """``Retry-After`` (whole seconds, 1..120) plus the millisecond forms clients read."""
    seconds = retry_after_seconds(retry_after_s)
    millis = str(max(1, int(retry_after_s * 1000)))
    return {"Retry-After": str(seconds), "X-Backoff-Ms": millis, "retry-after-ms": millis}


# Anthropic's error types by status (its SDKs map the status; the type is for people)
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def anthropic_envelope(status: int, envelope: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI error envelope in Anthropic's shape, ``{"type": "error", "error": {type,
    message}}``, keeping the other fields (code, param, n_ctx) beside them."""
    inner = dict(envelope.get("error") or {})
    inner["type"] = _ANTHROPIC_TYPES.get(
        status, "api_error" if status >= 500 else "invalid_request_error"
    )
    return {"type": "error", "error": inner}


class NotLeader(GatewayError):
    """A standby gateway (``[cluster] mode = "standby"``): the leader serves."""

    status = 503
    type = "server_error"
    code = "not_leader"


class StoreUnavailable(GatewayError):
    """``[cluster]``: the shared store did not take a change the next leader must see."""

    status = 503
    type = "server_error"
    code = "cluster_store_unavailable"
