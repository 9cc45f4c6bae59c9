"""Exchange: one request's owner from "which pool" to "slot released".

Both surfaces and the task runner go through it: the model names a pool (or the default
model does), the pool must serve the endpoint (a clear 404 before admission otherwise),
an in-place swap is waited out, ``gateway.dispatch`` admits, places and retries, and
``close()`` -- on every path -- counts the tokens once, frees the upstream and the slot,
and observes the latency. The access log line is built from what it recorded.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from backends.base import Endpoint, UpstreamCall, UpstreamResponse
from gateway.asgi import DisconnectWatch
from gateway.dispatch import Committed, dispatch
from gateway.errors import (
    EndpointNotServed,
    GatewayError,
    InsufficientMemoryError,
    ModelUnavailableError,
    PoolUnavailable,
    QueueFullError,
    backoff_headers,
)
from gateway.logging import AccessRecord
from gateway.streaming import Reader
from gateway.wire import Usage
from policies.admission import (
    AdmissionError,
    InsufficientMemory,
    ModelUnavailable,
    Priority,
    QueueFull,
    Ticket,
)

if TYPE_CHECKING:
    from gateway.pools import Hold, PoolRuntime
    from policies.replicas import ReplicaLatency


class Settler(Protocol):
    """Who knows which pools an in-place swap holds (``GatewayState``)."""

    holds: dict[str, Hold]

    async def settled(self, pool: PoolRuntime) -> PoolRuntime: ...


def admission_error(error: AdmissionError) -> GatewayError:
    headers = backoff_headers(error.retry_after_s)
    if isinstance(error, QueueFull):
        return QueueFullError(f"{error}; retry after {headers['Retry-After']}s", headers=headers)
    if isinstance(error, InsufficientMemory):
        return InsufficientMemoryError(str(error), headers=headers, extra=error.breakdown)
    if isinstance(error, ModelUnavailable):
        return ModelUnavailableError(
            f"{error}; retry after {headers['Retry-After']}s", headers=headers
        )
    return PoolUnavailable(f"{error}; retry after {headers['Retry-After']}s", headers=headers)


def check_serves(pool: PoolRuntime, endpoint: Endpoint, path: str) -> None:
    """A pool that cannot serve ``endpoint`` is a 404 before admission: never queued,
    never retried, never a mark against a replica."""
    if endpoint not in pool.endpoints:
        raise EndpointNotServed(
            f"pool {pool.id!r} ({pool.engine}) does not serve {path}; its replicas serve "
            + ", ".join(sorted(e.value for e in pool.endpoints if e is not Endpoint.NATIVE)),
            param="model",
        )


class Exchange:
    """Per-request state: the pool and replica it went to, what it holds and must close,
    and what the access log records."""

    __slots__ = (
        "attempts",
        "committed",
        "counted",
        "engine",
        "error",
        "events",
        "first_byte",
        "pool",
        "replica",
        "latency",
        "rid",
        "started",
        "status",
        "tokens_in",
        "tokens_out",
        "watch",
    )

    def __init__(self, rid: str, latency: dict[str, ReplicaLatency]) -> None:
        self.rid = rid
        self.latency = latency  # [metrics] extended: per-replica histograms, else empty
        self.started = time.perf_counter()
        self.watch: DisconnectWatch | None = None
        self.committed: Committed | None = None
        self.counted = False
        self.status = 500
        self.pool: str | None = None
        self.replica: str | None = None
        self.engine: str | None = None
        self.attempts: int | None = None
        self.first_byte: float | None = None
        self.events: int | None = None
        self.error: str | None = None
        self.tokens_in: int | None = None
        self.tokens_out: int | None = None

    # -- which pool ------------------------------------------------------------------
    def bind(self, pool: PoolRuntime) -> PoolRuntime:
        self.pool, self.engine = pool.id, pool.engine
        return pool

    async def settle(self, pool: PoolRuntime, settler: Settler) -> PoolRuntime:
        """What serves ``pool`` once the in-place swap holding it is over; callers check
        ``settler.holds`` first, so the common path awaits nothing."""
        try:
            return self.bind(await settler.settled(pool))
        except AdmissionError as error:
            raise admission_error(error) from None

    # -- admission, placement, attempts ----------------------------------------------
    async def open(
        self,
        pool: PoolRuntime,
        priority: Priority,
        make_call: Callable[[str], UpstreamCall],
        *,
        open_reader: Callable[[UpstreamResponse], Reader] | None = None,
        ticket: Ticket | None = None,
        client_retries: int = 0,
    ) -> Committed:
        """Run the request to its first byte (``gateway.dispatch``); the answer and its
        slot are this exchange's from then on. Raises ``AdmissionError`` when it gets no
        slot (each surface words that its own way: ``admission_error`` for OpenAI's)."""
        committed = self.committed = await dispatch(
            pool,
            priority,
            make_call,
            open_reader=open_reader,
            ticket=ticket,
            client_retries=client_retries,
        )
        replica = committed.lease.replica
        self.replica = replica.replica_id
        self.attempts = committed.attempts
        reader = committed.reader
        if reader is not None and reader.estimates_tokens:
            replica.live.add(reader.stats)  # counted while it runs (the status charts)
        return committed

    # -- accounting and release ------------------------------------------------------
    def count_tokens(self, tokens_in: int, tokens_out: int) -> None:
        """The exchange's tokens, once: the engine's usage, or what the caller counted."""
        if self.counted or self.committed is None:
            return
        self.counted = True
        self.tokens_in, self.tokens_out = tokens_in, tokens_out
        self.committed.lease.replica.add_tokens(tokens_in, tokens_out)

    def count_usage(self, usage: Usage | None) -> None:
        if usage is not None:
            self.count_tokens(*usage.tokens())

    async def close(self) -> None:
        """Stop watching the client, count the tokens, free the upstream and the slot,
        observe the latency. Runs on every path, exactly once."""
        if self.watch is not None:
            self.watch.close()
        committed = self.committed
        try:
            if committed is not None:
                replica = committed.lease.replica
                if self.first_byte is not None:
                    replica.first_byte_s_sum += self.first_byte - self.started
                    replica.first_byte_count += 1
                reader = committed.reader
                if reader is not None:  # relayed answers: also those cut short
                    stats = reader.stats
                    replica.live.discard(stats)
                    if stats.usage is not None or reader.estimates_tokens:
                        self.count_tokens(*stats.tokens())
                    if stats.failed:
                        replica.errors[stats.failed] += 1
                await committed.aclose()
        finally:
            latency = self.latency.get(self.replica) if self.replica else None
            if latency is not None:  # [metrics] extended
                if self.first_byte is not None:
                    latency.ttft.observe(self.first_byte - self.started)
                latency.duration.observe(time.perf_counter() - self.started)

    def record(self, scope: dict[str, Any]) -> AccessRecord:
        first_byte = self.first_byte
        return AccessRecord(
            ts=time.time(),
            method=scope["method"],
            path=scope["path"],
            status=self.status,
            duration_ms=round((time.perf_counter() - self.started) * 1000, 3),
            request_id=self.rid,
            pool=self.pool,
            replica=self.replica,
            engine=self.engine,
            attempts=self.attempts,
            ttfb_ms=None if first_byte is None else round((first_byte - self.started) * 1000, 3),
            events=self.events,
            tokens_in=self.tokens_in,
            tokens_out=self.tokens_out,
            error=self.error,
        )
