"""Replica health: active probes plus passive outlier ejection.

Active: each replica's own health route is probed on an interval. A replica that passes
becomes ready and, for engines that report it (llama.cpp ``total_slots``), gets its
discovered slot count unless config fixed one. A replica that fails is taken out of
placement at once. Not-ready replicas are probed faster, so a llama-server that finishes
loading is used within a second.

Passive: the dispatcher reports data-plane failures (resets, timeouts, 5xx other than
503). ``consecutive_failures`` of them in a row eject the replica for a cooldown that
doubles with each repeat ejection (up to ``max_cooldown_s``); after the cooldown, a
passing probe brings it back. A replica that stays clean for ``max_cooldown_s`` after
returning starts again from the base cooldown. Overload answers (429/503) and client
errors are not failures: the replica is alive and said so.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from backends.base import ReplicaInfo
from backends.errors import (
    BackendError,
    BackendInterrupted,
    BackendOverloaded,
    BackendRejected,
)
from policies.admission import AdmissionQueue, PoolUnready
from policies.replicas import ReplicaState

log = logging.getLogger("orchgate.health")

NOT_READY_INTERVAL_S = 0.5


def apply_probe(
    replica: ReplicaState,
    info: ReplicaInfo,
    queue: AdmissionQueue,
    now: float | None = None,
) -> None:
    """Fold one probe result into the replica's state. Pure state change, no I/O.
    An ejected replica stays out until its cooldown is over, whatever the probe says."""
    was_ready = replica.ready
    if info.total_slots and replica.backend.configured_slots is None:
        replica.slots = info.total_slots
    if info.engine_version:
        replica.engine_version = info.engine_version
    if info.accelerator is not None:
        replica.accelerator = info.accelerator
    if info.model is not None:
        replica.model = info.model
    ejected = replica.ejected_until > (time.monotonic() if now is None else now)
    replica.ready = info.ready and not ejected
    if not ejected:
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


def counts_as_failure(error: BackendError) -> bool:
    """Whether a data-plane error says something about the replica's health: transport
    failures and timeouts do; an error the replica answered itself (any status) does not
    -- a stream of bad requests must not eject a healthy replica."""
    if error.answered:
        return False
    return not isinstance(error, BackendOverloaded | BackendRejected | BackendInterrupted)


class Ejector:
    """Passive outlier ejection for one pool's replicas (settings: ``EjectionConfig``)."""

    def __init__(
        self,
        queue: AdmissionQueue,
        *,
        consecutive_failures: int,
        cooldown_s: float,
        max_cooldown_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._queue = queue
        self.threshold = consecutive_failures
        self.cooldown_s = cooldown_s
        self.max_cooldown_s = max(max_cooldown_s, cooldown_s)
        self._clock = clock

    def record_failure(self, replica: ReplicaState) -> float | None:
        """Count one failure; the cooldown in seconds if this one ejected the replica."""
        replica.failures += 1
        now = self._clock()
        if replica.failures < self.threshold or replica.ejected_until > now:
            return None
        if replica.ejected_until and now - replica.ejected_until > self.max_cooldown_s:
            replica.ejections = 0  # clean for a long while since it came back: forgiven
        replica.ejections += 1
        replica.ejected_total += 1
        replica.failures = 0
        cooldown: float = min(self.max_cooldown_s, self.cooldown_s * 2 ** (replica.ejections - 1))
        replica.ejected_until = now + cooldown
        detail = (
            f"ejected for {cooldown:g}s after {self.threshold} consecutive failures "
            f"(ejection {replica.ejections})"
        )
        log.warning("replica %s %s", replica.replica_id, detail)
        apply_probe(replica, ReplicaInfo(ready=False, detail=detail), self._queue, now)
        replica.detail = detail
        return cooldown


class HealthMonitor:
    """One probe loop per replica, owned by the gateway's lifespan."""

    def __init__(
        self,
        replicas: list[ReplicaState],
        queue: AdmissionQueue,
        interval_s: float,
        ejector: Ejector,
    ) -> None:
        self._replicas = replicas
        self._queue = queue
        self._interval_s = interval_s
        self.ejector = ejector
        self._tasks: list[asyncio.Task[None]] = []
        self._wake: dict[str, asyncio.Event] = {}

    def record_failure(self, replica: ReplicaState, error: BackendError) -> None:
        """A data-plane failure: maybe eject; probe at once when the replica is unreachable
        (a passing probe is what brings it back)."""
        if not counts_as_failure(error):
            if error.answered and error.status >= 500 and not isinstance(error, BackendRejected):
                self.wake(replica.replica_id)  # a 5xx: let the probe decide, now
            return
        cooldown = self.ejector.record_failure(replica)
        if cooldown is not None:
            self.wake(replica.replica_id)  # re-plan the probe loop around the cooldown

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
            cooldown_left = replica.ejected_until - time.monotonic()
            if cooldown_left > 0:
                interval = cooldown_left  # probing an ejected replica changes nothing
            wake.clear()
            # not wait_for: on Python 3.11 it can swallow a cancellation that lands in the
            # tick its wait completes (cpython#86296), and stop() then waited for ever
            try:
                async with asyncio.timeout(interval):
                    await wake.wait()
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
        if self._tasks:  # bounded: a reload's rollback or shutdown must never hang here
            _, stuck = await asyncio.wait(self._tasks, timeout=5.0)
            if stuck:
                log.error("%s health probe loops did not stop", len(stuck))
        self._tasks.clear()
