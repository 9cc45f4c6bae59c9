"""``[cluster] mode = "active"``: every node serves, one queue and slot ledger per pool.

A node is a member while it holds its own lease, ``<prefix>:node:<node_id>`` = ``<node>|
<epoch>`` (``LeaderLease`` on a key of its own: the epoch comes from ``INCR``, so a restart
is a new member and whatever the old one held is reaped; a second process configured with
the same ``node_id`` cannot join while the first lives). Only a member admits; it stops by
its own clock before its lease can expire (``lease.RENEW_DEADLINE``), so the nodes that
reap its tickets never race a request it still believes it may grant.

This node's side of the ledger (``gateway.cluster.admission.SharedAdmission`` per pool):
- tickets ``<node>|<epoch>|<n>`` and the waiters expecting a grant by ticket;
- the inbox reader: one ``BLPOP`` loop on its own connection (its socket timeout is longer
  than the block) for grants other nodes' releases made, and for cancels of this node's
  tasks asked on another node;
- the outbox: releases, abandons and syncs, sent in order as one pipeline per batch and
  retried while this node is a member (each script is idempotent);
- every heartbeat a sync per pool: dead nodes' leases and waiters reaped, free slots
  granted, the global depth and mean service time read back.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import Sequence
from typing import Any

from gateway.cluster.admission import SharedAdmission, SharedWaiter
from gateway.cluster.ledger import PoolLedger
from gateway.cluster.resp import RespClient
from gateway.cluster.standby import ALWAYS_SERVED, Standby
from gateway.cluster.tasks import RedisTaskLog
from gateway.config import ClusterConfig, PoolConfig
from gateway.errors import GatewayError, NotLeader
from gateway.tasks import TaskBook
from policies.admission import AdmissionQueue, LedgerUnavailable
from policies.replicas import ReplicaState
from policies.reservation import ReservationBook

log = logging.getLogger("orchgate.cluster")

INBOX_BLOCK_S = 1  # BLPOP's block: how soon the reader notices it should stop
_RETRY_S = 0.05  # the outbox's pause after a failed send
_CANCEL = "!cancel "  # an inbox message asking this node to cancel one of its tasks


async def _nothing() -> None:
    return None


class Active(Standby):
    """This node's membership, its side of the shared ledger, and the gate (only a
    member serves)."""

    def __init__(self, config: ClusterConfig, *, env: dict[str, str] | None = None) -> None:
        super().__init__(config, env=env)
        import redis.asyncio

        self.op_timeout_s = config.op_timeout_s
        self._inbox_client = redis.asyncio.Redis.from_url(
            self.url,
            socket_timeout=INBOX_BLOCK_S + config.op_timeout_s,
            socket_connect_timeout=config.op_timeout_s,
            retry_on_timeout=False,
        )
        self._inbox = f"{config.key_prefix}:inbox:{self.node_id}"
        self._ledger_client = RespClient(self.url, connect_timeout_s=config.op_timeout_s)
        self._counter = itertools.count(1)
        self._expected: dict[str, SharedWaiter] = {}  # ticket -> this node's waiter
        self._queues: dict[str, SharedAdmission] = {}  # pool id -> its newest queue
        self._outbox: deque[tuple[str, SharedAdmission, str, float | None]] = deque()
        self._sending: asyncio.Task[None] | None = None
        self._loops: list[asyncio.Task[None]] = []
        self.tasks: TaskBook | None = None  # whose tasks other nodes may cancel
        self.degraded = False  # the breaker: open while the store is slow or away
        self._closing = False
        self._joined = False  # has been a member: a later membership is a rejoin
        self.rejoined = 0

    def lease_key(self) -> str:
        return f"{self.config.key_prefix}:node:{self.node_id}"

    def share_reservations(self, book: ReservationBook) -> None:
        """None: with every node serving there is no one leader to hand them to; each
        node's reservations guard its own reloads (``README``, "Cluster")."""
        return None

    def share_tasks(self, book: TaskBook, retention_s: float) -> RedisTaskLog:
        """Each node writes its own tasks (fenced by its membership), reads and cancels
        the others'."""
        self.tasks = book
        return self._task_log(retention_s, ask_cancel=self.ask_cancel)

    # -- GatewayState.admission ------------------------------------------------------------
    def admission(self, replicas: Sequence[ReplicaState], config: PoolConfig) -> AdmissionQueue:
        ledger = PoolLedger(self._ledger_client, prefix=self.config.key_prefix, pool_id=config.id)
        queue = SharedAdmission(replicas, config, link=self, ledger=ledger)
        self._queues[config.id] = queue  # a reload's pool replaces the old one in syncs
        return queue

    # -- ClusterLink -----------------------------------------------------------------------
    def ticket(self) -> str | None:
        epoch = self.lease.epoch
        if epoch is None or not self.lease.leading or self.degraded:
            return None
        return f"{self.node_id}|{epoch}|{next(self._counter)}"

    def expect(self, ticket: str, waiter: SharedWaiter) -> None:
        self._expected[ticket] = waiter

    def forget(self, ticket: str) -> None:
        self._expected.pop(ticket, None)

    def expects(self, ticket: str) -> bool:
        return ticket in self._expected

    def send(
        self, kind: str, queue: SharedAdmission, ticket: str = "", held_s: float | None = None
    ) -> None:
        self._outbox.append((kind, queue, ticket, held_s))
        if self._sending is None:
            self._sending = asyncio.get_running_loop().create_task(self._send_all())

    async def _send_all(self) -> None:
        pause = _RETRY_S / 2
        try:
            while self._outbox:
                batch = list(self._outbox)
                try:
                    answers = await self._send(batch)
                except Exception as exc:  # noqa: BLE001 -- Redis slow or away: again
                    # never dropped: a lease not given back would stay held for as long as
                    # this node lives (only a dead node's are reaped); each is idempotent
                    log.debug("ledger give-backs (%d) not sent yet: %s", len(batch), exc)
                    pause = min(1.0, pause * 2)
                    await asyncio.sleep(pause)
                    continue
                pause = _RETRY_S / 2
                for _ in batch:
                    self._outbox.popleft()
                for (kind, queue, ticket, _), answer in zip(batch, answers, strict=True):
                    if isinstance(answer, Exception):
                        log.error("ledger %s on pool %s failed: %s", kind, queue.pool_id, answer)
                    elif kind == "sync":
                        queue.synced(answer)
                    elif kind == "claim" and answer == 1:  # counted under the new ticket
                        queue.reticket(*ticket.partition(" ")[::2])
        finally:
            self._sending = None

    async def _send(self, batch: list[tuple[str, SharedAdmission, str, float | None]]) -> Any:
        # one connection: the batch leaves in one write and its replies come back in order
        calls = []
        for kind, queue, ticket, held_s in batch:
            view = queue.view()
            if kind == "release":
                calls.append(queue.ledger.release(ticket, held_s, view))
            elif kind == "abandon":
                calls.append(queue.ledger.abandon(ticket, view))
            elif kind == "claim":
                old, _, new = ticket.partition(" ")
                replica = queue.replica_of(old)
                if replica is None:  # it ended meanwhile: nothing to write back
                    calls.append(_nothing())
                else:
                    calls.append(queue.ledger.claim(old, new, replica))
            else:
                calls.append(queue.ledger.sync(view))
        async with asyncio.timeout(self.op_timeout_s):
            answers = await asyncio.gather(*calls, return_exceptions=True)
        for answer in answers:  # the store away: all of them again (each is idempotent)
            if isinstance(answer, (ConnectionError, OSError, TimeoutError)):
                raise answer
        return answers

    # -- the inbox -------------------------------------------------------------------------
    async def _read_inbox(self) -> None:
        # a flag, not only cancel(): redis-py can swallow a cancellation inside a blocking
        # read, and the block ends within INBOX_BLOCK_S anyway
        while not self._closing:
            try:
                first = await self._inbox_client.blpop([self._inbox], timeout=INBOX_BLOCK_S)
                if first is None:
                    continue
                messages: list[Any] = [first[1]]
                more: Any = await self._inbox_client.lpop(self._inbox, 256)
                messages += more or []
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 -- the lease loop says what is wrong
                log.debug("inbox: %s", exc)
                await asyncio.sleep(_RETRY_S * 4)
                continue
            for message in messages:
                self._delivered(message.decode())

    def _delivered(self, message: str) -> None:
        if message.startswith(_CANCEL):
            self._cancel_here(message[len(_CANCEL) :])
            return
        ticket, _, replica_id = message.partition(" ")
        waiter = self._expected.pop(ticket, None)
        if waiter is not None:  # else abandoned already, and its abandon frees the slot
            waiter.queue.granted(waiter, replica_id)

    def _cancel_here(self, task_id: str) -> None:
        task = self.tasks.get(task_id) if self.tasks is not None else None
        if task is not None:
            self.tasks.cancel(task)  # type: ignore[union-attr]

    async def ask_cancel(self, owner: str, task_id: str) -> None:
        """Ask the node running ``task_id`` to cancel it (through its inbox)."""
        node = owner.rpartition("|")[0]
        inbox = f"{self.config.key_prefix}:inbox:{node}"
        async with asyncio.timeout(self.op_timeout_s):
            await self._client.rpush(inbox, _CANCEL + task_id)

    # -- membership ------------------------------------------------------------------------
    def _changed(self, leading: bool) -> None:
        super()._changed(leading)
        if not leading:  # its tickets will be reaped: nobody waiting here can be granted
            self._refuse_waiters("this gateway lost its cluster membership; it is rejoining")
            return
        if self._joined:
            self.rejoined += 1
            self._reclaim()
        self._joined = True

    def _reclaim(self) -> None:
        """A membership again after losing it (this node's lease lapsed, or Redis came
        back empty): every request still running here is written back into the ledger --
        kept under its ticket where the ledger still counts it, else under a new one -- so
        no slot it holds is granted twice; tickets of a lapsed epoch are reaped."""
        claimed = 0
        for queue in self._queues.values():
            for lease in queue.running():
                ticket = self.ticket()
                if ticket is None:
                    return
                self.send("claim", queue, f"{lease.ticket} {ticket}")
                claimed += 1
        if claimed:
            log.warning("rejoined the cluster: %d running request(s) written back", claimed)

    def _refuse_waiters(self, message: str) -> None:
        error = LedgerUnavailable(message, retry_after_s=1.0)
        for queue in self._queues.values():
            queue.fail_waiters(error)
        self._expected.clear()

    def store_failed(self) -> None:
        """An admission found the store slow or away: open the breaker. Until a heartbeat
        reaches Redis again, admissions are refused at once instead of each waiting out
        the timeout, and nobody is left waiting for a grant that cannot come."""
        if not self.degraded:
            log.warning("cluster store unreachable: refusing admissions until it answers")
            self.degraded = True
            self._refuse_waiters("the cluster store is unreachable; try again")

    async def _sync_every_heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_s)
            if not self.lease.reachable:
                self.store_failed()
                continue
            if self.degraded and self.lease.leading:
                log.warning("cluster store reachable again: admitting")
                self.degraded = False
            if self.lease.leading:
                syncing = {id(q) for kind, q, _, _ in self._outbox if kind == "sync"}
                for queue in self._queues.values():
                    if id(queue) not in syncing:  # Redis away: one each, not one a beat
                        self.send("sync", queue)

    # -- the role --------------------------------------------------------------------------
    def gate(self, path: str) -> GatewayError | None:
        if path in ALWAYS_SERVED or self.leading:
            return None
        return NotLeader(
            "this gateway is not a member of the cluster yet (is the cluster store reachable?)",
            headers={"Retry-After": "1"},
        )

    def view(self) -> dict[str, Any]:
        return {
            "mode": self.config.mode,
            "node": self.node_id,
            "role": "member" if self.leading else "joining",
            "degraded": self.degraded,
            "epoch": self.lease.epoch if self.leading else None,
            "store_reachable": self.lease.reachable,
            "pools": {
                pool_id: {"queued_cluster_wide": q.global_depth, "reaped": q.reaped}
                for pool_id, q in self._queues.items()
            },
        }

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._loops = [
            loop.create_task(self._read_inbox(), name="cluster-inbox"),
            loop.create_task(self._sync_every_heartbeat(), name="cluster-sync"),
        ]

    async def aclose(self) -> None:
        self._closing = True
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        if self._sending is not None:  # the last give-backs, while still a member
            try:  # bounded: with Redis away they would be retried forever
                async with asyncio.timeout(4 * self.op_timeout_s):
                    await asyncio.shield(self._sending)
            except TimeoutError:
                self._sending.cancel()
                log.warning("%d give-back(s) not sent: reaped with this node", len(self._outbox))
        await super().aclose()
        await self._inbox_client.aclose()
        await self._ledger_client.aclose()
