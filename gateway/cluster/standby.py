"""``[cluster] mode = "standby"``: one leader serves; the other nodes wait to take over.

The leader runs today's in-process admission (no Redis call on the OpenAI path). A standby
answers every request that would use a model or change what runs with 503, ``Retry-After:
1`` and ``X-Orchgate-Leader: <node>`` (OpenAI SDKs retry a 503), and ``GET /ready`` with
503, so a load balancer health-checking ``/ready`` sends traffic to the leader alone. It
still probes its replicas, so it is ready the moment it takes the lease. Probes
(``/health``, ``/ready``, ``/metrics``) and the status page's shell answer on every node.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.cluster.lease import LeaderLease
from gateway.cluster.reservations import RedisReservations
from gateway.cluster.tasks import AskCancel, RedisTaskLog
from gateway.config import ClusterConfig
from gateway.errors import GatewayError, NotLeader
from gateway.tasks import TaskBook
from policies.reservation import ReservationBook

log = logging.getLogger("orchgate.cluster")

CLUSTER_URL_ENV = "ORCHGATE_CLUSTER_URL"
# what a standby answers itself (everything else waits for the leader)
ALWAYS_SERVED = frozenset({"/health", "/ready", "/metrics", "/status", "/", "/openapi.json"})


def default_node_id() -> str:
    host = "".join(c if c.isalnum() or c in "-_." else "-" for c in socket.gethostname())
    return f"{host[:48] or 'node'}-{secrets.token_hex(2)}"


class Standby:
    """This node's role: the lease, and the gate in front of the routes."""

    def __init__(self, config: ClusterConfig, *, env: dict[str, str] | None = None) -> None:
        import redis.asyncio  # here: a gateway without [cluster] never imports it

        url = (env if env is not None else os.environ).get(CLUSTER_URL_ENV) or config.url
        self.url = url
        self.config = config
        self.node_id = config.node_id or default_node_id()
        self._client = redis.asyncio.Redis.from_url(
            url,
            socket_timeout=config.op_timeout_s,
            socket_connect_timeout=config.op_timeout_s,
            retry_on_timeout=False,
        )
        self._on_lead: list[Callable[[], Awaitable[None]]] = []  # run on taking the lead
        self.lease = LeaderLease(
            self._client,
            key=self.lease_key(),
            node_id=self.node_id,
            lease_s=config.lease_s,
            heartbeat_s=config.heartbeat_s,
            op_timeout_s=config.op_timeout_s,
            on_change=self._changed,
        )
        self._adopting: asyncio.Task[None] | None = None
        self._settled = False  # leading, and what the last leader left is adopted

    def lease_key(self) -> str:
        """The lease this node's serving depends on: the one leader's."""
        return f"{self.config.key_prefix}:leader:data"

    def _changed(self, leading: bool) -> None:
        self._settled = False  # serve only once the takeover steps are done
        if leading:
            self._adopting = asyncio.get_running_loop().create_task(self._took_lead())

    async def _took_lead(self) -> None:
        for step in self._on_lead:
            try:
                await step()
            except Exception:  # a takeover step failing must not stop the others
                log.exception("takeover step failed")
        self._settled = self.lease.leading

    def share_reservations(self, book: ReservationBook) -> RedisReservations | None:
        """Reservations in Redis: stored as granted, adopted by the next leader."""
        store = RedisReservations(
            self._client, prefix=self.config.key_prefix, lease=self.lease,
            op_timeout_s=self.config.op_timeout_s,
        )  # fmt: skip

        async def adopt() -> None:
            count = await store.adopt_into(book)
            if count:
                log.warning("took over %d reservation(s) from the cluster store", count)

        self._on_lead.append(adopt)
        return store

    def share_tasks(self, book: TaskBook, retention_s: float) -> RedisTaskLog:
        """The task API's event logs in Redis (write-through on the leader); ``book``: the
        tasks this node runs."""
        return self._task_log(retention_s)

    def _task_log(self, retention_s: float, ask_cancel: AskCancel | None = None) -> RedisTaskLog:
        return RedisTaskLog(
            self._client,
            prefix=self.config.key_prefix,
            lease=self.lease,
            retention_s=retention_s,
            op_timeout_s=self.config.op_timeout_s,
            ask_cancel=ask_cancel,
        )

    @property
    def leading(self) -> bool:
        """Holds the lead and has adopted the previous leader's state: may serve."""
        return self._settled and self.lease.leading

    def gate(self, path: str) -> GatewayError | None:
        """None on the leader and for the probes; else the 503 a standby answers."""
        if path in ALWAYS_SERVED or self.leading:
            return None
        leader = self.lease.leader
        where = f"the leader is {leader}" if leader else "no node leads right now"
        headers = {"Retry-After": "1"}
        if leader:
            headers["X-Orchgate-Leader"] = leader
        return NotLeader(f"this gateway is a standby; {where}", headers=headers)

    def view(self) -> dict[str, Any]:
        return {
            "mode": self.config.mode,
            "node": self.node_id,
            "role": "leader" if self.leading else "standby",
            "leader": self.lease.leader,
            "epoch": self.lease.epoch if self.leading else None,
            "store_reachable": self.lease.reachable,
        }

    async def start(self) -> None:
        self.lease.start()

    async def aclose(self) -> None:
        await self.lease.aclose()
        await self._client.aclose()
