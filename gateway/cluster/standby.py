"""``[cluster] mode = "standby"``: one leader serves; the other nodes wait to take over.

The leader runs today's in-process admission (no Redis call on the OpenAI path). A standby
answers every request that would use a model or change what runs with 503, ``Retry-After:
1`` and ``X-Orchgate-Leader: <node>`` (OpenAI SDKs retry a 503), and ``GET /ready`` with
503, so a load balancer health-checking ``/ready`` sends traffic to the leader alone. It
still probes its replicas, so it is ready the moment it takes the lease. Probes
(``/health``, ``/ready``, ``/metrics``) and the status page's shell answer on every node.
"""

from __future__ import annotations

import os
import secrets
import socket
from typing import Any

from gateway.cluster.lease import LeaderLease
from gateway.cluster.tasks import RedisTaskLog
from gateway.config import ClusterConfig
from gateway.errors import GatewayError, NotLeader

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
        self.config = config
        self.node_id = config.node_id or default_node_id()
        self._client = redis.asyncio.Redis.from_url(
            url,
            socket_timeout=config.op_timeout_s,
            socket_connect_timeout=config.op_timeout_s,
            retry_on_timeout=False,
        )
        self.lease = LeaderLease(
            self._client,
            key=f"{config.key_prefix}:leader:data",
            node_id=self.node_id,
            lease_s=config.lease_s,
            heartbeat_s=config.heartbeat_s,
            op_timeout_s=config.op_timeout_s,
        )

    def task_log(self, retention_s: float) -> RedisTaskLog:
        """The task API's event logs in Redis (write-through on the leader)."""
        return RedisTaskLog(
            self._client,
            prefix=self.config.key_prefix,
            lease=self.lease,
            retention_s=retention_s,
            op_timeout_s=self.config.op_timeout_s,
        )

    @property
    def leading(self) -> bool:
        return self.lease.leading

    def gate(self, path: str) -> GatewayError | None:
        """None on the leader and for the probes; else the 503 a standby answers."""
        if path in ALWAYS_SERVED or self.lease.leading:
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
            "role": "leader" if self.lease.leading else "standby",
            "leader": self.lease.leader,
            "epoch": self.lease.epoch if self.lease.leading else None,
            "store_reachable": self.lease.reachable,
        }

    async def start(self) -> None:
        self.lease.start()

    async def aclose(self) -> None:
        await self.lease.aclose()
        await self._client.aclose()
