"""GatewayState: the one owner of runtime state, built from config, started in the lifespan.

Holds, per pool, the replica adapters with their slot accounting, the admission queue and
the health monitor; plus the model index. Nothing here is global.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any, Protocol

from backends.gpu import Nvml
from backends.registry import ModelIndex
from gateway.config import Config
from gateway.errors import EndpointNotServed, InvalidRequest, ModelNotFound
from gateway.history import History
from gateway.pools import AdmissionFactory, Hold, PoolRuntime, local_admission
from gateway.tasks import TaskBook
from gateway.wire import encoder, model_object, models_list
from policies.admission import PoolClosed, QueueFull, QueueTimeout
from policies.replicas import ReplicaLatency, ReplicaState

log = logging.getLogger("orchgate")

SHUTDOWN_MESSAGE = "the gateway is shutting down"


class CatalogListing(Protocol):
    """What the model list and routing need from the catalog (``gateway.residency``)."""

    def model_fields(self, pool_id: str) -> dict[str, Any] | None: ...
    def unroutable(self) -> list[dict[str, Any]]: ...
    def explain(self, name: str) -> str | None: ...
    def model_states(self) -> dict[str, str]: ...
    def menu(self) -> list[dict[str, Any]]: ...
    def metric_counts(
        self,
    ) -> tuple[Counter[tuple[str, str, str]], dict[str, list[float]], Counter[str]]: ...


class ClusterRole(Protocol):
    """This node's part in a cluster (``gateway.cluster.standby.Standby``)."""

    @property
    def leading(self) -> bool: ...

    def view(self) -> dict[str, Any]: ...


