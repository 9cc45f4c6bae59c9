"""PoolRuntime: one pool's replicas with their adapters, admission queue, health monitor
and retry policy, as one config section describes them. ``GatewayState`` owns the pools;
the request path (``gateway.exchange``) and the lifecycle use them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Sequence
from typing import TypedDict

from backends.process import ManagedProcess
from backends.registry import build_backend
from gateway.config import PoolConfig
from policies.admission import AdmissionQueue
from policies.health import Ejector, HealthMonitor, mark_unreachable
from policies.replicas import ReplicaState
from policies.retry import RetryBudget, RetryPolicy

# builds a pool's admission: in process by default; ``[cluster] mode = "active"`` would give
# a ledger shared on Redis (the same interface, the same rules)
AdmissionFactory = Callable[[Sequence[ReplicaState], PoolConfig], AdmissionQueue]


class QueueSettings(TypedDict):
    capacity: int
    queue_timeout_s: float
    unready_retry_s: float


def queue_settings(config: PoolConfig) -> QueueSettings:
    """What every admission queue of the pool is built with, local or shared."""
    return {
        "capacity": config.queue_capacity,
        "queue_timeout_s": config.queue_timeout_s,
        "unready_retry_s": max(1.0, min(config.health_interval_s, 5.0)),
    }


def local_admission(replicas: Sequence[ReplicaState], config: PoolConfig) -> AdmissionQueue:
    return AdmissionQueue(replicas, **queue_settings(config))


class PoolRuntime:
    __slots__ = (
        "canonical",
        "config",
        "endpoints",
        "native_endpoints",
        "native_routes",
        "health",
        "id",
        "_loop",
        "on_demand",
        "processes",
        "queue",
        "replicas",
        "retried",
        "retry",
        "upstream_model",
        "variant",
    )

    def __init__(
        self,
        config: PoolConfig,
        variant: str = "default",
        *,
        on_demand: bool = False,
        admission: AdmissionFactory = local_admission,
    ) -> None:
        self.config = config
        # a catalog model (gateway.residency): started on first request, parked when
        # unloaded; never started with the gateway, never part of a config reload
        self.on_demand = on_demand
        self.variant = variant  # which of the pool's settings runs: "default" or a variant id
        self.id = config.id
        self._loop: asyncio.AbstractEventLoop | None = None
        self.canonical = config.models[0]
        self.replicas = [ReplicaState(build_backend(r)) for r in config.replicas]
        self.queue = admission(self.replicas, config)
        ejection = config.ejection
        self.health = HealthMonitor(
            self.replicas,
            self.queue,
            config.health_interval_s,
            Ejector(
                self.queue,
                consecutive_failures=ejection.consecutive_failures,
                cooldown_s=ejection.cooldown_s,
                max_cooldown_s=ejection.max_cooldown_s,
            ),
        )
        retry = config.retry
        self.retry = RetryPolicy(
            attempts=retry.attempts,
            backoff_base_s=retry.backoff_base_s,
            backoff_max_s=retry.backoff_max_s,
            budget=RetryBudget(retry.budget_ratio, retry.budget_min, self.in_flight),
        )
        self.upstream_model = {r.id: r.upstream_model or self.canonical for r in config.replicas}
        # what every replica serves: a request lands on whichever is free
        self.endpoints = frozenset.intersection(*(r.backend.endpoints for r in self.replicas))
        self.native_endpoints = self.replicas[0].backend.native_endpoints
        self.native_routes = self.replicas[0].backend.native_routes
        self.retried = 0  # retry attempts made, for GET /metrics
        self.processes: list[ManagedProcess] = []

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop the pool serves on, looked up once: on Python 3.11 every
        ``asyncio.get_running_loop()`` is a ``getpid`` system call, a few per request."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    async def start(self, on_exit: Callable[[ReplicaState, int], None] | None = None) -> None:
        """Open the replicas' clients, launch the managed ones, start health probes.
        ``on_exit`` hears of a managed process that exits (a reload fails fast on it)."""
        for replica in self.replicas:
            await replica.backend.start()
            argv = replica.backend.launch_argv
            if argv is not None:
                process = ManagedProcess(
                    replica.replica_id, argv, on_exit=self._on_exit(replica, on_exit)
                )
                self.processes.append(process)
                await process.start()
        await self.health.start()

    def _on_exit(
        self, replica: ReplicaState, also: Callable[[ReplicaState, int], None] | None
    ) -> Callable[[int], None]:
        def on_exit(code: int) -> None:
            mark_unreachable(replica, self.queue, f"managed process exited with {code}")
            if also is not None:
                also(replica, code)

        return on_exit

    async def stop(self) -> None:
        await self.health.stop()
        await asyncio.gather(*(process.stop() for process in self.processes))
        self.processes.clear()
        for replica in self.replicas:
            await replica.backend.aclose()

    def rebind(self, config: PoolConfig) -> None:
        """A parked pool's replicas at new addresses (its port was taken meanwhile): new
        adapters, the same replica records, queue and waiters."""
        self.config = config
        for replica, replica_config in zip(self.replicas, config.replicas, strict=True):
            replica.backend = build_backend(replica_config)

    async def park(self, detail: str) -> None:
        """Stop everything the pool runs but keep the pool: its queue (and whoever waits
        in it) stays, and ``start`` brings it back. Models on demand unload this way."""
        await self.stop()
        for replica in self.replicas:
            replica.ready = False
            replica.detail = detail

    def idle(self) -> bool:
        return self.queue.depth() == 0 and self.queue.in_use() == 0

    def in_flight(self) -> int:
        """Requests holding a slot or waiting for one."""
        return self.queue.in_use() + self.queue.depth()

    def has_free_replica(self, avoid: Collection[str]) -> bool:
        return any(r.free_slots > 0 and r.replica_id not in avoid for r in self.replicas)

    @property
    def engine(self) -> str:
        return self.replicas[0].engine


class Hold:
    """A pool swapping its model in place (``swap_strategy = "replace"``): requests wait
    here, within the pool's queue capacity and queue timeout, instead of failing.
    ``expected_s``: how long this pool's last swap took (a refusal's ``Retry-After`` is
    what is left of it, not a constant)."""

    __slots__ = ("expected_s", "released", "started", "waiting")

    def __init__(self, expected_s: float = 5.0) -> None:
        self.released = asyncio.Event()
        self.waiting = 0
        self.expected_s = expected_s
        self.started = time.monotonic()

    def retry_after_s(self) -> float:
        return max(1.0, self.expected_s - (time.monotonic() - self.started))
