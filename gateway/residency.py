"""``Residency``: the one owner of which catalog models run -- models on demand.

Every model the catalog finds on disk (``backends.catalog``) that a recipe matches
(``policies.recipes``) becomes a pool that exists from the start but runs nothing
(``PoolRuntime(on_demand=True)``). Its admission queue calls back here when a request
finds it unloaded: the request waits in that queue (bounded by its capacity and timeout,
its wait estimate including the load time learnt from earlier loads) while this owner
loads the model -- a managed process on its own port, gated by the same health check and
warm-up as a reload (``lifecycle.transition.gate``).

Memory decides what runs at once (``policies.residency``): idle models are unloaded least
recently used first; a busy one is drained (its queue holds new requests, in-flight ones
finish) and then unloaded -- never cut mid-request. Models competing for the same memory
take turns in arrival order of their oldest waiting request, interactive before batch, so
a loaded model serves what queued for it before a later rival's first request, and two
models do not thrash. A failed load answers every waiter with a retriable 503 naming the
model and the reason, and backs off before the next try; a model that cannot fit even
alone answers 503 ``insufficient_memory`` with its breakdown.

All decisions are taken in one task (``_run``), woken by demand, by releases and once a
second (idle TTL); loads run one at a time.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import socket
import sys
import time
from collections import Counter, deque
from typing import Any

import msgspec

from backends.catalog import CatalogEntry, Discovery, Skipped, discover
from backends.hardware import HardwareProfile
from backends.llamacpp import LlamaCppReplicaConfig
from backends.openvino import OpenVINOReplicaConfig
from backends.registry import ReplicaConfig
from backends.vllm import VLLMReplicaConfig
from gateway.catalog_report import host_devices
from gateway.config import CatalogConfig, PoolConfig, TimeoutConfig
from gateway.errors import Conflict, InvalidRequest, LockedError, NotFound
from gateway.jobs import Job, JobBook
from gateway.lifecycle.transition import BringUpFailed, gate
from gateway.pools import PoolRuntime
from gateway.state import GatewayState
from gateway.webhooks import Webhooks
from policies.admission import InsufficientMemory, ModelUnavailable
from policies.fit import MIB, FitEstimate, estimate
from policies.recipes import (
    RecipeConfig,
    match_recipe,
    recipe_values,
    render,
    suggested_flags,
    with_override,
)
from policies.reservation import Locked, ReservationBook
from policies.residency import Resident, RoomPlan, Verdict, choose_device, plan_room
from policies.speed import estimate_speed

log = logging.getLogger("orchgate.residency")

_TICK_S = 1.0
_DRAIN_POLL_S = 0.05
_RESERVED_RAM = 2 * 1024 * MIB  # what the system and the gateway keep for themselves
_PORT_RANGE = (20000, 32000)  # below Linux's ephemeral range: outgoing connections never take it
_BACKOFF_MAX_S = 60.0
_DEFAULT_LOAD_S = 5.0  # the wait estimate before a model's first load was timed

ENGINE_CONFIGS: dict[str, type] = {
    "llamacpp": LlamaCppReplicaConfig,
    "vllm": VLLMReplicaConfig,
    "openvino": OpenVINOReplicaConfig,
}


class Status:
    LOADED = "loaded"
    LOADING = "loading"
    UNLOADING = "unloading"
    UNLOADED = "unloaded"
    NEEDS_SETUP = "needs_setup"
    FAILED = "failed"


class CatalogModel:
    """One model of the catalog and what runs it (``pool`` is None: ``needs_setup``)."""

    def __init__(self, entry: CatalogEntry, recipe: RecipeConfig | None, aliases: list[str]):
        self.entry = entry
        self.recipe = recipe
        self.aliases = aliases
        self.pool: PoolRuntime | None = None
        self.status = Status.UNLOADED if recipe is not None else Status.NEEDS_SETUP
        # a file whose header cannot be read is never launched: its requests get 503 at once
        self.error: str | None = entry.error
        if entry.error is not None and recipe is not None:
            self.status = Status.FAILED
        self.fit: FitEstimate | None = None
        self.speed_tokens_s: float | None = None  # estimated decode rate where it would run
        self.need_bytes = 0
        self.device: str | None = None  # where it runs (or loads)
        self.port = 0
        self.load_times: deque[float] = deque(maxlen=8)
        self.failures = 0
        self.retry_at = 0.0
        self.wanted: Job | None = None  # an admin load waiting for its turn
        self.job: Job | None = None  # the load or unload running now
        self.draining = False  # making room: no new grants, unloaded once idle
        self.unload_after_drain: Job | None = None

    @property
    def id(self) -> str:
        return self.entry.id

    @property
    def names(self) -> list[str]:
        return [self.entry.id, *self.aliases]

    def learnt_load_s(self) -> float:
        if not self.load_times:
            return _DEFAULT_LOAD_S
        return sorted(self.load_times)[len(self.load_times) // 2]

    def demand(self) -> tuple[bool, float] | None:
        """(interactive, arrival) of the oldest request or admin load that wants it."""
        waiting = self.pool.queue.oldest_waiter() if self.pool is not None else None
        if self.wanted is not None:
            admin = (True, self.wanted.phases[0][1])
            waiting = admin if waiting is None else min(waiting, admin, key=_precedence)
        return waiting


def _precedence(demand: tuple[bool, float]) -> tuple[bool, float]:
    interactive, arrived = demand
    return (not interactive, arrived)


class Residency:
    def __init__(
        self,
        state: GatewayState,
        catalog: CatalogConfig,
        *,
        webhooks: Webhooks,
        jobs: JobBook | None = None,
        hardware: HardwareProfile | None = None,
        reservations: ReservationBook | None = None,
        clock: Any = time.monotonic,
    ) -> None:
        self.state = state
        # the pools' swap locks (shared with gateway.lifecycle): a reserved model is never
        # unloaded, evicted or swapped out but by its holder
        self.reservations = reservations or ReservationBook()
        self.catalog = catalog
        self.webhooks = webhooks
        self.hardware = hardware
        self.clock = clock
        self.models: dict[str, CatalogModel] = {}
        self._by_pool: dict[str, CatalogModel] = {}  # pool id -> its model (model_fields)
        self.skipped: list[Skipped] = []
        self.jobs = jobs or JobBook()
        self.budgets = self._budgets()
        self.counts: Counter[tuple[str, str, str]] = Counter()  # (event, model, label)
        self.load_seconds: dict[str, list[float]] = {}  # model -> [sum, count]
        self.scanned_at = 0.0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._loading: asyncio.Task[None] | None = None
        state.catalog = self

    # -- discovery -----------------------------------------------------------------------
    async def start(self) -> None:
        await self.rescan()
        self._task = asyncio.create_task(self._run(), name="residency")

    async def rescan(self) -> dict[str, Any]:
        """Scan ``catalog.dirs`` again: new models become requestable; models gone from
        disk leave the catalog once they are not loaded."""
        found = await asyncio.to_thread(discover, self.catalog.dirs)
        added, removed = self._apply(found)
        self.scanned_at = time.time()
        log.info(
            "catalog: %s models (%s added, %s removed), %s skipped",
            len(self.models), len(added), len(removed), len(found.skipped),
        )  # fmt: skip
        for skipped in found.skipped:
            log.warning("catalog: skipped %s: %s", skipped.path, skipped.reason)
        return {"models": len(self.models), "added": added, "removed": removed,
                "skipped": [msgspec.structs.asdict(s) for s in self.skipped]}  # fmt: skip

    def _apply(self, found: Discovery) -> tuple[list[str], list[str]]:
        explicit = {
            name for pool in self.state.pools.values() if not pool.on_demand
            for name in pool.config.models
        }  # fmt: skip
        skipped = list(found.skipped)
        seen: set[str] = set()
        added: list[str] = []
        for entry in found.models:
            override = self.catalog.models.get(entry.id)
            aliases = list(override.aliases) if override is not None else []
            taken = [n for n in (entry.id, *aliases) if n in explicit or n in seen]
            if taken:
                skipped.append(Skipped(entry.path, f"name {taken[0]!r} is already served"))
                continue
            seen.update((entry.id, *aliases))
            current = self.models.get(entry.id)
            if current is not None and current.entry == entry:
                continue
            if current is not None and current.status not in (Status.UNLOADED, Status.NEEDS_SETUP,
                                                               Status.FAILED):  # fmt: skip
                continue  # changed on disk while it runs: picked up once unloaded
            recipe = match_recipe(entry, self.catalog.recipes)
            if recipe is not None:
                recipe = with_override(recipe, override)
            model = CatalogModel(entry, recipe, aliases)
            if current is not None and current.pool is not None:
                self._drop_pool(current)
            self._prepare(model)
            self.models[entry.id] = model
            added.append(entry.id)
        removed = [
            m.id for m in self.models.values()
            if m.id not in seen and m.status in (Status.UNLOADED, Status.NEEDS_SETUP, Status.FAILED)
        ]  # fmt: skip
        for model_id in removed:
            self._drop_pool(self.models.pop(model_id))
        self.skipped = skipped
        self.state.reindex()
        return added, removed

    def _prepare(self, model: CatalogModel) -> None:
        """Its memory estimate and its (parked) pool."""
        recipe, entry = model.recipe, model.entry
        if recipe is None:
            return
        device = "cuda" if recipe.device == "cuda" else "cpu"
        if entry.shape is not None:
            model.fit = estimate(
                entry.shape, context_tokens=recipe.ctx, parallel=recipe.slots,
                kv_type=recipe.kv_type, device=device,
            )  # fmt: skip
            model.need_bytes = model.fit.total_bytes
            model.speed_tokens_s = self._speed(model)
        else:  # unreadable metadata: the file's size, and a margin
            model.need_bytes = int(entry.size_bytes * 1.2)
        model.port = self._free_port(entry.id)
        pool = PoolRuntime(self._pool_config(model, gpu=None), on_demand=True)
        pool.queue.on_demand = lambda: self._demanded(model)
        pool.queue.startup_s = model.learnt_load_s()
        model.pool = pool
        self.state.pools[pool.id] = pool
        self._by_pool[pool.id] = model

    def _speed(self, model: CatalogModel) -> float | None:
        """Estimated decode rate on the first device of the recipe's kind (as ranked)."""
        recipe, shape, hardware = model.recipe, model.entry.shape, self.hardware
        if recipe is None or shape is None or hardware is None:
            return None
        kind = "cuda" if recipe.device == "cuda" else "cpu"
        device = next((d for d, _ in host_devices(hardware) if d.kind == kind), None)
        if device is None:
            return None
        estimate = estimate_speed(shape, device, recipe.engine, context=recipe.ctx)
        return estimate.decode_tokens_s or None

    def _drop_pool(self, model: CatalogModel) -> None:
        if model.pool is not None:
            self.state.pools.pop(model.pool.id, None)
            self._by_pool.pop(model.pool.id, None)
            model.pool.queue.fail_waiters(
                ModelUnavailable(f"model {model.id!r} left the catalog", retry_after_s=1.0)
            )
            model.pool = None

    def _pool_config(self, model: CatalogModel, gpu: int | None) -> PoolConfig:
        recipe = model.recipe
        assert recipe is not None
        host = "127.0.0.1"
        values = recipe_values(
            model.entry, recipe, host=host, port=model.port, gpu=gpu, python=sys.executable
        )
        # the adapter substitutes its own placeholders again: keep literal braces literal
        argv = [a.replace("{", "{{").replace("}", "}}") for a in render(recipe.launch, values)]
        replica_type = ENGINE_CONFIGS[recipe.engine]
        replica: ReplicaConfig = replica_type(
            id=_replica_id(model.id),
            url=f"http://{host}:{model.port}",
            launch=argv,
            gpu_device=gpu,
        )
        return PoolConfig(
            id=_pool_id(model.id),
            models=model.names,
            replicas=[replica],
            queue_capacity=self.catalog.queue_capacity,
            queue_timeout_s=self.catalog.queue_timeout_s,
            health_interval_s=2.0,
            reload_timeout_s=self.catalog.load_timeout_s,
            timeouts=TimeoutConfig(),
        )

    def _free_port(self, seed: str) -> int:
        """A free loopback port below the ephemeral range, stable per model id where it
        can be (the model keeps it across loads unless something took it)."""
        low, high = _PORT_RANGE
        taken = {m.port for m in self.models.values()}
        start = low + sum(seed.encode()) * 7919 % (high - low)
        for offset in range(high - low):
            port = low + (start - low + offset) % (high - low)
            if port not in taken and _port_free(port):
                return port
        raise RuntimeError("no free port for a catalog model")

    # -- memory --------------------------------------------------------------------------
    def _budgets(self) -> dict[str, int]:
        configured = {k: v * MIB for k, v in self.catalog.memory_mib.items()}
        budgets: dict[str, int] = {}
        hardware = self.hardware
        if "cpu" in configured:
            budgets["cpu"] = configured["cpu"]
        elif hardware is not None and hardware.cpu.ram_total_bytes:
            budgets["cpu"] = max(hardware.cpu.ram_total_bytes - _RESERVED_RAM, 0)
        else:
            budgets["cpu"] = 8 * 1024 * MIB
        for gpu in hardware.gpus if hardware is not None else []:
            budgets[f"cuda:{gpu.index}"] = gpu.vram_total_bytes
        budgets.update({k: v for k, v in configured.items() if k != "cpu"})
        return budgets

    def _residents(self, exclude: CatalogModel | None = None) -> list[Resident]:
        residents = []
        for m in self.models.values():
            if m is exclude or m.device is None or m.pool is None:
                continue
            queue = m.pool.queue
            residents.append(
                Resident(
                    model_id=m.id,
                    device=m.device,
                    bytes=m.need_bytes,
                    last_used=queue.last_used,
                    busy=queue.in_use() > 0 or queue.depth() > 0,
                    pinned=bool(m.recipe and m.recipe.pinned) or self._reserved(m),
                    loading=m.status in (Status.LOADING, Status.UNLOADING),
                )
            )
        return residents

    def _plan(self, model: CatalogModel, *, settled: bool = False) -> RoomPlan:
        """Room for ``model`` now; ``settled``: once every load and unload under way has
        finished (what decides whether it can ever fit)."""
        assert model.recipe is not None
        residents = self._residents(exclude=model)
        if settled:
            residents = [msgspec.structs.replace(r, loading=False) for r in residents]
        if model.recipe.device == "cuda":
            gpus = {k: v for k, v in self.budgets.items() if k.startswith("cuda:")}
            if not gpus:
                return RoomPlan(Verdict.IMPOSSIBLE, "", reason="the recipe wants a GPU; none found")
            return choose_device(
                model.need_bytes, gpus, residents, max_loaded=self.catalog.max_loaded
            )
        return plan_room(
            model.need_bytes, "cpu", self.budgets["cpu"], residents,
            max_loaded=self.catalog.max_loaded,
        )  # fmt: skip

    def breakdown(self, model: CatalogModel, plan: RoomPlan) -> dict[str, Any]:
        return {
            "model": model.id,
            "need_bytes": model.need_bytes,
            "estimate": model.fit.breakdown() if model.fit is not None else None,
            "budgets_bytes": self.budgets,
            "loaded": [
                {"model": r.model_id, "device": r.device, "bytes": r.bytes, "pinned": r.pinned}
                for r in self._residents(exclude=model)
            ],
            "reason": plan.reason,
        }

    # -- the request path's hook (synchronous: called inside AdmissionQueue.enqueue) ----
    def _demanded(self, model: CatalogModel) -> None:
        now = self.clock()
        if model.entry.error is not None:
            raise ModelUnavailable(
                f"model {model.id!r} cannot be loaded: {model.entry.error}", retry_after_s=60.0
            )
        if model.status == Status.FAILED and now < model.retry_at:
            raise ModelUnavailable(
                f"model {model.id!r} failed to load: {model.error}",
                retry_after_s=max(1.0, model.retry_at - now),
            )
        if model.status in (Status.UNLOADED, Status.FAILED) and model.recipe is not None:
            plan = self._plan(model, settled=True)
            if plan.verdict is Verdict.IMPOSSIBLE:
                raise InsufficientMemory(
                    f"model {model.id!r} cannot be loaded: {plan.reason}",
                    retry_after_s=30.0,
                    breakdown={"memory": self.breakdown(model, plan)},
                )
        self._wake.set()

    # -- the owner's loop ----------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            try:
                async with asyncio.timeout(_TICK_S):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                every = self.catalog.rescan_s
                if every > 0 and time.time() - self.scanned_at >= every:
                    await self.rescan()
                await self._step()
            except Exception:  # a bug must not stop models loading for ever
                log.exception("residency step failed")

    def wake(self) -> None:
        self._wake.set()

    async def _step(self) -> None:
        await self._unload_idle()
        await self._finish_drains()
        if self._loading is not None and not self._loading.done():
            return
        draining_for = await self._next_load()
        for model in self.models.values():  # a rival that went away: serve again
            if model.draining and model.id not in draining_for and model.unload_after_drain is None:
                model.draining = False
                assert model.pool is not None
                model.pool.queue.held = False
                model.pool.queue.pump()

    async def _next_load(self) -> set[str]:
        """Start the load the oldest demand wants, making room first; returns the models
        draining for it."""
        wanting = sorted(
            (m for m in self.models.values() if self._wants_load(m)),
            key=lambda m: _precedence(m.demand()),  # type: ignore[arg-type]
        )
        for model in wanting:
            plan = self._plan(model)
            if plan.verdict is Verdict.IMPOSSIBLE:
                if self._plan(model, settled=True).verdict is Verdict.IMPOSSIBLE:
                    self._refuse(model, plan)
                    continue
                return set()  # room comes once a load or unload under way is done
            for victim_id in plan.evict:
                await self._unload(self.models[victim_id], "evicted")
            draining = self._drain_for(model, plan.drain)
            if not plan.drain:
                self._begin_load(model, plan.device)
            return draining
        return set()

    def _drain_for(self, model: CatalogModel, victims: list[str]) -> set[str]:
        """Busy models that must make room: each keeps its turn while it has requests
        older than the rival's oldest, then takes no new ones and finishes what runs."""
        rival = model.demand()
        draining: set[str] = set()
        for victim_id in victims:
            victim = self.models[victim_id]
            own = victim.demand()
            if own is not None and rival is not None and _precedence(own) < _precedence(rival):
                continue
            draining.add(victim_id)
            if not victim.draining:
                log.info("model %s drains to make room for %s", victim_id, model.id)
                victim.draining = True
                assert victim.pool is not None
                victim.pool.queue.held = True
        return draining

    def _wants_load(self, model: CatalogModel) -> bool:
        if model.pool is None or model.status not in (Status.UNLOADED, Status.FAILED):
            return False
        if model.entry.error is not None:
            return False
        if model.status == Status.FAILED and self.clock() < model.retry_at:
            return False
        return model.demand() is not None

    def _refuse(self, model: CatalogModel, plan: RoomPlan) -> None:
        assert model.pool is not None
        error = InsufficientMemory(
            f"model {model.id!r} cannot be loaded: {plan.reason}",
            retry_after_s=30.0,
            breakdown={"memory": self.breakdown(model, plan)},
        )
        model.pool.queue.fail_waiters(error)
        if model.wanted is not None:
            model.wanted.fail(str(error))
            model.wanted = None

    async def _unload_idle(self) -> None:
        now = self.clock()
        for model in list(self.models.values()):
            if model.status != Status.LOADED or model.pool is None or model.draining:
                continue
            recipe = model.recipe
            assert recipe is not None
            ttl = recipe.idle_ttl_s if recipe.idle_ttl_s is not None else self.catalog.idle_ttl_s
            if recipe.pinned or ttl <= 0 or not model.pool.idle() or self._reserved(model):
                continue
            if now - model.pool.queue.last_used >= ttl:
                await self._unload(model, "idle")

    async def _finish_drains(self) -> None:
        for model in list(self.models.values()):
            if model.draining and model.pool is not None and model.pool.queue.in_use() == 0:
                job, model.unload_after_drain = model.unload_after_drain, None
                await self._unload(model, "api" if job is not None else "evicted", job)

    # -- load and unload -----------------------------------------------------------------
    def _begin_load(self, model: CatalogModel, device: str) -> None:
        job = model.wanted or self.jobs.create("load", model.id)
        model.wanted = None
        model.job = job
        model.status = Status.LOADING
        model.device = device
        self.state.reindex()
        self._loading = asyncio.create_task(self._load(model, job), name=f"load:{model.id}")

    async def _load(self, model: CatalogModel, job: Job) -> None:
        pool = model.pool
        assert pool is not None and model.recipe is not None
        started = self.clock()
        gpu = int(model.device.split(":")[1]) if model.device and ":" in model.device else None
        if not _port_free(model.port) or gpu != pool.config.replicas[0].gpu_device:
            if not _port_free(model.port):
                model.port = self._free_port(model.id + str(started))
            pool.rebind(self._pool_config(model, gpu))
        pool.queue.startup_s = model.learnt_load_s()
        job.advance("starting", device=model.device)
        log.info("loading model %s on %s (%s)", model.id, model.device, _mib(model.need_bytes))
        try:
            await gate(
                pool, self.catalog.load_timeout_s, job.advance, limit_name="catalog.load_timeout_s"
            )
        except (BringUpFailed, OSError) as exc:
            await self._load_failed(model, job, str(exc))
            return
        except asyncio.CancelledError:
            await pool.park("unloaded (shutdown)")
            raise
        seconds = self.clock() - started
        model.load_times.append(seconds)
        total = self.load_seconds.setdefault(model.id, [0.0, 0])
        total[0] += seconds
        total[1] += 1
        model.status, model.failures, model.error, model.job = Status.LOADED, 0, None, None
        pool.queue.startup_s = 0.0
        self.counts["load", model.id, "ok"] += 1
        job.advance("ready", load_ms=round(seconds * 1000, 1))
        self.state.reindex()
        pool.queue.pump()
        log.info("model %s loaded in %.2fs", model.id, seconds)
        self.webhooks.emit(
            "model_loaded",
            {"model": model.id, "device": model.device, "load_ms": job.result["load_ms"],
             "job": job.id},
        )  # fmt: skip
        self._wake.set()

    async def _load_failed(self, model: CatalogModel, job: Job, reason: str) -> None:
        assert model.pool is not None
        await model.pool.park(f"load failed: {reason}")
        model.failures += 1
        backoff = min(_BACKOFF_MAX_S, 2.0 ** (model.failures - 1))
        model.status, model.device, model.error, model.job = Status.FAILED, None, reason, None
        model.retry_at = self.clock() + backoff
        model.pool.queue.startup_s = model.learnt_load_s()
        self.counts["load", model.id, "failed"] += 1
        model.pool.queue.fail_waiters(
            ModelUnavailable(f"model {model.id!r} failed to load: {reason}", retry_after_s=backoff)
        )
        job.fail(reason)
        self.state.reindex()
        log.error("model %s failed to load (retry in %.0fs): %s", model.id, backoff, reason)
        self.webhooks.emit("model_load_failed", {"model": model.id, "error": reason,
                                                 "retry_in_s": backoff, "job": job.id})  # fmt: skip
        self._wake.set()

    async def _unload(self, model: CatalogModel, reason: str, job: Job | None = None) -> None:
        pool = model.pool
        assert pool is not None
        job = job or self.jobs.create("unload", model.id)
        model.job = job
        model.status = Status.UNLOADING
        job.advance("unloading", reason=reason)
        self.state.reindex()
        await pool.park(f"unloaded ({reason})")
        pool.queue.held = False
        model.draining = False
        model.status, model.device, model.job = Status.UNLOADED, None, None
        pool.queue.startup_s = model.learnt_load_s()
        self.counts["unload", model.id, reason] += 1
        job.advance("unloaded")
        self.state.reindex()
        log.info("model %s unloaded (%s)", model.id, reason)
        self.webhooks.emit("model_unloaded", {"model": model.id, "reason": reason, "job": job.id})
        self._wake.set()  # its waiters (if any) now compete for memory again

    # -- the admin API -------------------------------------------------------------------
    def model(self, model_id: str) -> CatalogModel:
        model = self.models.get(model_id) or next(
            (m for m in self.models.values() if model_id in m.aliases), None
        )
        if model is None:
            raise NotFound(f"no catalog model {model_id!r}", param="model")
        return model

    def request_load(self, model_id: str) -> Job:
        model = self.model(model_id)
        if model.recipe is None:
            raise Conflict(f"model {model.id!r} needs setup: no [[catalog.recipes]] matches it")
        if model.entry.error is not None:
            raise Conflict(f"model {model.id!r} cannot be loaded: {model.entry.error}")
        if model.job is not None and model.job.kind == "load":
            return model.job
        if model.wanted is not None:
            return model.wanted
        job = self.jobs.create("load", model.id)
        if model.status == Status.LOADED:
            job.advance("ready", already=True)
            return job
        plan = self._plan(model, settled=True)
        if plan.verdict is Verdict.IMPOSSIBLE:
            job.fail(f"cannot be loaded: {plan.reason}")
            return job
        model.wanted = job
        model.failures, model.retry_at = 0, 0.0  # an operator asking again: no backoff
        self._wake.set()
        return job

    def request_swap(self, out_id: str, in_id: str, token: str | None = None) -> Job:
        """Unload ``out_id`` (draining it) and load ``in_id``: the load's job, which waits
        for the room the unload frees when both do not fit."""
        if out_id == in_id:
            raise InvalidRequest("a model cannot replace itself", param="replace")
        self.model(in_id)  # both must exist before anything changes
        self.request_unload(out_id, token)
        return self.request_load(in_id)

    def _reserved(self, model: CatalogModel) -> bool:
        return model.pool is not None and self.reservations.get(model.pool.id) is not None

    def _check_reservation(self, model: CatalogModel, token: str | None) -> None:
        if model.pool is None:
            return
        try:
            self.reservations.check(model.pool.id, token)
        except Locked as exc:
            raise LockedError(
                str(exc), extra={"reservation": exc.reservation.view(self.reservations.now())}
            ) from None

    def request_unload(self, model_id: str, token: str | None = None) -> Job:
        model = self.model(model_id)
        self._check_reservation(model, token)
        job = self.jobs.create("unload", model.id)
        if model.status in (Status.UNLOADED, Status.NEEDS_SETUP, Status.FAILED):
            job.advance("unloaded", already=True)
            return job
        if model.wanted is not None:
            model.wanted.fail("unloaded by request before it loaded")
            model.wanted = None
        assert model.pool is not None
        model.draining = True  # in-flight requests finish; queued ones wait for a reload
        model.pool.queue.held = True
        model.unload_after_drain = job
        job.advance("draining")
        self._wake.set()
        return job

    # -- what clients see ----------------------------------------------------------------
    def model_fields(self, pool_id: str) -> dict[str, Any] | None:
        """Extra fields of a catalog model in ``/v1/models`` (None: an explicit pool)."""
        model = self._by_pool.get(pool_id)
        return None if model is None else self.describe(model, brief=True)

    def unroutable(self) -> list[dict[str, Any]]:
        """Catalog models no request can reach (``needs_setup``), for ``/v1/models``."""
        return [
            {"id": m.id, "object": "model", "created": int(self.scanned_at), "owned_by": "orchgate",
             **self.describe(m, brief=True)}
            for m in self.models.values() if m.pool is None
        ]  # fmt: skip

    def explain(self, name: str) -> str | None:
        """Why a name the catalog knows cannot be served, for the 404 a request gets."""
        model = self.models.get(name)
        if model is not None and model.recipe is None:
            return (
                f"model {name!r} is on disk ({model.entry.path}) but needs setup: no "
                "[[catalog.recipes]] matches it; see GET /v1/catalog for suggested flags"
            )
        return None

    def describe(self, model: CatalogModel, *, brief: bool = False) -> dict[str, Any]:
        shape = model.entry.shape
        fields: dict[str, Any] = {
            "status": model.status,
            "pool": model.pool.id if model.pool is not None else None,
            "format": model.entry.format,
            "size_bytes": model.entry.size_bytes,
            "context_length": model.recipe.ctx if model.recipe is not None else
            (shape.context_train if shape is not None else None),
            "capabilities": model.entry.capabilities(),
        }  # fmt: skip
        if brief:
            return fields
        fields.update(
            id=model.id,
            aliases=model.aliases,
            path=model.entry.path,
            engine=model.recipe.engine if model.recipe is not None else None,
            architecture=shape.architecture if shape is not None else None,
            params=shape.params if shape is not None else None,
            quant=shape.quant if shape is not None else None,
            context_train=shape.context_train if shape is not None else None,
            shards=model.entry.shards,
            metadata_error=model.entry.error,
            memory=model.fit.breakdown() if model.fit is not None else None,
            need_bytes=model.need_bytes,
            device=model.device,
            pinned=bool(model.recipe and model.recipe.pinned),
            error=model.error,
            load_s_learnt=round(model.learnt_load_s(), 3) if model.load_times else None,
            queued=model.pool.queue.depth() if model.pool is not None else 0,
            running=model.pool.queue.in_use() if model.pool is not None else 0,
            job=model.job.id if model.job is not None else None,
            suggested_launch=suggested_flags(model.entry) if model.recipe is None else None,
        )
        return fields

    def menu(self) -> list[dict[str, Any]]:
        """The status page's model menu: no file paths (the data token reads it)."""
        rows = []
        for m in self.models.values():
            job = m.job or m.wanted or m.unload_after_drain
            rows.append({
                "id": m.id, "status": m.status, "pool": m.pool.id if m.pool else None,
                "size_bytes": m.entry.size_bytes, "need_bytes": m.need_bytes,
                "device": m.device, "speed_tokens_s": m.speed_tokens_s,
                "pinned": bool(m.recipe and m.recipe.pinned), "error": m.error,
                "queued": m.pool.queue.depth() if m.pool else 0,
                "running": m.pool.queue.in_use() if m.pool else 0,
                "job": job.view() if job is not None else None,
                "reservation": self._reservation_view(m),
                "fit": self._fit_view(m),
                "suggested_launch": suggested_flags(m.entry) if m.recipe is None else None,
            })  # fmt: skip
        return rows

    def _fit_view(self, model: CatalogModel) -> dict[str, Any] | None:
        """Whether it fits this host now (``room``: what would be unloaded for it)."""
        if model.recipe is None or model.status == Status.LOADED:
            return None
        plan = self._plan(model, settled=True)
        if plan.verdict is Verdict.IMPOSSIBLE:
            return {"fits": False, "why": plan.reason}
        return {"fits": True, "device": plan.device, "unloads": [*plan.evict, *plan.drain]}

    def _reservation_view(self, model: CatalogModel) -> dict[str, object] | None:
        held = self.reservations.get(model.pool.id) if model.pool is not None else None
        return held.view(self.reservations.now()) if held is not None else None

    def view(self) -> dict[str, Any]:
        return {
            "object": "catalog",
            "dirs": self.catalog.dirs,
            "scanned_at": round(self.scanned_at, 3),
            "budgets_bytes": self.budgets,
            "models": [self.describe(m) for m in self.models.values()],
            "skipped": [msgspec.structs.asdict(s) for s in self.skipped],
        }

    def model_states(self) -> dict[str, str]:
        """``model_state`` keeps SPEC.md's two states: ``Active`` while loaded, else
        ``Retired`` (the catalog's own status is in ``/v1/models``)."""
        return {
            m.id: "Active" if m.status == Status.LOADED else "Retired" for m in self.models.values()
        }

    def metric_counts(
        self,
    ) -> tuple[Counter[tuple[str, str, str]], dict[str, list[float]], Counter[str]]:
        """(loads and unloads by model and result/reason, load seconds [sum, count] by
        model, models by status), for the extended metrics."""
        statuses = Counter(m.status for m in self.models.values())
        return self.counts, self.load_seconds, statuses

    async def aclose(self) -> None:
        for task in (self._task, self._loading):
            if task is not None:
                task.cancel()
        await asyncio.gather(
            *(t for t in (self._task, self._loading) if t is not None), return_exceptions=True
        )


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pool_id(model_id: str) -> str:
    return _replica_id(model_id)


def _replica_id(model_id: str) -> str:
    """A pool / replica id (``[A-Za-z0-9_.-]``, at most 64) that names the model."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", model_id).strip("-")
    if len(safe) <= 64 and safe == model_id:
        return safe
    digest = hashlib.sha1(model_id.encode()).hexdigest()[:8]
    return f"{safe[:55]}-{digest}"


def _mib(n: int) -> str:
    return f"{n / MIB:,.0f} MiB"
