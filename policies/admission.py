"""Admission: one bounded, two-priority queue per pool in front of its replicas' slots.

``interactive`` is served strictly before ``batch``; FIFO within a priority. Capacity counts
waiting requests only (running ones hold a slot, not a place). The full policy is *reject*:
:class:`QueueFull` carries the wait estimate the caller turns into ``Retry-After``.

Concurrency invariant: granting (choose a replica, ``in_use += 1``) never awaits, so the
single event loop is the only lock. A waiter whose task is cancelled (client gone, task
cancelled) is removed and never granted; if it was granted in the same loop turn, the slot
is given straight back.

Must not do I/O or know about HTTP.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Sequence

from policies.estimates import ServiceRate
from policies.placement import choose_replica
from policies.replicas import ReplicaState


class Priority(enum.StrEnum):
    INTERACTIVE = "interactive"
    BATCH = "batch"


class AdmissionError(Exception):
    """Base for refusals; ``retry_after_s`` is the caller's best estimate for a retry."""

    reason = "rejected"  # the ``reason`` label of ``tasks_rejected_total``

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class QueueFull(AdmissionError):
    """Every place in the queue is taken."""

    reason = "queue_full"


class PoolUnready(AdmissionError):
    """No replica of the pool is ready (starting, loading a model, or down)."""

    reason = "pool_unready"


class QueueTimeout(AdmissionError):
    """The request waited longer than the pool's queue timeout."""

    reason = "queue_timeout"


class ModelUnavailable(AdmissionError):
    """A model on demand failed to load (and backs off), or cannot be loaded at all."""

    reason = "model_unavailable"


class InsufficientMemory(AdmissionError):
    """A model on demand cannot be loaded: nothing that may be unloaded makes room.
    ``breakdown``: its memory estimate and the device's budget."""

    reason = "insufficient_memory"

    def __init__(self, message: str, *, retry_after_s: float, breakdown: dict[str, object]) -> None:
        super().__init__(message, retry_after_s=retry_after_s)
        self.breakdown = breakdown


class PoolClosed(AdmissionError):
    """The gateway is shutting down: nothing more is admitted, waiters are refused."""

    reason = "shutting_down"


class LedgerUnavailable(AdmissionError):
    """A shared ledger (``[cluster] mode = "active"``) could not decide in time: its store
    is slow or away, or this node is not a member right now."""

    reason = "ledger_unavailable"


class Lease:
    """One reserved slot on one replica. ``release`` is idempotent."""

    __slots__ = ("_queue", "_released", "replica", "started_at")

    def __init__(self, queue: AdmissionQueue, replica: ReplicaState, started_at: float) -> None:
        self._queue = queue
        self.replica = replica
        self.started_at = started_at
        self._released = False

    def release(self, *, observe: bool = True) -> None:
        if self._released:
            return
        self._released = True
        self._queue._on_release(self, observe=observe)


class _Waiter:
    __slots__ = ("arrived", "avoid", "future", "priority")

    def __init__(
        self,
        future: asyncio.Future[Lease],
        priority: Priority,
        avoid: Collection[str],
        arrived: float,
    ) -> None:
        self.future = future
        self.priority = priority
        self.avoid = avoid
        self.arrived = arrived


class Ticket:
    """An admitted request: granted already, or waiting. ``wait()`` returns the lease;
    cancelling the waiting task (or ``abandon()``) gives the place or the slot back."""

    __slots__ = ("_consumed", "_lease", "_queue", "_waiter", "position")

    def __init__(
        self,
        queue: AdmissionQueue,
        *,
        lease: Lease | None = None,
        waiter: _Waiter | None = None,
        position: int = 0,
    ) -> None:
        self._queue = queue
        self._lease = lease
        self._waiter = waiter
        self._consumed = False
        self.position = position  # 1-based place at admission; 0 when granted at once

    def current_position(self) -> int:
        """The waiter's 1-based place now (0 once granted)."""
        waiter = self._waiter
        if waiter is None or waiter.future.done():
            return 0
        return self._queue.position_of_waiter(waiter)

    async def wait(self) -> Lease:
        if self._lease is not None:
            self._consumed = True
            return self._lease
        assert self._waiter is not None
        queue = self._queue
        try:
            async with asyncio.timeout(queue.queue_timeout_s):
                lease = await self._waiter.future
                self._consumed = True
                return lease
        except BaseException as exc:
            queue._abandon(self._waiter)
            if isinstance(exc, TimeoutError):
                queue.rejected[QueueTimeout.reason] += 1
                raise QueueTimeout(
                    f"waited {queue.queue_timeout_s:g}s in the queue without a free slot",
                    retry_after_s=queue.wait_estimate_s(queue.depth() + 1),
                ) from None
            raise

    def abandon(self) -> None:
        """Give the place or the slot back, unless ``wait()`` already handed the lease to
        its caller (who then owns it). Idempotent; safe before ``wait()`` ever ran."""
        if self._consumed:
            return
        if self._lease is not None:
            self._lease.release(observe=False)
        elif self._waiter is not None:
            self._queue._abandon(self._waiter)


