"""Reservation locks: a holder reserves a pool for model swaps and gets a token.

While a pool is reserved, a reload without the holder's token is refused (``Locked``,
HTTP 423); the holder renews or releases with the token, an operator can force a release,
and a reservation ends on its own when its TTL runs out. Only a token's SHA-256 is kept (a
cluster store holds no credential either), compared in constant time, never logged. Pure
state, clock injected; no I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable

import msgspec


class Reservation(msgspec.Struct, frozen=True):
    pool_id: str
    holder: str
    token_sha256: str  # hex digest of the holder's token
    expires_at: float  # the lock's clock
    reserved_at: float  # wall clock, for display

    def view(self, now: float) -> dict[str, object]:
        """What anyone may see: never the token."""
        return {
            "reserved": True,
            "holder": self.holder,
            "reserved_at": round(self.reserved_at, 3),
            "expires_in_s": round(max(0.0, self.expires_at - now), 3),
        }


class ReservationError(Exception):
    def __init__(self, message: str, reservation: Reservation) -> None:
        super().__init__(message)
        self.reservation = reservation


class Locked(ReservationError):
    """The pool is reserved and the caller did not present the holder's token."""


class Taken(ReservationError):
    """Someone else holds the reservation."""


class ReservationBook:
    """One reservation at most per pool."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._held: dict[str, Reservation] = {}

    def now(self) -> float:
        return self._clock()

    def get(self, pool_id: str) -> Reservation | None:
        reservation = self._held.get(pool_id)
        if reservation is not None and reservation.expires_at <= self._clock():
            del self._held[pool_id]  # expired on its own
            return None
        return reservation

    def reserve(
        self, pool_id: str, holder: str, ttl_s: float, token: str | None = None
    ) -> tuple[Reservation, str]:
        """Reserve, or renew with the holder's ``token`` (same token, new expiry); the
        reservation and the token to give the holder (the only time it leaves)."""
        current = self.get(pool_id)
        if current is not None and not _matches(token, current.token_sha256):
            raise Taken(f"pool {pool_id!r} is reserved by {current.holder!r}", current)
        if current is None or token is None:
            token = secrets.token_urlsafe(24)
        reservation = Reservation(
            pool_id=pool_id,
            holder=holder,
            token_sha256=token_digest(token),
            expires_at=self._clock() + ttl_s,
            reserved_at=current.reserved_at if current is not None else time.time(),
        )
        self._held[pool_id] = reservation
        return reservation, token

    def adopt(
        self, pool_id: str, holder: str, token_sha256: str, ttl_left_s: float, reserved_at: float
    ) -> Reservation:
        """A reservation another gateway granted (the cluster store, on a takeover)."""
        reservation = Reservation(
            pool_id=pool_id, holder=holder, token_sha256=token_sha256,
            expires_at=self._clock() + ttl_left_s, reserved_at=reserved_at,
        )  # fmt: skip
        self._held[pool_id] = reservation
        return reservation

    def clear(self) -> None:
        self._held.clear()

    def release(self, pool_id: str, token: str | None, *, force: bool = False) -> bool:
        """End the reservation; True when one was held. Without ``force`` the token must
        match (``Locked`` otherwise)."""
        current = self.get(pool_id)
        if current is None:
            return False
        if not force:
            self.check(pool_id, token)
        del self._held[pool_id]
        return True

    def check(self, pool_id: str, token: str | None) -> None:
        """Raise ``Locked`` unless the pool is free or ``token`` is its holder's."""
        current = self.get(pool_id)
        if current is not None and not _matches(token, current.token_sha256):
            raise Locked(
                f"pool {pool_id!r} is reserved by {current.holder!r}; send its token in "
                "X-Reservation-Token, wait for it to expire, or force-release it",
                current,
            )


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _matches(offered: str | None, digest: str) -> bool:
    return offered is not None and hmac.compare_digest(token_digest(offered), digest)
