"""GatewayState: the one owner of runtime state, built from config, started in the lifespan.

Holds, per pool, the replica adapters with their slot accounting, the admission queue and
the health monitor; plus the model index. Nothing here is global.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from backends.process import ManagedProcess
from backends.registry import ModelIndex, build_backend
from gateway.config import Config, PoolConfig
from gateway.tasks import TaskBook
from gateway.wire import models_list
from policies.admission import AdmissionQueue
from policies.health import HealthMonitor, mark_unreachable
from policies.replicas import ReplicaState


class PoolRuntime:
    __slots__ = ("canonical", "config", "health", "id", "queue", "replicas", "upstream_model")

    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        self.id = config.id
        self.canonical = config.models[0]
        self.replicas = [ReplicaState(build_backend(r)) for r in config.replicas]
        self.queue = AdmissionQueue(
            self.replicas,
            capacity=config.queue_capacity,
            queue_timeout_s=config.queue_timeout_s,
            unready_retry_s=max(1.0, min(config.health_interval_s, 5.0)),
        )
        self.health = HealthMonitor(self.replicas, self.queue, config.health_interval_s)
        self.upstream_model = {r.id: r.upstream_model or self.canonical for r in config.replicas}

    @property
    def engine(self) -> str:
        return self.replicas[0].engine


class GatewayState:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.pools = {p.id: PoolRuntime(p) for p in config.pools}
        self.models = ModelIndex((p.id, p.models) for p in config.pools)
        self.started_at = int(time.time())
        self.tasks = TaskBook(config.tasks)
        self.processes: list[ManagedProcess] = []
        self.models_body = models_list(
            [(name, p.models[0], p.id) for p in config.pools for name in p.models],
            self.started_at,
        )

    def all_replicas(self) -> list[ReplicaState]:
        return [r for pool in self.pools.values() for r in pool.replicas]

    async def start(self) -> None:
        for pool in self.pools.values():
            for replica in pool.replicas:
                await replica.backend.start()
                argv = replica.backend.launch_argv
                if argv is not None:
                    process = ManagedProcess(
                        replica.replica_id, argv, on_exit=self._on_exit(pool, replica)
                    )
                    self.processes.append(process)
                    await process.start()
        await asyncio.gather(*(pool.health.start() for pool in self.pools.values()))

    @staticmethod
    def _on_exit(pool: PoolRuntime, replica: ReplicaState) -> Callable[[int], None]:
        def on_exit(code: int) -> None:
            mark_unreachable(replica, pool.queue, f"managed process exited with {code}")

        return on_exit

    async def stop(self) -> None:
        await self.tasks.aclose()
        await asyncio.gather(*(pool.health.stop() for pool in self.pools.values()))
        await asyncio.gather(*(process.stop() for process in self.processes))
        for replica in self.all_replicas():
            await replica.backend.aclose()
