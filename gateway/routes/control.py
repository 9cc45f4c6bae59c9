"""Control plane: ``GET /health`` (liveness + per-pool readiness),
``GET /v1/pools/{id}/health`` (``{live, ready, draining, metrics}`` from each replica's own
health and load), ``GET /metrics`` (Prometheus) and the live status page (``GET /status``,
its data at ``GET /v1/status``)."""

from __future__ import annotations

import asyncio
import time
from importlib import resources
from typing import Any

import msgspec
from litestar import Response, get
from litestar.response import Redirect

from backends.base import ReplicaLoad
from backends.errors import BackendError
from gateway import __version__
from gateway.errors import NotFound
from gateway.lifecycle import Lifecycle
from gateway.metrics import MEDIA_TYPE as METRICS_MEDIA_TYPE
from gateway.metrics import Metrics
from gateway.pools import PoolRuntime
from gateway.state import GatewayState
from policies.admission import Priority
from policies.replicas import ReplicaState

_LOAD_TIMEOUT_S = 1.0


_STATUS_PAGE = (resources.files("gateway") / "status.html").read_bytes()


async def _pool_detail(pool: PoolRuntime) -> dict[str, Any]:
    loads = await asyncio.gather(*(_engine_load(r) for r in pool.replicas))
    detail = pool_summary(pool)
    detail["queue_depth_by_priority"] = {p.value: pool.queue.depth(p) for p in Priority}
    detail["replicas"] = [
        _replica_view(r, load) for r, load in zip(pool.replicas, loads, strict=True)
    ]
    return detail


def pool_summary(pool: PoolRuntime) -> dict[str, Any]:
    return {
        "ready": pool.queue.is_ready(),
        "engine": pool.engine,
        "models": pool.config.models,
        "replicas_ready": sum(1 for r in pool.replicas if r.ready),
        "replicas_total": len(pool.replicas),
        "queue_depth": pool.queue.depth(),
        "slots_in_use": pool.queue.in_use(),
        "slots_ready": pool.queue.ready_slots(),
        "variant": pool.variant,
        "on_demand": pool.on_demand,
    }


async def _engine_load(replica: ReplicaState) -> ReplicaLoad | None:
    if not replica.ready:
        return None
    try:
        async with asyncio.timeout(_LOAD_TIMEOUT_S):
            return await replica.backend.load()
    except (BackendError, TimeoutError):
        return None


def _replica_view(replica: ReplicaState, load: ReplicaLoad | None) -> dict[str, Any]:
    return {
        "id": replica.replica_id,
        "url": replica.backend.root,  # type: ignore[attr-defined]  # a reload may move it
        "engine": replica.engine,
        "engine_version": replica.engine_version,
        "ready": replica.ready,
        "detail": replica.detail,
        "slots": replica.slots,
        "slots_in_use": replica.in_use,
        "engine_running": None if load is None else load.running,
        "engine_waiting": None if load is None else load.waiting,
        "consecutive_failures": replica.failures,
        "ejections": replica.ejections,
        "ejected_for_s": round(max(0.0, replica.ejected_until - time.monotonic()), 3),
        "tokens_in": replica.tokens_in,
        "tokens_out": replica.tokens_out,
        "gpu": None if replica.gpu is None else msgspec.structs.asdict(replica.gpu),
        "accelerator": replica.accelerator,
    }


def serving(state: GatewayState) -> bool:
    """This node's pools can serve: not draining, every pool ready -- a catalog model that
    is not loaded is ready to load, not a broken pool."""
    return not state.draining and all(
        pool.queue.is_ready() for pool in state.pools.values() if not pool.on_demand
    )


def probe_handlers(state: GatewayState) -> list[Any]:
    """``/health`` (liveness and this node's readiness) and ``/ready`` (whether a load
    balancer should send it traffic: in a cluster, only the leader)."""

    def with_cluster(body: dict[str, Any]) -> dict[str, Any]:
        if state.cluster is not None:
            body["cluster"] = state.cluster.view()
        return body

    @get("/health")
    async def health() -> Response[dict[str, Any]]:
        pools = {pool_id: pool_summary(pool) for pool_id, pool in state.pools.items()}
        ready = serving(state)
        status = "draining" if state.draining else "ok" if ready else "unready"
        body = {"status": status, "live": True, "ready": ready,
                "tasks_active": state.tasks.active(), "pools": pools}  # fmt: skip
        return Response(with_cluster(body), status_code=200 if ready else 503)

    @get("/ready")
    async def ready() -> Response[dict[str, Any]]:
        pools_ready = serving(state)
        leading = state.cluster is None or state.cluster.leading
        body = {"ready": pools_ready and leading, "pools_ready": pools_ready}
        return Response(with_cluster(body), status_code=200 if body["ready"] else 503)

    return [health, ready]


def control_handlers(state: GatewayState, lifecycle: Lifecycle, *, guards: list[Any]) -> list[Any]:
    @get("/v1/pools/{pool_id:str}/health", guards=guards)
    async def pool_health(pool_id: str) -> dict[str, Any]:
        pool = state.pools.get(pool_id)
        if pool is None:
            raise NotFound(f"no pool {pool_id!r}", param="pool_id")
        return {
            "live": True,
            "ready": pool.queue.is_ready() and not state.draining,
            "draining": state.draining,
            "metrics": await _pool_detail(pool),
        }

    @get("/v1/status", guards=guards)
    async def status() -> dict[str, Any]:
        """Everything the status page shows, in one answer."""
        runtimes = list(state.pools.values())  # a reload may replace the table meanwhile
        pools = await asyncio.gather(*(_pool_detail(p) for p in runtimes))
        for runtime, detail in zip(runtimes, pools, strict=True):
            detail["id"] = runtime.id
            detail["lifecycle"] = lifecycle.view(runtime.id) if runtime.id in state.pools else None
        models = state.model_states()
        return {
            "version": __version__,
            "uptime_s": round(time.time() - state.started_at, 1),
            "ready": serving(state),
            "draining": state.draining,
            "tasks_active": state.tasks.active(),
            "pools": pools,
            "models": [
                {"id": model, "state": model_state, "pool": state.models.pool_for(model)}
                for model, model_state in models.items()
            ],
            # models on demand: the status page's menu (load, unload, what would run)
            "catalog": state.catalog.menu() if state.catalog is not None else None,
        }

    @get("/v1/status/history", guards=guards)
    async def status_history(since: float | None = None) -> dict[str, Any]:
        """The status page's charts: per pool, one point per sampling interval over the last
        ``[metrics] history_s`` (tokens/s, time to first byte, queue depth per priority,
        running slots, GPU memory); ``since`` (a ``t`` the page already has) for the rest."""
        return state.history.view(since)

    @get("/status", media_type="text/html")
    async def status_page() -> bytes:
        """The live status page: a static shell; its data comes from ``/v1/status``
        (behind the token when one is set)."""
        return _STATUS_PAGE

    @get("/", status_code=307)
    async def root() -> Redirect:
        return Redirect("/status")

    metrics_text = Metrics(state)

    @get("/metrics", media_type=METRICS_MEDIA_TYPE)
    async def metrics() -> bytes:
        """Prometheus text; unauthenticated like ``/health`` (scrapers rarely send tokens)."""
        return metrics_text.render()

    return [*probe_handlers(state), pool_health, metrics, status, status_history, status_page, root]
