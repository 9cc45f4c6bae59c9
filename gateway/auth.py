"""Two credentials, two roles: the data token (OpenAI routes, tasks, read-only status) and
the admin token (anything that changes what runs: reloads, config reload, forced release
of a reservation).

Tokens are compared as SHA-256 digests with ``hmac.compare_digest``, so neither their
length nor a prefix leaks through timing. A token never appears in logs or errors.

Answers follow OpenAI's: a missing or wrong credential is 401 ``invalid_api_key`` (the
SDKs raise ``AuthenticationError`` for it); a valid data token on an admin route is 403;
an admin route with no admin token configured is refused for everyone, loopback included
(403 ``admin_token_not_configured``): a page in the operator's browser can reach
127.0.0.1 too.
"""

from __future__ import annotations

import hashlib
import hmac

from gateway.errors import AdminNotConfigured, Forbidden, Unauthorized


def _digest(token: str | None) -> bytes | None:
    return hashlib.sha256(token.encode()).digest() if token else None


def _presented(authorization: bytes | None) -> bytes:
    """The bearer credential, or raise 401 saying what was expected."""
    if not authorization:
        raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
    scheme, _, presented = authorization.partition(b" ")
    presented = presented.strip()
    if scheme.lower() != b"bearer" or not presented:
        raise Unauthorized("the Authorization header must be 'Bearer <token>'")
    return hashlib.sha256(presented).digest()


class TokenCheck:
    __slots__ = ("_admin", "_data")

    def __init__(self, token: str | None, admin_token: str | None = None) -> None:
        self.set_tokens(token, admin_token)

    def set_tokens(self, token: str | None, admin_token: str | None) -> None:
        """A reloaded config's tokens apply to the next request."""
        self._data = _digest(token)
        self._admin = _digest(admin_token)

    @property
    def enabled(self) -> bool:
        """Whether the data plane needs a credential."""
        return self._data is not None

    def check(self, authorization: bytes | None) -> None:
        """Data plane: pass with the data token or the admin token (when a data token is
        configured at all); else raise 401."""
        if self._data is None:
            return
        digest = _presented(authorization)
        # both compared, always: which one matched must not show in the timing
        data_ok = hmac.compare_digest(digest, self._data)
        admin_ok = self._admin is not None and hmac.compare_digest(digest, self._admin)
        if not (data_ok or admin_ok):
            raise Unauthorized("invalid bearer token")

    def check_admin(self, authorization: bytes | None) -> None:
        """Control plane: pass with the admin token only."""
        if self._admin is None:
            raise AdminNotConfigured(
                "this route changes what the gateway runs and needs the admin token, and "
                "none is configured: set [auth] admin_token or ORCHGATE_ADMIN_TOKEN"
            )
        digest = _presented(authorization)
        if hmac.compare_digest(digest, self._admin):
            return
        if self._data is not None and hmac.compare_digest(digest, self._data):
            raise Forbidden("this route needs the admin token; the data token is not enough")
        raise Unauthorized("invalid bearer token")
