"""Per-request checks that keep hostile browser pages out, on every route, before routing.

* ``Host`` must name this gateway: a loopback name, the bind address or one of
  ``server.allowed_hosts``. A DNS-rebinding page reaches 127.0.0.1 under its own name and
  is refused here (421), so it can neither read answers nor drive the API.
* A state-changing request (POST, PUT, PATCH, DELETE) that a browser marks as coming from
  another site (``Origin``, else ``Sec-Fetch-Site``) needs that origin in the CORS
  allow-list (403): a page cannot use ``mode: "no-cors"`` or a form to fire requests.
* A body on a state-changing request must be declared ``application/json`` (415): the
  content types a page may send without a CORS preflight are exactly the others. The
  upload route (audio transcriptions) also takes ``multipart/form-data``: browsers mark
  every cross-site POST with ``Origin``, so the rule above still keeps pages out.
* The request head as a whole stays under ``server.max_header_bytes`` (431) -- the front
  door enforces this while parsing; this is the same rule for any other ASGI server.

One pass over the headers; no allocation on the common path.
"""

from __future__ import annotations

from typing import Any

from gateway.errors import (
    CrossOriginRefused,
    GatewayError,
    HeadersTooLarge,
    MisdirectedRequest,
    UnsupportedMediaType,
)

_LOOPBACK_NAMES = (b"localhost", b"127.0.0.1", b"[::1]", b"::1")
_WILDCARD_BINDS = ("0.0.0.0", "::", "")
_STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_TRUSTED_FETCH_SITES = (b"same-origin", b"none")


def _host_name(value: bytes) -> bytes:
    """``Host`` without its port, lower-case, without a trailing dot."""
    if value.startswith(b"["):
        end = value.find(b"]")
        name = value[: end + 1] if end > 0 else value
    else:
        name = value.rsplit(b":", 1)[0] if value.count(b":") == 1 else value
    return name.lower().rstrip(b".")


class RequestGuard:
    __slots__ = (
        "_any_host",
        "_any_origin",
        "_hosts",
        "_max_header_bytes",
        "_multipart_paths",
        "_origins",
    )

    def __init__(
        self,
        *,
        bind_host: str,
        allowed_hosts: list[str],
        cors_origins: list[str],
        max_header_bytes: int,
        multipart_paths: frozenset[str] = frozenset(),
    ) -> None:
        self._any_host = bind_host in _WILDCARD_BINDS and not allowed_hosts
        hosts = {*_LOOPBACK_NAMES, *(h.lower().rstrip(".").encode() for h in allowed_hosts)}
        if bind_host not in _WILDCARD_BINDS:
            hosts.add((f"[{bind_host}]" if ":" in bind_host else bind_host).lower().encode())
        self._hosts = frozenset(hosts)
        self._origins = frozenset(o.encode() for o in cors_origins)
        self._any_origin = "*" in cors_origins
        self._max_header_bytes = max_header_bytes
        # uploads (audio) are form posts; the Origin checks above still apply to them
        self._multipart_paths = multipart_paths

    def check(self, scope: Any) -> GatewayError | None:
        size, host, origin, fetch_site, content_type, has_body = _scan(scope["headers"])
        if size > self._max_header_bytes:
            return HeadersTooLarge(
                f"the request headers exceed the {self._max_header_bytes}-byte limit"
            )
        if host is not None and not self._any_host and _host_name(host) not in self._hosts:
            return MisdirectedRequest(
                "this gateway does not answer for that Host; add it to server.allowed_hosts",
                param="Host",
            )
        if scope["method"] not in _STATE_CHANGING:
            return None
        if origin is not None:
            if not (self._any_origin or origin in self._origins or _same_origin(origin, host)):
                return CrossOriginRefused(
                    "a state-changing request from another origin: add it to "
                    "server.cors.allow_origins to allow it",
                    param="Origin",
                )
        elif fetch_site is not None and fetch_site not in _TRUSTED_FETCH_SITES:
            return CrossOriginRefused("a state-changing request from another site")
        if has_body and not _is_json(content_type):
            if scope["path"] in self._multipart_paths and _is_multipart(content_type):
                return None
            return UnsupportedMediaType(
                "send the body as JSON with 'Content-Type: application/json'",
                param="Content-Type",
            )
        return None


_Seen = tuple[int, bytes | None, bytes | None, bytes | None, bytes | None, bool]


def _scan(headers: list[tuple[bytes, bytes]]) -> _Seen:
    """Head size, Host, Origin, Sec-Fetch-Site, Content-Type, whether a body follows."""
    host = origin = fetch_site = content_type = None
    has_body = False
    size = 0
    for name, value in headers:
        size += len(name) + len(value)
        if name == b"host":
            host = value
        elif name == b"origin":
            origin = value
        elif name == b"content-type":
            content_type = value
        elif name == b"content-length":
            has_body = value != b"0"
        elif name == b"sec-fetch-site":
            fetch_site = value
        elif name == b"transfer-encoding":
            has_body = True
    return size, host, origin, fetch_site, content_type, has_body


def _same_origin(origin: bytes, host: bytes | None) -> bool:
    if host is None:
        return False
    scheme, sep, rest = origin.partition(b"://")
    return bool(sep) and scheme in (b"http", b"https") and rest.lower() == host.lower()


def _is_multipart(content_type: bytes | None) -> bool:
    return content_type is not None and content_type.split(b";", 1)[0].strip().lower() == (
        b"multipart/form-data"
    )


def _is_json(content_type: bytes | None) -> bool:
    if content_type is None:
        return False
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (
        media.startswith(b"application/") and media.endswith(b"+json")
    )
