"""Reservations (pool swap locks) in Redis, so a new leader honours the ones granted.

``<prefix>:resv:<pool>`` is a hash ``{holder, sha, reserved_at}`` expiring with the
reservation (``PX``): only the token's SHA-256, never the token. Writes are fenced by the
leader lease (one Lua script each): a former leader cannot grant or drop one. A node that
takes the lead adopts what is there, with the time each has left.
"""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.cluster.lease import LeaderLease
from policies.reservation import Reservation, ReservationBook

_SAVE = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return -1 end
redis.call('HSET', KEYS[1], 'holder', ARGV[2], 'sha', ARGV[3], 'reserved_at', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"""
_DROP = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return -1 end
return redis.call('DEL', KEYS[1])
"""


class NotStored(Exception):
    """Redis refused the write: this node does not lead (or no longer)."""


class RedisReservations:
    """``gateway.lifecycle.manager.ReservationStore`` on Redis."""

    def __init__(self, client: Any, *, prefix: str, lease: LeaderLease, op_timeout_s: float):
        self._client = client
        self._prefix = prefix
        self._lease = lease
        self._op_timeout_s = op_timeout_s
        self._save = client.register_script(_SAVE)
        self._drop = client.register_script(_DROP)

    def _key(self, pool_id: str) -> str:
        return f"{self._prefix}:resv:{pool_id}"

    async def save(self, reservation: Reservation, ttl_s: float) -> None:
        args = [self._lease.value, reservation.holder, reservation.token_sha256,
                repr(reservation.reserved_at), max(1, int(ttl_s * 1000))]  # fmt: skip
        async with asyncio.timeout(self._op_timeout_s):
            stored = await self._save(keys=[self._key(reservation.pool_id), self._lease.key],
                                      args=args)  # fmt: skip
        if stored != 1:
            raise NotStored(reservation.pool_id)

    async def drop(self, pool_id: str) -> None:
        async with asyncio.timeout(self._op_timeout_s):
            dropped = await self._drop(keys=[self._key(pool_id), self._lease.key],
                                       args=[self._lease.value])  # fmt: skip
        if dropped == -1:
            raise NotStored(pool_id)

    async def adopt_into(self, book: ReservationBook) -> int:
        """Replace the book's reservations with the stored ones; how many there were."""
        found: list[tuple[str, dict[bytes, bytes], int]] = []
        prefix = self._key("")
        async for key in self._client.scan_iter(match=prefix + "*", count=256):
            fields = await self._client.hgetall(key)
            left_ms = await self._client.pttl(key)
            if fields and isinstance(left_ms, int) and left_ms > 0:
                found.append((key.decode()[len(prefix) :], fields, left_ms))
        book.clear()
        for pool_id, fields, left_ms in found:
            book.adopt(pool_id, fields[b"holder"].decode(), fields[b"sha"].decode(),
                       left_ms / 1000, float(fields[b"reserved_at"]))  # fmt: skip
        return len(found)
