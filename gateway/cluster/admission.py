"""``SharedAdmission``: a pool's admission queue whose decisions are taken in Redis.

The same interface and rules as ``policies.admission.AdmissionQueue`` (the OpenAI path and
the task API cannot tell them apart), but capacity, positions, interactive-before-batch,
FIFO and slot counts are global: ``admit`` is one script (``gateway.cluster.ledger``) on
this node's view of its replicas. What stays local is what only this node can know: its
own waiters (their futures), its own leases (``ReplicaState.in_use`` counts this node's
requests, for its metrics and retry budget) and its health view.

Giving back never awaits -- ``Lease.release`` is synchronous, called from ``finally``
blocks -- so releases, abandons and syncs go to the node's outbox (``ClusterLink``), which
sends them in order, pipelined, and retries while this node is a member. Every one of them
is idempotent in Redis, so a retry after a timeout that did reach Redis changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Sequence
from typing import Any, Protocol

from gateway.cluster.ledger import PoolLedger, replica_view
from gateway.config import PoolConfig
from gateway.pools import queue_settings
from policies.admission import (
    AdmissionQueue,
    Lease,
    LedgerUnavailable,
    Priority,
    QueueFull,
    Ticket,
    _Waiter,
)
from policies.replicas import ReplicaState

log = logging.getLogger("orchgate.cluster")


class ClusterLink(Protocol):
    """What a shared queue needs of its node (``gateway.cluster.active.Active``)."""

    op_timeout_s: float

    def ticket(self) -> str | None: ...
    def expect(self, ticket: str, waiter: SharedWaiter) -> None: ...
    def forget(self, ticket: str) -> None: ...
    def expects(self, ticket: str) -> bool: ...
    def store_failed(self) -> None: ...
    def send(
        self, kind: str, queue: SharedAdmission, ticket: str = "", held_s: float | None = None
    ) -> None: ...


class SharedLease(Lease):
    __slots__ = ("ticket",)

    def __init__(
        self, queue: AdmissionQueue, replica: ReplicaState, started_at: float, ticket: str
    ) -> None:
        super().__init__(queue, replica, started_at)
        self.ticket = ticket


class SharedWaiter(_Waiter):
    __slots__ = ("queue", "ticket")

    def __init__(
        self,
        future: asyncio.Future[Lease],
        priority: Priority,
        avoid: Collection[str],
        arrived: float,
        *,
        queue: SharedAdmission,
        ticket: str,
    ) -> None:
        super().__init__(future, priority, avoid, arrived)
        self.queue = queue
        self.ticket = ticket


class SharedAdmission(AdmissionQueue):
    def __init__(
        self,
        replicas: Sequence[ReplicaState],
        config: PoolConfig,
        *,
        link: ClusterLink,
        ledger: PoolLedger,
    ) -> None:
        super().__init__(replicas, **queue_settings(config))
        self.pool_id = config.id
        self.ledger = ledger
        self._link = link
        self._by_id = {r.replica_id: r for r in replicas}
        self._running: dict[str, SharedLease] = {}  # by ticket: this node's leases held
        self.global_depth = 0  # the whole cluster's waiters for this pool, as last seen
        self.reaped = 0  # dead nodes' tickets this node reaped

    def view(self) -> list[str | int]:
        return replica_view(self.replicas)

    # -- admission -------------------------------------------------------------------------
    async def admit(self, priority: Priority, *, avoid: Collection[str] = ()) -> Ticket:
        self._admissible()  # a cluster has no models on demand: unready is refused
        ticket = self._link.ticket()
        if ticket is None:
            raise self._unavailable(
                "the cluster store is unreachable, or this gateway is rejoining; try again"
            )
        loop = asyncio.get_running_loop()
        waiter = SharedWaiter(
            loop.create_future(), priority, avoid, self._clock(), queue=self, ticket=ticket
        )
        self._link.expect(ticket, waiter)  # a grant may arrive before the script's answer
        try:
            async with asyncio.timeout(self._link.op_timeout_s):
                answer = await self.ledger.admit(
                    ticket, priority, self.capacity, avoid, self.view()
                )
        except Exception as exc:  # noqa: BLE001 -- Redis slow or away: refuse, never hang
            self._link.forget(ticket)
            self._link.store_failed()
            self._link.send("abandon", self, ticket)  # in case the script did run
            message = f"the cluster store did not answer ({type(exc).__name__})"
            raise self._unavailable(message) from None
        return self._admitted(answer, waiter)

    def _admitted(self, answer: list[Any], waiter: SharedWaiter) -> Ticket:
        kind = answer[0]
        if len(answer) > 2 and answer[2]:
            self.rate.mean_service_s = float(answer[2])  # the cluster's, learnt by every node
        if kind == b"Q":
            if not waiter.future.done():
                if not self._link.expects(waiter.ticket):  # membership lost meanwhile
                    self._link.send("abandon", self, waiter.ticket)
                    raise self._unavailable("this gateway is rejoining the cluster; try again")
                self._waiting[waiter.priority].append(waiter)
            return Ticket(self, waiter=waiter, position=int(answer[1]))
        self._link.forget(waiter.ticket)
        if kind == b"G":
            replica = self._by_id[answer[1].decode()]
            return Ticket(self, lease=self._shared_grant(replica, waiter.ticket))
        if kind == b"F":
            self.global_depth = int(answer[1])
            self.rejected[QueueFull.reason] += 1
            raise QueueFull(
                "the pool's queue is full", retry_after_s=self.wait_estimate_s(int(answer[1]) + 1)
            )
        raise self._unavailable("this gateway's cluster membership lapsed; it is rejoining")

    def _unavailable(self, message: str) -> LedgerUnavailable:
        self.rejected[LedgerUnavailable.reason] += 1
        return LedgerUnavailable(message, retry_after_s=1.0)

    def granted(self, waiter: SharedWaiter, replica_id: str) -> None:
        """Another node's release (or a sync) gave this node's waiter a slot."""
        replica = self._by_id.get(replica_id)
        if replica is None or waiter.future.done():  # gone meanwhile: give the slot back
            self._link.send("abandon", self, waiter.ticket)
            return
        try:
            self._waiting[waiter.priority].remove(waiter)
        except ValueError:
            pass  # granted before the admit script's answer was read
        waiter.future.set_result(self._shared_grant(replica, waiter.ticket))

    def _shared_grant(self, replica: ReplicaState, ticket: str) -> Lease:
        replica.in_use += 1
        now = self.last_used = self._clock()
        lease = self._running[ticket] = SharedLease(self, replica, now, ticket)
        return lease

    def running(self) -> list[SharedLease]:
        return list(self._running.values())

    def reticket(self, old: str, new: str) -> None:
        lease = self._running.pop(old, None)
        if lease is None:  # it ended meanwhile, released under the old ticket: free the new
            self._link.send("abandon", self, new)
            return
        lease.ticket = new
        self._running[new] = lease

    def replica_of(self, ticket: str) -> str | None:
        lease = self._running.get(ticket)
        return None if lease is None else lease.replica.replica_id

    # -- giving back -----------------------------------------------------------------------
    def _on_release(self, lease: Lease, *, observe: bool) -> None:
        lease.replica.in_use -= 1
        now = self.last_used = self._clock()
        held_s = None
        if observe:
            held_s = now - lease.started_at
            self.rate.observe(held_s)
        assert isinstance(lease, SharedLease)
        self._running.pop(lease.ticket, None)
        self._link.send("release", self, lease.ticket, held_s)

    def _abandon(self, waiter: _Waiter) -> None:
        assert isinstance(waiter, SharedWaiter)
        self._link.forget(waiter.ticket)
        future = waiter.future
        if future.done() and not future.cancelled() and future.exception() is None:
            future.result().release(observe=False)  # granted in the turn it was cancelled
            return
        future.cancel()
        try:
            self._waiting[waiter.priority].remove(waiter)
        except ValueError:
            pass
        self._link.send("abandon", self, waiter.ticket)

    def pump(self) -> None:
        """Capacity grew on this node's view (a replica became ready): grant in Redis."""
        self._link.send("sync", self)

    def _dropped(self, waiter: _Waiter) -> None:
        assert isinstance(waiter, SharedWaiter)
        self._link.forget(waiter.ticket)
        self._link.send("abandon", self, waiter.ticket)

    def synced(self, answer: list[Any]) -> None:
        """A sync's answer: ``[reaped, granted, depth, mean]``."""
        self.reaped += int(answer[0])
        self.global_depth = int(answer[2])
        if answer[3]:
            self.rate.mean_service_s = float(answer[3])
