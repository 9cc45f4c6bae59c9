"""Active health: probe each replica's own health route and keep its state current.

A replica that passes becomes ready and, for engines that report it (llama.cpp
``total_slots``), gets its discovered slot count unless config fixed one. A replica that
fails is taken out of placement at once. Not-ready replicas are probed faster, so a
llama-server that finishes loading is used within a second.
"""

from __future__ import annotations

import asyncio
import logging

from backends.base import ReplicaInfo
from backends.errors import BackendError
from policies.admission import AdmissionQueue, PoolUnready
from policies.replicas import ReplicaState

log = logging.getLogger("orchgate.health")

NOT_READY_INTERVAL_S = 0.5


def apply_probe(replica: ReplicaState, info: ReplicaInfo, queue: AdmissionQueue) -> None:
    """Fold one probe result into the replica's state. Pure state change, no I/O."""
    was_ready = replica.ready
    if info.total_slots and replica.backend.configured_slots is None:
        replica.slots = info.total_slots
    if info.engine_version:
        replica.engine_version = info.engine_version
    replica.ready = info.ready
    replica.detail = info.detail
    if info.ready:
        queue.pump()
    elif was_ready:
        log.warning("replica %s is not ready: %s", replica.replica_id, info.detail)
        if not queue.is_ready():
            queue.fail_waiters(
                PoolUnready(
                    "the pool lost its last ready replica", retry_after_s=queue.unready_retry_s
                )
            )


def mark_unreachable(replica: ReplicaState, queue: AdmissionQueue, detail: str) -> None:
    """Passive health: a connect failure on the data plane takes the replica out now."""
    apply_probe(replica, ReplicaInfo(ready=False, detail=detail), queue)


class HealthMonitor:
    """One probe loop per replica, owned by the gateway's lifespan."""

    def __init__(
        self, replicas: list[ReplicaState], queue: AdmissionQueue, interval_s: float
    ) -> None:
        self._replicas = replicas
        self._queue = queue
        self._interval_s = interval_s
        self._tasks: list[asyncio.Task[None]] = []
        self._wake: dict[str, asyncio.Event] = {}

    async def probe_once(self, replica: ReplicaState) -> None:
        try:
            info = await replica.backend.probe()
        except BackendError as exc:
            info = ReplicaInfo(ready=False, detail=exc.message)
        apply_probe(replica, info, self._queue)

    async def _loop(self, replica: ReplicaState) -> None:
        wake = self._wake[replica.replica_id]
        while True:
            await self.probe_once(replica)
            interval = (
                self._interval_s if replica.ready else min(self._interval_s, NOT_READY_INTERVAL_S)
            )
            wake.clear()
            try:
                await asyncio.wait_for(wake.wait(), timeout=interval)
            except TimeoutError:
                pass

    def wake(self, replica_id: str) -> None:
        """Probe ``replica_id`` now (after a data-plane failure)."""
        event = self._wake.get(replica_id)
        if event is not None:
            event.set()

    async def start(self) -> None:
        # One synchronous round first, so a gateway started next to a ready backend
        # serves its first request without a spurious 503.
        await asyncio.gather(*(self.probe_once(r) for r in self._replicas))
        for replica in self._replicas:
            self._wake[replica.replica_id] = asyncio.Event()
            self._tasks.append(
                asyncio.create_task(self._loop(replica), name=f"health:{replica.replica_id}")
            )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
