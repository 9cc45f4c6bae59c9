"""Bearer-token check: constant-time, 401 when missing, 403 when wrong.

The token is compared as SHA-256 digests with ``hmac.compare_digest``, so neither its
length nor its prefix leaks through timing. The token never appears in logs or errors.
"""

from __future__ import annotations

import hashlib
import hmac

from gateway.errors import Forbidden, Unauthorized


class TokenCheck:
    __slots__ = ("_digest",)

    def __init__(self, token: str | None) -> None:
        self.set_token(token)

    def set_token(self, token: str | None) -> None:
        """A reloaded config's token applies to the next request."""
        self._digest = hashlib.sha256(token.encode()).digest() if token else None

    @property
    def enabled(self) -> bool:
        return self._digest is not None

    def check(self, authorization: bytes | None) -> None:
        """Raise ``Unauthorized``/``Forbidden`` unless ``authorization`` carries the token."""
        if self._digest is None:
            return
        if not authorization:
            raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
        scheme, _, presented = authorization.partition(b" ")
        if scheme.lower() != b"bearer" or not presented.strip():
            raise Unauthorized("the Authorization header must be 'Bearer <token>'")
        digest = hashlib.sha256(presented.strip()).digest()
        if not hmac.compare_digest(digest, self._digest):
            raise Forbidden("invalid bearer token")