class AdmissionQueue:
    def __init__(
        self,
        replicas: Sequence[ReplicaState],
        *,
        capacity: int,
        queue_timeout_s: float,
        unready_retry_s: float = 2.0,
        rate: ServiceRate | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.replicas = replicas
        self.capacity = capacity
        self.queue_timeout_s = queue_timeout_s
        self.unready_retry_s = unready_retry_s
        self.rate = rate or ServiceRate()
        self._clock = clock
        self._waiting: dict[Priority, deque[_Waiter]] = {p: deque() for p in Priority}
        self.closed: PoolClosed | None = None
        self.rejected: Counter[str] = Counter()  # refusals by reason, for GET /metrics
        # models on demand (gateway.residency): an unready pool queues its requests and
        # calls ``on_demand`` (which may refuse: AdmissionError); ``held`` grants nothing
        # while the model makes room for another; ``startup_s`` is the load still ahead
        self.on_demand: Callable[[], None] | None = None
        self.held = False
        self.startup_s = 0.0
        self.last_used = self._clock()  # the last grant or release

    # -- observation -------------------------------------------------------------------
    def depth(self, priority: Priority | None = None) -> int:
        if priority is not None:
            return len(self._waiting[priority])
        return sum(len(q) for q in self._waiting.values())

    def in_use(self) -> int:
        return sum(r.in_use for r in self.replicas)

    def ready_slots(self) -> int:
        return sum(r.slots for r in self.replicas if r.ready)

    def is_ready(self) -> bool:
        for replica in self.replicas:  # a loop, not any(): asked on every request
            if replica.ready:
                return True
        return False

    def position_of(self, priority: Priority) -> int:
        """1-based queue position a request of ``priority`` would take now."""
        ahead = len(self._waiting[Priority.INTERACTIVE])
        if priority is Priority.BATCH:
            ahead += len(self._waiting[Priority.BATCH])
        return ahead + 1

    def position_of_waiter(self, waiter: _Waiter) -> int:
        ahead = 0
        if waiter.priority is Priority.BATCH:
            ahead = len(self._waiting[Priority.INTERACTIVE])
        try:
            return ahead + self._waiting[waiter.priority].index(waiter) + 1
        except ValueError:
            return 0

    def wait_estimate_s(self, position: int) -> float:
        return self.startup_s + self.rate.wait_s(position, self.ready_slots() or 1)

    def oldest_waiter(self) -> tuple[bool, float] | None:
        """(has interactive waiters, earliest arrival among those first in line), or None
        when nobody waits: how residency orders models competing for memory."""
        for priority in Priority:
            arrivals = [w.arrived for w in self._waiting[priority] if not w.future.done()]
            if arrivals:
                return priority is Priority.INTERACTIVE, min(arrivals)
        return None

    # -- acquire / release ---------------------------------------------------------------
    def enqueue(self, priority: Priority, *, avoid: Collection[str] = ()) -> Ticket:
        """Admit a request now, without awaiting: a ticket holding either a lease (a slot
        was free) or a place in the queue. Raises ``PoolUnready``, ``QueueFull`` or
        ``PoolClosed``."""
        if not self._admissible():
            assert self.on_demand is not None  # what _admissible() answered False for
            try:
                self.on_demand()  # a model on demand: start it; the request waits
            except AdmissionError as error:
                self.rejected[error.reason] += 1
                raise
        elif not self.held and not self._has_waiters_ahead(priority):
            replica = choose_replica(self.replicas, avoid)
            if replica is not None:
                return Ticket(self, lease=self._grant(replica))
        if self.depth() >= self.capacity:
            wait = self.wait_estimate_s(self.depth() + 1)
            self.rejected[QueueFull.reason] += 1
            raise QueueFull("the pool's queue is full", retry_after_s=wait)
        position = self.position_of(priority)
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop.create_future(), priority, avoid, self._clock())
        self._waiting[priority].append(waiter)
        return Ticket(self, waiter=waiter, position=position)

    def _admissible(self) -> bool:
        """Whether the pool is ready; raises ``PoolClosed``, or ``PoolUnready`` when no
        replica is ready and nothing starts one (a model on demand does: False)."""
        if self.closed is not None:
            self.rejected[PoolClosed.reason] += 1
            raise self.closed
        if self.is_ready():
            return True
        if self.on_demand is None:
            self.rejected[PoolUnready.reason] += 1
            raise PoolUnready(
                "no replica of this pool is ready", retry_after_s=self.unready_retry_s
            )
        return False

    async def admit(self, priority: Priority, *, avoid: Collection[str] = ()) -> Ticket:
        """``enqueue`` behind the seam a shared ledger needs (``[cluster] mode = "active"``
        decides in Redis, so it awaits); here it never suspends."""
        return self.enqueue(priority, avoid=avoid)

    async def acquire(self, priority: Priority, *, avoid: Collection[str] = ()) -> Lease:
        """A lease on the least-loaded ready replica, waiting in the queue if needed.
        Through ``admit``, so a shared ledger overriding it serves this path too."""
        ticket = await self.admit(priority, avoid=avoid)
        return await ticket.wait()

    def pump(self) -> None:
        """Grant free slots to waiters, interactive strictly first. Call after capacity grows
        (a replica became ready or discovered more slots)."""
        if self.held:
            return
        for queue in self._waiting.values():  # interactive first: insertion order
            while queue:
                waiter = queue[0]
                if waiter.future.done():
                    queue.popleft()
                    continue
                replica = choose_replica(self.replicas, waiter.avoid)
                if replica is None:
                    return  # no slot: nobody behind this waiter may jump ahead
                queue.popleft()
                waiter.future.set_result(self._grant(replica))

    def close(self, error: PoolClosed) -> None:
        """Admit nothing from now on and refuse everyone waiting (graceful shutdown)."""
        self.closed = error
        self.fail_waiters(error)

    def fail_waiters(self, error: AdmissionError) -> None:
        """Refuse every waiting request (the pool lost its last ready replica)."""
        for queue in self._waiting.values():
            while queue:
                waiter = queue.popleft()
                if not waiter.future.done():
                    self.rejected[error.reason] += 1
                    waiter.future.set_exception(error)
                self._dropped(waiter)

    # -- internals -----------------------------------------------------------------------
    def _has_waiters_ahead(self, priority: Priority) -> bool:
        if self._waiting[Priority.INTERACTIVE]:
            return True
        return priority is Priority.BATCH and bool(self._waiting[Priority.BATCH])

    def _grant(self, replica: ReplicaState) -> Lease:
        replica.in_use += 1
        now = self.last_used = self._clock()
        return Lease(self, replica, now)

    def _on_release(self, lease: Lease, *, observe: bool) -> None:
        lease.replica.in_use -= 1
        now = self.last_used = self._clock()
        if observe:
            self.rate.observe(now - lease.started_at)
        self.pump()

    def _dropped(self, waiter: _Waiter) -> None:
        """A waiter refused by ``fail_waiters``: nothing more to do in process (a shared
        ledger gives its place back there)."""

    def _abandon(self, waiter: _Waiter) -> None:
        future = waiter.future
        if future.done() and not future.cancelled() and future.exception() is None:
            future.result().release(observe=False)  # granted in the same turn it was cancelled
        else:
            future.cancel()
            try:
                self._waiting[waiter.priority].remove(waiter)
            except ValueError:
                pass