class GatewayState:
    def __init__(self, config: Config, *, admission: AdmissionFactory = local_admission) -> None:
        self.config = config
        self.admission = admission  # how every pool, also a reload's, builds its admission
        self.pools = {p.id: PoolRuntime(p, admission=admission) for p in config.pools}
        # pools a reload replaced: no new requests, finishing what they hold (gateway.lifecycle)
        self.retiring: list[PoolRuntime] = []
        self.retired_models: dict[str, float] = {}  # model id -> when it stopped being served
        self.holds: dict[str, Hold] = {}  # pools swapping in place (gateway.lifecycle)
        self.started_at = int(time.time())
        # extended metrics only: per-replica latency histograms
        self.latency: dict[str, ReplicaLatency] = (
            {r.replica_id: ReplicaLatency() for r in self.all_replicas()}
            if config.metrics.extended
            else {}
        )
        self.tasks = TaskBook(config.tasks, latency=self.latency)
        self.draining = False
        self._grace_ends: float | None = None
        self.nvml: Nvml | None = None
        self._gpu_poller: asyncio.Task[None] | None = None
        self.catalog: CatalogListing | None = None  # models on demand, when configured
        self.cluster: ClusterRole | None = None  # [cluster]: this node's role (gateway.cluster)
        metrics = config.metrics
        self.history = History(
            self, interval_s=metrics.history_interval_s, window_s=metrics.history_s
        )  # the status page's charts
        self.reindex()

    def reindex(self) -> None:
        """Rebuild the model routing table from the pools (start, reload); ``/v1/models``
        follows on its next request."""
        self.models = ModelIndex((p.config.id, p.config.models) for p in self.pools.values())
        self._listing_stamp: tuple[Any, ...] | None = None

    def model_listing(self) -> tuple[bytes, dict[str, bytes]]:
        """``GET /v1/models`` and each ``/v1/models/{id}``, encoded once per change: of the
        pools, or of what their engines report about the model (context, capabilities)."""
        stamp = (self.models, *(r.model for r in self.all_replicas()))
        if stamp != self._listing_stamp:
            objects = self._model_objects()
            self._listing = models_list(objects), {o["id"]: encoder.encode(o) for o in objects}
            self._listing_stamp = stamp
        return self._listing

    def _model_objects(self) -> list[dict[str, Any]]:
        catalog = self.catalog
        objects = []
        for pool in self.pools.values():
            p = pool.config
            facts = _engine_fields(pool)
            extra = catalog.model_fields(p.id) if catalog is not None else None
            if extra is not None and "capabilities" in facts:  # metadata and engine agree
                extra = extra | {"capabilities": list(dict.fromkeys(
                    [*extra["capabilities"], *facts["capabilities"]]))}  # fmt: skip
            for name in p.models:
                entry = model_object(name, p.models[0], p.id, self.started_at) | facts
                objects.append(entry if extra is None else entry | extra)
        if catalog is not None:
            objects += catalog.unroutable()
        return objects

    def default_model(self) -> str:
        """What a request without ``model`` gets: ``server.default_model``, else the only
        pool's canonical model (as a single llama-server serves whatever it is asked)."""
        configured = self.config.server.default_model
        if configured is not None:
            return configured
        if len(self.pools) == 1:  # a single explicit pool, or a catalog of one model
            return next(iter(self.pools.values())).config.models[0]
        raise InvalidRequest(
            "missing required field 'model' (this gateway serves several pools and has no "
            "server.default_model)",
            param="model",
        )

    def pool_for(self, model: str) -> PoolRuntime:
        pool_id = self.models.pool_for(model)
        if pool_id is None:
            why = self.catalog.explain(model) if self.catalog is not None else None
            raise ModelNotFound(why or f"The model '{model}' does not exist", param="model")
        return self.pools[pool_id]

    def worker_pool(self) -> PoolRuntime:
        """The first pool of ``openvino`` workers: the only engine with the job routes.
        (An NPU pool is never a fallback for another pool; this is the reverse lookup.)"""
        for pool in self.pools.values():
            if pool.engine == "openvino":
                return pool
        raise EndpointNotServed("no openvino worker pool is configured for /v1/worker routes")

    async def settled(self, pool: PoolRuntime) -> PoolRuntime:
        """The pool that serves ``pool.id`` once no in-place swap holds it. The data plane
        calls this only while ``holds`` is not empty. Raises ``QueueFull`` (beyond the
        queue capacity), ``QueueTimeout`` or ``PoolClosed`` (removed meanwhile)."""
        hold = self.holds.get(pool.id)
        if hold is None:
            return pool
        if hold.waiting >= pool.config.queue_capacity:
            pool.queue.rejected[QueueFull.reason] += 1
            raise QueueFull(
                "the pool's queue is full while it swaps its model",
                retry_after_s=hold.retry_after_s(),
            )
        hold.waiting += 1
        try:
            async with asyncio.timeout(pool.config.queue_timeout_s):
                await hold.released.wait()
        except TimeoutError:
            pool.queue.rejected[QueueTimeout.reason] += 1
            raise QueueTimeout(
                "the pool is still swapping its model", retry_after_s=hold.retry_after_s()
            ) from None
        finally:
            hold.waiting -= 1
        settled = self.pools.get(pool.id)
        if settled is None:
            raise PoolClosed("the pool was removed by a reload", retry_after_s=1)
        return settled

    def running_pools(self) -> list[PoolRuntime]:
        """Pools serving now and those a reload replaced that are still finishing."""
        return [*self.pools.values(), *self.retiring]

    def all_replicas(self) -> list[ReplicaState]:
        return [r for pool in self.pools.values() for r in pool.replicas]

    def model_states(self) -> dict[str, str]:
        """``model_state``: the models pools serve are ``Active``; those a reload replaced
        are ``Retired`` (until a later reload brings them back)."""
        states = dict.fromkeys(self.retired_models, "Retired")
        states.update((p.canonical, "Active") for p in self.pools.values() if not p.on_demand)
        if self.catalog is not None:
            states.update(self.catalog.model_states())
        return states

    async def _poll_gpus(self, nvml: Nvml, interval_s: float) -> None:
        while True:
            # re-read each round: a reload changes the replica set
            on_gpu = [r for r in self.all_replicas() if r.backend.gpu_device is not None]
            samples = await nvml.sample_all_async(r.backend.gpu_device for r in on_gpu)  # type: ignore[misc]
            for replica in on_gpu:
                replica.gpu = samples.get(replica.backend.gpu_device)  # type: ignore[arg-type]
            await asyncio.sleep(interval_s)

    async def start(self) -> None:
        for pool in self.pools.values():
            if not pool.on_demand:  # catalog models start on their first request
                await pool.start()
        await self.ensure_gpu_telemetry()
        self.history.start()

    async def ensure_gpu_telemetry(self) -> None:
        """Start NVML sampling once any replica names a ``gpu_device`` (at start, or when
        a reload brings one)."""
        if self.nvml is not None or not any(
            r.backend.gpu_device is not None for r in self.all_replicas()
        ):
            return
        self.nvml = await asyncio.to_thread(Nvml)
        if self.nvml.available:
            self._gpu_poller = asyncio.create_task(
                self._poll_gpus(self.nvml, self.config.metrics.gpu_interval_s),
                name="gpu-telemetry",
            )

    def begin_drain(self, grace_s: float) -> None:
        """Graceful shutdown, step one (on SIGTERM): admit nothing more, refuse everything
        queued with a retriable 503, and give what is running ``grace_s`` to finish; then
        ``end_grace`` ends it with an in-band error."""
        if self.draining:
            return
        self.draining = True
        loop = asyncio.get_running_loop()
        self._grace_ends = loop.time() + grace_s
        log.warning("draining: %s running, %s queued", self._running(), self._queued())
        retry_after = max(1.0, grace_s)
        for pool in self.running_pools():
            pool.queue.close(PoolClosed(SHUTDOWN_MESSAGE, retry_after_s=retry_after))
        loop.call_later(grace_s, self.end_grace)

    def end_grace(self) -> None:
        """Graceful shutdown, step two: cut every upstream exchange still open; each client
        gets an in-band error (or a 503 before its first byte) and its slot is freed."""
        running = self._running()
        if running:
            log.warning("grace period over: ending %s running requests", running)
        for pool in self.running_pools():
            for replica in pool.replicas:
                replica.backend.interrupt(SHUTDOWN_MESSAGE)

    def _running(self) -> int:
        return sum(pool.queue.in_use() for pool in self.running_pools())

    def _queued(self) -> int:
        return sum(pool.queue.depth() for pool in self.pools.values())

    async def stop(self) -> None:
        if self._grace_ends is not None:
            # running tasks (task API) hold no client connection the server waits for
            left = self._grace_ends - asyncio.get_running_loop().time()
            await self.tasks.wait_running(max(0.0, left))
        await self.tasks.aclose()
        await self.history.aclose()
        if self._gpu_poller is not None:
            self._gpu_poller.cancel()
            await asyncio.gather(self._gpu_poller, return_exceptions=True)
        if self.nvml is not None:
            self.nvml.close()
        pools = self.running_pools()
        await asyncio.gather(*(pool.stop() for pool in pools))


def _engine_fields(pool: PoolRuntime) -> dict[str, Any]:
    """``context_length`` and ``capabilities`` as the pool's engines report them: the
    smallest context and the capabilities every replica that says has."""
    facts = [r.model for r in pool.replicas if r.model is not None]
    fields: dict[str, Any] = {}
    lengths = [f.context_length for f in facts if f.context_length is not None]
    if lengths:
        fields["context_length"] = min(lengths)
    said = [f.capabilities for f in facts if f.capabilities is not None]
    if said:
        fields["capabilities"] = [c for c in said[0] if all(c in other for other in said)]
    return fields
