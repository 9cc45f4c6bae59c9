"""dispatch(): admission -> placement -> send -> first byte, shared by every surface.

Retries happen only here and only before anything reached the client: a connect failure,
an upstream 5xx/429, or a stream that fails before its first event releases the slot,
backs off and goes to another ready replica when there is one. After :class:`Committed`
is returned, the caller owns the upstream response and the lease and must close both.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from backends.base import UpstreamCall, UpstreamResponse
from backends.errors import BackendError, BackendOverloaded, BackendUnavailable
from gateway.streaming import SseReader
from policies.admission import Lease, Priority, Ticket
from policies.health import mark_unreachable

if TYPE_CHECKING:
    from gateway.state import PoolRuntime

MAX_ATTEMPTS = 3
BASE_BACKOFF_S = 0.05
MAX_BACKOFF_S = 2.0


class Committed:
    """An upstream response that produced its first byte, and the slot it holds."""

    __slots__ = ("attempts", "first", "lease", "reader", "upstream")

    def __init__(
        self,
        lease: Lease,
        upstream: UpstreamResponse,
        attempts: int,
        reader: SseReader | None = None,
        first: bytes = b"",
    ) -> None:
        self.lease = lease
        self.upstream = upstream
        self.attempts = attempts
        self.reader = reader  # streams only: the rest of the events, after ``first``
        self.first = first

    async def aclose(self) -> None:
        try:
            await self.upstream.aclose()
        finally:
            self.lease.release()


def _backoff_s(attempt: int, error: BackendError) -> float:
    delay = min(MAX_BACKOFF_S, BASE_BACKOFF_S * 2 ** (attempt - 1))
    if isinstance(error, BackendOverloaded) and error.retry_after_s is not None:
        delay = min(MAX_BACKOFF_S, max(delay, error.retry_after_s))
    return delay


async def _open_once(lease: Lease, call: UpstreamCall, attempt: int) -> Committed:
    upstream = await lease.replica.backend.send(call)
    if not call.stream:
        return Committed(lease, upstream, attempt)
    try:
        reader = SseReader(upstream)
        first = await reader.first()
    except BaseException:
        await upstream.aclose()
        raise
    return Committed(lease, upstream, attempt, reader, first)


async def dispatch(
    pool: PoolRuntime,
    priority: Priority,
    make_call: Callable[[str], UpstreamCall],
    *,
    max_attempts: int = MAX_ATTEMPTS,
    ticket: Ticket | None = None,
) -> Committed:
    """Run one request to its first byte; ``make_call(replica_id)`` builds the call for the
    chosen replica (its model name may differ). ``ticket`` is an admission the caller
    already holds (the task API admits synchronously to answer 429 before 202)."""
    avoid: set[str] = set()
    attempt = 0
    while True:
        attempt += 1
        if ticket is not None:
            lease = await ticket.wait()
            ticket = None
        else:
            lease = await pool.queue.acquire(priority, avoid=avoid)
        replica = lease.replica
        try:
            return await _open_once(lease, make_call(replica.replica_id), attempt)
        except BackendError as error:
            lease.release(observe=False)
            if isinstance(error, BackendUnavailable):
                mark_unreachable(replica, pool.queue, error.message)
                pool.health.wake(replica.replica_id)
            if not error.retryable or attempt >= max_attempts:
                error.attempts = attempt
                raise
            avoid.add(replica.replica_id)
            await asyncio.sleep(_backoff_s(attempt, error))
        except BaseException:
            lease.release(observe=False)
            raise
