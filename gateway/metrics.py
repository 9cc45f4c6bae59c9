"""``GET /metrics``: Prometheus text, read from the gateway's own state at scrape time.

The request path only bumps plain integers on the replica, pool and queue it already holds
(``ReplicaState.placed``/``tokens_in``/``tokens_out``, ``AdmissionQueue.rejected``); this
collector turns them into the Home-profile series, named and labelled exactly as
SPEC.md lists them. ``[metrics] extended = true`` adds per-backend detail (latency
histograms, upstream errors by kind, retries, ejections, free VRAM), prefixed
``orchgate_`` so the required names stay exactly the required ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from policies.admission import (
    LedgerUnavailable,
    PoolClosed,
    PoolUnready,
    Priority,
    QueueFull,
    QueueTimeout,
)

if TYPE_CHECKING:
    from gateway.pools import PoolRuntime
    from gateway.state import GatewayState
    from policies.replicas import ReplicaState

# Litestar appends "; charset=utf-8" to text/* media types itself
MEDIA_TYPE = "text/plain; version=0.0.4"
MODEL_STATES = ("Active", "Retired")
REJECTION_REASONS = tuple(
    error.reason for error in (QueueFull, PoolUnready, QueueTimeout, PoolClosed)
)


def _version(replica: ReplicaState) -> str:
    return replica.engine_version or "unknown"


def _pool_version(pool: PoolRuntime) -> str:
    for replica in pool.replicas:
        if replica.engine_version:
            return replica.engine_version
    return "unknown"


class GatewayCollector(Collector):
    def __init__(self, state: GatewayState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        yield from self._home_profile()
        if self.state.config.metrics.extended:
            yield from self._extended()

    def _rejection_reasons(self) -> tuple[str, ...]:
        if self.state.cluster is None:
            return REJECTION_REASONS
        return (*REJECTION_REASONS, LedgerUnavailable.reason)  # a shared ledger's store away

    def _home_profile(self) -> Iterator[Metric]:
        pools = list(self.state.pools.values())
        replica_labels = ["engine", "engine_version", "pool_id", "replica_id"]
        depth = GaugeMetricFamily(
            "queue_depth",
            "Requests waiting for a slot.",
            labels=["engine", "engine_version", "pool_id", "priority"],
        )
        enqueued = CounterMetricFamily(
            "tasks_enqueued",
            "Requests and tasks placed on a replica (both surfaces).",
            labels=[*replica_labels, "priority"],
        )
        rejected = CounterMetricFamily(
            "tasks_rejected",
            "Requests and tasks refused by admission.",
            labels=["engine", "reason"],
        )
        tokens_in = CounterMetricFamily(
            "tokens_in", "Prompt tokens, as the engine counted them.", labels=replica_labels
        )
        tokens_out = CounterMetricFamily(
            "tokens_out", "Generated tokens relayed to clients.", labels=replica_labels
        )
        gpu_util = GaugeMetricFamily(
            "gpu_utilization",
            "GPU utilisation in percent (NVML).",
            labels=[*replica_labels, "device"],
        )
        vram_used = GaugeMetricFamily(
            "vram_used_bytes", "GPU memory in use (NVML).", labels=[*replica_labels, "device"]
        )
        model_state = GaugeMetricFamily(
            "model_state", "1 for the model's current state.", labels=["model_id", "state"]
        )
        # every reason from the start at 0, so rate() and alerts work before the first one
        rejections = {(p.engine, r): 0 for p in pools for r in self._rejection_reasons()}
        for pool in pools:
            pool_version = _pool_version(pool)
            for priority in Priority:
                depth.add_metric(
                    [pool.engine, pool_version, pool.id, priority.value],
                    pool.queue.depth(priority),
                )
            for reason, count in pool.queue.rejected.items():
                key = (pool.engine, reason)
                rejections[key] = rejections.get(key, 0) + count
            for replica in pool.replicas:
                labels = [replica.engine, _version(replica), pool.id, replica.replica_id]
                for priority in Priority:
                    enqueued.add_metric([*labels, priority.value], replica.placed[priority])
                tokens_in.add_metric(labels, replica.tokens_in)
                tokens_out.add_metric(labels, replica.tokens_out)
                gpu = replica.gpu
                if gpu is not None:
                    device = [*labels, str(gpu.device)]
                    gpu_util.add_metric(device, gpu.utilization_pct)
                    vram_used.add_metric(device, gpu.vram_used_bytes)
        for (engine, reason), count in sorted(rejections.items()):
            rejected.add_metric([engine, reason], count)
        for model, state in self.state.model_states().items():
            for name in MODEL_STATES:
                model_state.add_metric([model, name], 1 if name == state else 0)
        yield from (depth, enqueued, rejected, tokens_in, tokens_out, gpu_util, vram_used)
        yield model_state
        yield from self._cluster()

    def _cluster(self) -> Iterator[Metric]:
        cluster = self.state.cluster
        if cluster is None:
            return
        view = cluster.view()
        if view["mode"] != "active":  # 1 on the node that leads (alert when none does)
            leader = GaugeMetricFamily(
                "orchgate_cluster_leader", "1 while this node leads the cluster.", labels=["node"]
            )
            leader.add_metric([view["node"]], 1 if cluster.leading else 0)
            yield leader
            return
        member = GaugeMetricFamily(
            "orchgate_cluster_member",
            "1 while this node is a member of the active cluster (and so admits).",
            labels=["node"],
        )
        member.add_metric([view["node"]], 1 if cluster.leading else 0)
        queued = GaugeMetricFamily(
            "orchgate_cluster_queue_depth",
            "Requests waiting in the pool's shared queue, on every node, as last seen.",
            labels=["pool_id"],
        )
        reaped = CounterMetricFamily(
            "orchgate_cluster_reaped",
            "Leases and places of dead nodes this node gave back.",
            labels=["pool_id"],
        )
        for pool_id, pool in view["pools"].items():
            queued.add_metric([pool_id], pool["queued_cluster_wide"])
            reaped.add_metric([pool_id], pool["reaped"])
        yield from (member, queued, reaped)

    def _extended(self) -> Iterator[Metric]:
        labels = ["pool_id", "replica_id"]
        ttft = HistogramMetricFamily(
            "orchgate_time_to_first_byte_seconds",
            "From the request's arrival to the first byte sent to the client.",
            labels=labels,
        )
        duration = HistogramMetricFamily(
            "orchgate_request_duration_seconds",
            "From the request's arrival to its last byte.",
            labels=labels,
        )
        errors = CounterMetricFamily(
            "orchgate_upstream_errors",
            "Failed upstream attempts (before the first byte) and broken streams, by kind.",
            labels=[*labels, "kind"],
        )
        retries = CounterMetricFamily(
            "orchgate_retries", "Retry attempts (before the first byte).", labels=["pool_id"]
        )
        ejections = CounterMetricFamily(
            "orchgate_ejections", "Outlier ejections of a replica.", labels=labels
        )
        slots = GaugeMetricFamily(
            "orchgate_slots_in_use", "Slots held by running requests.", labels=labels
        )
        vram_free = GaugeMetricFamily(
            "orchgate_vram_free_bytes", "Free GPU memory (NVML).", labels=[*labels, "device"]
        )
        for pool in self.state.pools.values():
            retries.add_metric([pool.id], pool.retried)
            for replica in pool.replicas:
                ids = [pool.id, replica.replica_id]
                latency = self.state.latency.get(replica.replica_id)
                if latency is not None:
                    ttft.add_metric(ids, latency.ttft.buckets(), latency.ttft.sum)
                    duration.add_metric(ids, latency.duration.buckets(), latency.duration.sum)
                for kind, count in sorted(replica.errors.items()):
                    errors.add_metric([*ids, kind], count)
                ejections.add_metric(ids, replica.ejected_total)
                slots.add_metric(ids, replica.in_use)
                if replica.gpu is not None:
                    vram_free.add_metric(
                        [*ids, str(replica.gpu.device)], replica.gpu.vram_free_bytes
                    )
        yield from (ttft, duration, errors, retries, ejections, slots, vram_free)
        if self.state.catalog is not None:
            yield from self._catalog()

    def _catalog(self) -> Iterator[Metric]:
        assert self.state.catalog is not None
        counts, seconds, statuses = self.state.catalog.metric_counts()
        loads = CounterMetricFamily(
            "orchgate_model_loads", "Catalog model loads, by result.", labels=["model_id", "result"]
        )
        unloads = CounterMetricFamily(
            "orchgate_model_unloads",
            "Catalog model unloads, by reason (idle, evicted, api).",
            labels=["model_id", "reason"],
        )
        for (event, model, label), count in sorted(counts.items()):
            (loads if event == "load" else unloads).add_metric([model, label], count)
        load_seconds = SummaryMetricFamily(
            "orchgate_model_load_seconds",
            "Successful loads: from the load's start to its model serving.",
            labels=["model_id"],
        )
        for model, timed in sorted(seconds.items()):
            load_seconds.add_metric([model], count_value=int(timed[1]), sum_value=timed[0])
        models = GaugeMetricFamily(
            "orchgate_catalog_models", "Catalog models by status.", labels=["status"]
        )
        for status in ("loaded", "loading", "unloading", "unloaded", "needs_setup", "failed"):
            models.add_metric([status], statuses.get(status, 0))
        yield from (loads, unloads, load_seconds, models)


class Metrics:
    """The registry behind ``GET /metrics`` (its own, never prometheus_client's global)."""

    def __init__(self, state: GatewayState) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(GatewayCollector(state))

    def render(self) -> bytes:
        return generate_latest(self.registry)
