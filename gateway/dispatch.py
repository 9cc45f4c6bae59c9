"""dispatch(): admission -> placement -> send -> first byte, shared by every surface.

Retries happen only here and only before anything reached the client (the policy is
``policies.retry``): a failed attempt releases its slot, is reported to passive health,
backs off and goes to another ready replica when there is one. After :class:`Committed`
is returned, the caller owns the upstream response and the lease and must close both;
from then on a failure is reported in-band, never retried.

Every attempt runs under the pool's limits (``[pools.timeouts]``): first token and idle
gap for streams, and one total deadline for the whole request, retries included.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from backends.base import Limits, UpstreamCall, UpstreamResponse
from backends.errors import BackendError, BackendUnavailable
from gateway.streaming import Reader
from policies.admission import AdmissionError, Lease, Priority, Ticket
from policies.health import mark_unreachable

if TYPE_CHECKING:
    from gateway.pools import PoolRuntime


_NOWHERE: frozenset[str] = frozenset()


class _GiveUp(Exception):
    """Ends the retry loop with ``error`` (tenacity retries any retryable BackendError)."""

    def __init__(self, error: BackendError) -> None:
        self.error = error


class Committed:
    """An upstream response that produced its first byte, and the slot it holds."""

    __slots__ = ("attempts", "first", "lease", "reader", "upstream")

    def __init__(
        self,
        lease: Lease,
        upstream: UpstreamResponse,
        attempts: int,
        reader: Reader | None = None,
        first: bytes = b"",
    ) -> None:
        self.lease = lease
        self.upstream = upstream
        self.attempts = attempts
        self.reader = reader  # relayed answers only: the rest of the body, after ``first``
        self.first = first

    async def aclose(self) -> None:
        try:
            await self.upstream.aclose()
        finally:
            self.lease.release()


def _limits(pool: PoolRuntime, stream: bool, deadline: float) -> Limits:
    timeouts = pool.config.timeouts
    if stream:
        return Limits(timeouts.first_token_s, timeouts.idle_s, deadline)
    return Limits(None, timeouts.idle_s, deadline)


async def dispatch(
    pool: PoolRuntime,
    priority: Priority,
    make_call: Callable[[str], UpstreamCall],
    *,
    open_reader: Callable[[UpstreamResponse], Reader] | None = None,
    ticket: Ticket | None = None,
    client_retries: int = 0,
) -> Committed:
    """Run one request to its first byte; ``make_call(replica_id)`` builds the call for the
    chosen replica (its model name may differ). ``open_reader``: the answer is relayed as
    it comes (streams, audio), and its first piece must arrive before the request counts
    as placed; without it, the answer is read whole by the caller. ``ticket`` is an
    admission the caller already holds (the task API admits synchronously to answer 429
    before 202). ``client_retries``: the client's own ``x-stainless-retry-count``."""
    deadline = pool.loop.time() + pool.config.timeouts.total_s
    run = _Attempts(pool, priority, make_call, open_reader, ticket, deadline)
    try:
        return await run.once()  # the common case pays nothing for the retry machinery
    except BackendError as error:
        if not error.retryable:
            raise
        failed: BackendError | None = error
    retries = pool.retry.attempts(
        client_retries=client_retries,
        deadline=deadline,
        has_alternative=lambda: pool.has_free_replica(run.avoid),
    )
    try:
        async for manager in retries:
            with manager:
                if failed is not None:
                    # replay the first failure so tenacity makes the first retry decision
                    replayed, failed = failed, None
                    raise replayed
                pool.retried += 1
                try:
                    return await run.once(retry=True)
                finally:
                    retries.attempt_done()
    except _GiveUp as give_up:
        raise give_up.error from None
    raise AssertionError("unreachable: tenacity either returns an attempt or raises")


class _Attempts:
    """The state one request carries across its attempts."""

    __slots__ = (
        "attempt",
        "avoid",
        "deadline",
        "last_error",
        "make_call",
        "open_reader",
        "pool",
        "priority",
        "ticket",
    )

    def __init__(
        self,
        pool: PoolRuntime,
        priority: Priority,
        make_call: Callable[[str], UpstreamCall],
        open_reader: Callable[[UpstreamResponse], Reader] | None,
        ticket: Ticket | None,
        deadline: float,
    ) -> None:
        self.pool = pool
        self.priority = priority
        self.make_call = make_call
        self.open_reader = open_reader
        self.ticket = ticket
        self.deadline = deadline
        self.attempt = 0
        self.avoid: frozenset[str] | set[str] = _NOWHERE  # a set once an attempt failed
        self.last_error: BackendError | None = None

    async def once(self, *, retry: bool = False) -> Committed:
        pool = self.pool
        self.attempt += 1
        try:
            if self.ticket is not None:
                lease = await self.ticket.wait()
                self.ticket = None
            else:
                lease = await pool.queue.acquire(self.priority, avoid=self.avoid)
        except AdmissionError:
            if retry and self.last_error is not None:
                raise _GiveUp(self.last_error) from None  # no room for the retry: the cause
            raise
        replica = lease.replica
        call = self.make_call(replica.replica_id)
        try:
            upstream = await replica.backend.send(call, _limits(pool, call.stream, self.deadline))
            if self.open_reader is not None:
                try:
                    reader = self.open_reader(upstream)
                    first = await reader.first()
                except BaseException:
                    await upstream.aclose()
                    raise
                committed = Committed(lease, upstream, self.attempt, reader, first)
            else:
                committed = Committed(lease, upstream, self.attempt)
        except BackendError as error:
            lease.release(observe=False)
            replica.errors[error.kind] += 1
            error.attempts = self.attempt
            error.replica_id = error.replica_id or replica.replica_id
            if isinstance(error, BackendUnavailable):
                mark_unreachable(replica, pool.queue, error.message)
                pool.health.wake(replica.replica_id)
            pool.health.record_failure(replica, error)
            if self.avoid is _NOWHERE:
                self.avoid = set()
            self.avoid.add(replica.replica_id)  # type: ignore[union-attr]
            self.last_error = error
            raise
        except BaseException:
            lease.release(observe=False)
            raise
        replica.failures = 0
        replica.placed[self.priority] += 1
        return committed
