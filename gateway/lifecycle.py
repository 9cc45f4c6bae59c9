"""Model lifecycle: atomic pool reloads with rollback, and reloads of the whole config file.

A reload is blue-green. For every pool it changes, a new ``PoolRuntime`` is built beside
the running one: its managed replicas are launched (on a free port when the configured
one is still held by the set being replaced), and it must pass two gates -- every replica
healthy by its engine's own probe, and a one-token warm-up request for the pool's model
answered -- within ``reload_timeout_s``. Only then is routing switched, for all changed
pools at once and without an await in between, so each request sees either the old pool
or the new one. Requests already queued or running on the old set finish there; then the
old set is stopped ("retired"). Any failure before the switch stops the new set and leaves
the old one exactly as it was, serving throughout: no user request fails.

Before anything starts, replicas that name a ``gpu_device`` and a ``model_path`` are
checked against the GPU's free VRAM (``policies.fit``); a set that cannot fit is refused
with the breakdown. Pools reserved through ``policies.reservation`` are reloaded only with
the holder's token. Each outcome is sent to the webhooks (``swap_complete`` /
``swap_failed``) in the background.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from backends.base import Endpoint, Limits, Strict, UpstreamCall
from backends.errors import BackendError, BackendRejected
from backends.gpu import Nvml
from backends.model_file import ModelFileError, read_model
from backends.openai_compat import replica_root
from backends.registry import ReplicaConfig
from gateway.auth import TokenCheck
from gateway.config import (
    Config,
    ConfigError,
    ModelNames,
    PoolConfig,
    Replicas,
    load_config,
    validate,
)
from gateway.errors import (
    Conflict,
    InvalidConfigError,
    LockedError,
    NotFound,
    ReloadFailedError,
)
from gateway.metrics import ReplicaLatency
from gateway.state import GatewayState, PoolRuntime
from gateway.webhooks import Webhooks
from policies.admission import PoolClosed
from policies.fit import FitEstimate, estimate, launch_settings
from policies.replicas import Counters, ReplicaState
from policies.reservation import Locked, ReservationBook

log = logging.getLogger("orchgate.lifecycle")

DEFAULT_VARIANT = "default"
_GATE_POLL_S = 0.1
_RETIRE_POLL_S = 0.05


class ReloadRequest(Strict):
    """``POST /v1/pools/{id}/reload`` body. Empty: the pool as the config file defines it
    now. ``variant``: one of the pool's ``[[pools.variants]]`` (or ``"default"``).
    Otherwise ``models`` / ``replicas`` / ``max_context_tokens`` replace the running ones."""

    variant: str | None = None
    models: ModelNames | None = None
    replicas: Replicas | None = None
    max_context_tokens: Annotated[int, Meta(ge=1)] | None = None

    def is_empty(self) -> bool:
        return self.variant is None and self.models is None and self.replicas is None


class InsufficientMemory(Conflict):
    code = "insufficient_vram"


class _BringUpFailed(Exception):
    pass


class _Change:
    """One pool's part of a reload: ``target`` None removes the pool."""

    __slots__ = ("carried", "failed", "new", "old", "pool_id", "switched", "target", "variant")

    def __init__(
        self, pool_id: str, old: PoolRuntime | None, target: PoolConfig | None, variant: str
    ) -> None:
        self.pool_id = pool_id
        self.old = old
        self.target = target
        self.variant = variant
        self.new: PoolRuntime | None = None
        self.switched = False
        self.failed: asyncio.Future[str] | None = None
        self.carried: list[tuple[ReplicaState, Counters]] = []


class Lifecycle:
    """The one owner of reloads: at most one runs at a time (a second gets 409)."""

    def __init__(
        self,
        state: GatewayState,
        *,
        auth: TokenCheck,
        webhooks: Webhooks,
        reservations: ReservationBook,
        config_path: Path | None = None,
        free_vram: Callable[[int], tuple[int, int] | None] | None = None,
    ) -> None:
        self.state = state
        self.auth = auth
        self.webhooks = webhooks
        self.reservations = reservations
        self.config_path = config_path
        self.file_config = state.config  # as last read from the file (or the startup config)
        self._free_vram = free_vram or self._nvml_free_vram
        self._lock = asyncio.Lock()
        self._retire_tasks: set[asyncio.Task[None]] = set()
        self._starting: set[PoolRuntime] = set()  # new sets not switched to yet
        self.progress: dict[str, dict[str, Any]] = {}  # per pool: the last reload, for /v1/status

    # -- pool reload ---------------------------------------------------------------------
    async def reload_pool(
        self, pool_id: str, request: ReloadRequest | None, token: str | None, trigger: str = "api"
    ) -> dict[str, Any]:
        pool = self.state.pools.get(pool_id)
        if pool is None:
            raise NotFound(f"no pool {pool_id!r}", param="pool_id")
        self._check_reservation(pool_id, token)
        request = request or ReloadRequest()
        async with self._exclusive():
            target, variant = await self._target(pool, request)
            config = self._running_config_with(target)
            results = await self._apply([_Change(pool_id, pool, target, variant)], config, trigger)
            if request.is_empty():  # this pool now runs as the file says: a later whole-file
                pools = [target if p.id == pool_id else p for p in self.file_config.pools]
                self.file_config = msgspec.structs.replace(self.file_config, pools=pools)
            return results[pool_id]

    async def _target(self, pool: PoolRuntime, request: ReloadRequest) -> tuple[PoolConfig, str]:
        if request.variant is not None:
            if request.models is not None or request.replicas is not None:
                raise InvalidConfigError("give either 'variant' or 'models'/'replicas', not both")
            return self._variant(pool, request.variant)
        if request.is_empty():
            return await self._from_file(pool.id), DEFAULT_VARIANT
        target = msgspec.structs.replace(
            pool.config,
            models=request.models or pool.config.models,
            replicas=request.replicas or pool.config.replicas,
            max_context_tokens=request.max_context_tokens or pool.config.max_context_tokens,
        )
        return target, "custom"

    def _variant(self, pool: PoolRuntime, name: str) -> tuple[PoolConfig, str]:
        default = self._file_pool(pool.id) or pool.config
        if name == DEFAULT_VARIANT:
            return default, DEFAULT_VARIANT
        for variant in default.variants:
            if variant.id == name:
                target = msgspec.structs.replace(
                    default,
                    models=variant.models or default.models,
                    replicas=variant.replicas,
                    max_context_tokens=variant.max_context_tokens or default.max_context_tokens,
                )
                return target, name
        choices = ", ".join([DEFAULT_VARIANT, *(v.id for v in default.variants)])
        raise NotFound(
            f"pool {pool.id!r} has no variant {name!r} (it has: {choices})", param="variant"
        )

    def _file_pool(self, pool_id: str) -> PoolConfig | None:
        return next((p for p in self.file_config.pools if p.id == pool_id), None)

    async def _from_file(self, pool_id: str) -> PoolConfig:
        """The pool as the config file defines it now (the startup config without a file)."""
        if self.config_path is not None:
            fresh = await self._read_file()
            found = next((p for p in fresh.pools if p.id == pool_id), None)
            if found is None:
                raise InvalidConfigError(
                    f"{self.config_path} no longer defines pool {pool_id!r}; reload the whole "
                    "config (POST /v1/config/reload) to remove it"
                )
            return found
        found = self._file_pool(pool_id)
        assert found is not None  # every running pool came from the startup config
        return found

    async def _read_file(self) -> Config:
        assert self.config_path is not None
        try:
            return await asyncio.to_thread(load_config, self.config_path)
        except ConfigError as exc:
            raise InvalidConfigError(f"not applied: {exc}") from None

    def _running_config_with(self, target: PoolConfig) -> Config:
        pools = [target if p.id == target.id else p.config for p in self.state.pools.values()]
        config = msgspec.structs.replace(self.state.config, pools=pools)
        try:
            validate(config)
        except ConfigError as exc:
            raise InvalidConfigError(f"not applied: {exc}") from None
        return config

    # -- whole config file ---------------------------------------------------------------
    async def reload_config(self, token: str | None = None, trigger: str = "api") -> dict[str, Any]:
        """Re-read the config file: validate it whole first, then reload the pools whose
        definition changed, start added ones and retire removed ones -- all switched at
        once. Pools whose definition did not change keep running as they are (a variant
        stays). ``auth`` and ``webhooks`` apply live; ``server``, ``tasks`` and
        ``metrics`` changes are reported as needing a restart."""
        if self.config_path is None:
            raise Conflict("the gateway was started without --config: there is no file to re-read")
        async with self._exclusive():
            fresh = await self._read_file()
            changes, outcome = self._plan(fresh)
            for change in changes:
                if change.old is not None:
                    self._check_reservation(change.pool_id, token)
            restart = [
                key for key in ("server", "tasks", "metrics")
                if getattr(self.file_config, key) != getattr(fresh, key)
            ]  # fmt: skip
            pools = [
                self.state.pools[p.id].config if outcome[p.id] == "unchanged" else p
                for p in fresh.pools
            ]
            running_config = msgspec.structs.replace(
                fresh,
                pools=pools,
                server=self.state.config.server,
                tasks=self.state.config.tasks,
                metrics=self.state.config.metrics,
            )
            try:
                validate(running_config)
            except ConfigError as exc:
                raise InvalidConfigError(f"not applied: {exc}") from None
            results = await self._apply(changes, running_config, trigger) if changes else {}
            self.state.config = running_config
            self.auth.set_token(fresh.auth.token)
            self.webhooks.configure(fresh.webhooks)
            self.file_config = fresh
            if restart:
                log.warning("config reloaded; changes to %s apply after a restart", restart)
            return {
                "status": "reloaded",
                "pools": outcome,
                "results": results,
                "restart_required": restart,
            }

    def _plan(self, fresh: Config) -> tuple[list[_Change], dict[str, str]]:
        """What a re-read file changes, pool by pool, against the file as last applied."""
        before = {p.id: p for p in self.file_config.pools}
        after = {p.id: p for p in fresh.pools}
        changes: list[_Change] = []
        outcome: dict[str, str] = {}
        for pool_id, pool_config in after.items():
            running = self.state.pools.get(pool_id)
            if running is None:
                changes.append(_Change(pool_id, None, pool_config, DEFAULT_VARIANT))
                outcome[pool_id] = "added"
            elif before.get(pool_id) != pool_config:
                changes.append(_Change(pool_id, running, pool_config, DEFAULT_VARIANT))
                outcome[pool_id] = "reloaded"
            else:
                outcome[pool_id] = "unchanged"
        for pool_id, running in self.state.pools.items():
            if pool_id not in after:
                changes.append(_Change(pool_id, running, None, DEFAULT_VARIANT))
                outcome[pool_id] = "removed"
        return changes, outcome

    # -- the transition ------------------------------------------------------------------
    async def _apply(
        self, changes: list[_Change], config: Config, trigger: str
    ) -> dict[str, dict[str, Any]]:
        started = time.monotonic()
        self._relocate_ports(changes)
        warnings = await self._check_fit(changes)
        log.info(
            "reload (%s): starting %s",
            trigger,
            ", ".join(f"{c.pool_id} -> {c.variant}" for c in changes if c.target is not None)
            or "nothing (removals only)",
        )
        for change in changes:
            if change.target is not None:
                self._progress(change, "starting", trigger=trigger, started=started)
        starting = [c for c in changes if c.target is not None]
        outcomes = await asyncio.gather(
            *(self._bring_up(c) for c in starting), return_exceptions=True
        )
        if any(isinstance(o, BaseException) for o in outcomes):
            await self._roll_back(
                changes, list(zip(starting, outcomes, strict=True)), trigger, started
            )
        self._switch(changes, config)
        duration_ms = round((time.monotonic() - started) * 1000, 1)
        results = {}
        for change in changes:
            results[change.pool_id] = self._result(change, duration_ms, warnings)
            if change.target is not None:
                self._progress(change, "swapped", duration_ms=duration_ms)
            self.webhooks.emit("swap_complete", self._event(change, trigger, duration_ms))
            log.info(
                "pool %s %s in %.0f ms (%s)",
                change.pool_id,
                "removed" if change.target is None else f"now serves {change.variant}",
                duration_ms,
                trigger,
            )
        return results

    async def _bring_up(self, change: _Change) -> None:
        """Launch, health gate, warm-up; bounded as a whole by ``reload_timeout_s``."""
        assert change.target is not None
        limit = change.target.reload_timeout_s
        try:
            async with asyncio.timeout(limit + 5.0):  # backstop: each step has its own limit
                await self._gate(change)
        except TimeoutError:
            raise _BringUpFailed(f"not serving within reload_timeout_s={limit:g}") from None
        log.info("pool %s: new replica set is healthy and serving", change.pool_id)

    async def _gate(self, change: _Change) -> None:
        assert change.target is not None
        loop = asyncio.get_running_loop()
        new = change.new = PoolRuntime(change.target, change.variant)
        self._starting.add(new)
        failed = change.failed = loop.create_future()

        def on_exit(replica: ReplicaState, code: int) -> None:
            if change.switched or failed.done():
                return
            process = next((p for p in new.processes if p.name == replica.replica_id), None)
            output = process.last_output() if process is not None else ""
            failed.set_result(
                f"replica {replica.replica_id} exited with code {code} while starting"
                + (f": {output}" if output else "")
            )

        try:
            await new.start(on_exit)
        except OSError as exc:
            raise _BringUpFailed(f"a replica could not be launched: {exc}") from None
        deadline = loop.time() + change.target.reload_timeout_s
        self._progress(change, "loading")
        while not all(r.ready for r in new.replicas):
            if failed.done():
                raise _BringUpFailed(failed.result())
            if loop.time() > deadline:
                waiting = "; ".join(
                    f"{r.replica_id}: {r.detail or 'not ready'}"
                    for r in new.replicas
                    if not r.ready
                )
                raise _BringUpFailed(
                    f"not healthy within reload_timeout_s={change.target.reload_timeout_s:g}: "
                    + waiting
                )
            await asyncio.wait({failed}, timeout=_GATE_POLL_S)
        self._progress(change, "warming_up")
        for replica in new.replicas:
            await self._warm_up(new, replica, deadline, failed)

    async def _warm_up(
        self, pool: PoolRuntime, replica: ReplicaState, deadline: float, failed: asyncio.Future[str]
    ) -> None:
        """The model is really served: a one-token request, as a client would send it. An
        engine that refuses one route (an embedding model has no chat) is asked the next."""
        model = pool.upstream_model[replica.replica_id]
        bodies = {
            Endpoint.CHAT: {
                "model": model,
                "messages": [{"role": "user", "content": "Hello"}],
                "max_tokens": 1,
            },
            Endpoint.COMPLETIONS: {"model": model, "prompt": "Hello", "max_tokens": 1},
            Endpoint.EMBEDDINGS: {"model": model, "input": "Hello"},
        }
        refusal = "it serves none of chat, completions, embeddings"
        for endpoint, body in bodies.items():
            if endpoint not in replica.backend.endpoints:
                continue
            call = UpstreamCall(
                endpoint,
                msgspec.json.encode(body),
                stream=False,
                request_id=f"reload-{replica.replica_id}",
            )
            try:
                response = await replica.backend.send(call, Limits(deadline=deadline))
                try:
                    await response.read()
                finally:
                    await response.aclose()
                return
            except BackendRejected as exc:
                refusal = f"{endpoint.value}: {exc.message}"
            except BackendError as exc:
                if failed.done():  # the process died under the request: its words say more
                    raise _BringUpFailed(failed.result()) from None
                refusal = exc.message
                break
        raise _BringUpFailed(
            f"replica {replica.replica_id} is healthy but did not serve model {model!r}: {refusal}"
        )

    async def _roll_back(
        self,
        changes: list[_Change],
        outcomes: list[tuple[_Change, object]],
        trigger: str,
        started: float,
    ) -> None:
        """Stop every new set; the old ones never stopped serving."""
        await asyncio.gather(*(c.new.stop() for c in changes if c.new is not None))
        self._starting.difference_update(c.new for c in changes)
        duration_ms = round((time.monotonic() - started) * 1000, 1)
        reasons = []
        failed_pools = {}
        for change, outcome in outcomes:
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, _BringUpFailed):
                    log.error("reload failed unexpectedly", exc_info=outcome)
                reason = str(outcome) or type(outcome).__name__
                reasons.append(f"pool {change.pool_id}: {reason}")
            else:
                reason = "not applied: another pool of the same reload failed"
            failed_pools[change.pool_id] = reason
            self._progress(change, "failed", error=reason, duration_ms=duration_ms)
            event = self._event(change, trigger, duration_ms)
            self.webhooks.emit("swap_failed", {**event, "error": reason, "rolled_back": True})
        log.warning("reload rolled back after %.0f ms: %s", duration_ms, "; ".join(reasons))
        raise ReloadFailedError(
            "reload failed and was rolled back; the previous replicas kept serving: "
            + "; ".join(reasons),
            extra={"rolled_back": True, "pools": failed_pools, "duration_ms": duration_ms},
        )

    def _switch(self, changes: list[_Change], config: Config) -> None:
        """Atomic for the data plane: no await from the first assignment to the last."""
        state = self.state
        for change in changes:
            old, new = change.old, change.new
            if new is not None:
                self._starting.discard(new)
                change.switched = True
                if old is not None:
                    _carry_counters(change, old, new)
                state.pools[change.pool_id] = new
                if config.metrics.extended:
                    for replica in new.replicas:
                        state.latency.setdefault(replica.replica_id, ReplicaLatency())
            else:
                del state.pools[change.pool_id]
        if any(c.new is None for c in changes):  # keep the config file's pool order
            order = [p.id for p in config.pools]
            state.pools = {pool_id: state.pools[pool_id] for pool_id in order}
        state.config = config
        state.reindex()
        self._mark_retired_models(changes)
        for change in changes:
            if change.old is not None:
                state.retiring.append(change.old)
                task = asyncio.create_task(self._retire(change), name=f"retire:{change.pool_id}")
                self._retire_tasks.add(task)
                task.add_done_callback(self._retire_tasks.discard)

    def _mark_retired_models(self, changes: list[_Change]) -> None:
        """A replaced pool's model that no pool serves any more is ``Retired``; a model a
        reload brings back is ``Active`` again."""
        active = set(self.state.models.names())
        now = time.time()
        for change in changes:
            if change.old is not None and change.old.canonical not in active:
                self.state.retired_models[change.old.canonical] = now
        for name in active:
            self.state.retired_models.pop(name, None)

    async def _retire(self, change: _Change) -> None:
        """Let the old set finish what it holds (at most the pool's ``total_s``), then stop."""
        old = change.old
        assert old is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + old.config.timeouts.total_s
        try:
            while not old.idle() and loop.time() < deadline:
                await asyncio.sleep(_RETIRE_POLL_S)
            old.queue.close(PoolClosed("the pool was reloaded; retry", retry_after_s=1.0))
            if not old.idle():
                log.warning("pool %s: ending requests still on the retired set", change.pool_id)
                for replica in old.replicas:
                    replica.backend.interrupt("the pool was reloaded")
            current = self.state.pools.get(change.pool_id)
            for replica, at_switch in change.carried:
                heir = _same_replica(current, replica.replica_id)
                if heir is not None:
                    heir.add_counters(replica.counters().since(at_switch))
        finally:
            await old.stop()
            if old in self.state.retiring:
                self.state.retiring.remove(old)
            log.info("pool %s: previous replica set retired", change.pool_id)

    # -- checks before anything starts ---------------------------------------------------
    def _check_reservation(self, pool_id: str, token: str | None) -> None:
        try:
            self.reservations.check(pool_id, token)
        except Locked as exc:
            raise LockedError(
                str(exc),
                extra={"reservation": exc.reservation.view(self.reservations.now())},
            ) from None

    def _relocate_ports(self, changes: list[_Change]) -> None:
        """A managed replica whose address the running (or retiring) sets still hold is
        launched on a free port instead: both sets must run side by side until the switch."""
        held = {
            _address(replica.backend.root)  # type: ignore[attr-defined]
            for pool in [*self.state.pools.values(), *self.state.retiring]
            for replica in pool.replicas
        }
        for change in changes:
            if change.target is None:
                continue
            replicas = []
            for replica in change.target.replicas:
                host, port = _address(replica_root(replica.url))
                if replica.launch is not None and (host, port) in held:
                    free = _free_port(host)
                    url = replica.url.replace(f":{port}", f":{free}", 1)
                    log.info(
                        "replica %s: %s:%s is in use; launching on port %s",
                        replica.id,
                        host,
                        port,
                        free,
                    )
                    replica = msgspec.structs.replace(replica, url=url)
                held.add(_address(replica_root(replica.url)))
                replicas.append(replica)
            change.target = msgspec.structs.replace(change.target, replicas=replicas)

    async def _check_fit(self, changes: list[_Change]) -> list[str]:
        """Refuse a set that cannot fit in its GPUs' free VRAM; returns warnings for what
        could not be checked."""
        warnings: list[str] = []
        needs: dict[int, list[tuple[str, FitEstimate, float | None]]] = {}
        for change in changes:
            for replica in change.target.replicas if change.target is not None else []:
                if replica.gpu_device is None or replica.model_path is None:
                    continue
                try:
                    shape = await asyncio.to_thread(read_model, replica.model_path)
                except ModelFileError as exc:
                    warnings.append(f"replica {replica.id}: fit not checked: {exc}")
                    continue
                fit, utilisation = _replica_estimate(replica, shape)
                needs.setdefault(replica.gpu_device, []).append((replica.id, fit, utilisation))
        for device, wanted in needs.items():
            sample = await asyncio.to_thread(self._free_vram, device)
            if sample is None:
                warnings.append(f"GPU {device}: free VRAM unknown (no NVML); fit not checked")
                continue
            free, total = sample
            required = sum(
                max(fit.total_bytes, int(util * total)) if util else fit.total_bytes
                for _, fit, util in wanted
            )
            if required > free:
                lines = "; ".join(f"{rid}: {fit.describe()}" for rid, fit, _ in wanted)
                raise InsufficientMemory(
                    f"the new replicas need {required / 2**20:,.0f} MiB on GPU {device}, which has "
                    f"{free / 2**20:,.0f} MiB free; nothing was changed. {lines}",
                    extra={
                        "fit": {
                            "device": device,
                            "free_bytes": free,
                            "required_bytes": required,
                            "replicas": {rid: fit.breakdown() for rid, fit, _ in wanted},
                        }
                    },
                )
        return warnings

    def _nvml_free_vram(self, device: int) -> tuple[int, int] | None:
        nvml = (
            self.state.nvml if self.state.nvml is not None and self.state.nvml.available else None
        )
        own = nvml is None
        nvml = nvml or Nvml()
        try:
            sample = nvml.sample(device)
        finally:
            if own:
                nvml.close()
        return None if sample is None else (sample.vram_free_bytes, sample.vram_total_bytes)

    # -- bookkeeping ---------------------------------------------------------------------
    def _exclusive(self) -> asyncio.Lock:
        if self._lock.locked():
            raise Conflict("a reload is already in progress; try again when it has finished")
        return self._lock

    def _progress(self, change: _Change, phase: str, **fields: Any) -> None:
        record = self.progress.setdefault(change.pool_id, {})
        if phase == "starting":
            record.clear()
            assert change.target is not None
            record.update(
                variant=change.variant,
                models=change.target.models,
                started_at=round(time.time(), 3),
                trigger=fields.pop("trigger"),
            )
            fields.pop("started", None)
        record["state"] = phase
        record.update(fields)

    def _result(self, change: _Change, duration_ms: float, warnings: list[str]) -> dict[str, Any]:
        old = change.old
        result: dict[str, Any] = {
            "pool": change.pool_id,
            "status": "removed" if change.new is None else "swapped",
            "duration_ms": duration_ms,
            "previous": None
            if old is None
            else {"variant": old.variant, "models": old.config.models},
            "warnings": warnings,
        }
        if change.new is not None:
            result.update(
                variant=change.new.variant,
                models=change.new.config.models,
                replicas=[
                    {"id": r.replica_id, "url": r.backend.root, "ready": r.ready}  # type: ignore[attr-defined]
                    for r in change.new.replicas
                ],
            )
        if old is not None:
            result["retiring"] = {"running": old.queue.in_use(), "queued": old.queue.depth()}
        return result

    @staticmethod
    def _event(change: _Change, trigger: str, duration_ms: float) -> dict[str, Any]:
        target = change.target
        old = change.old
        return {
            "pool_id": change.pool_id,
            "variant": change.variant if target is not None else None,
            "models": target.models if target is not None else [],
            "previous": None
            if old is None
            else {"variant": old.variant, "models": old.config.models},
            "trigger": trigger,
            "duration_ms": duration_ms,
        }

    def view(self, pool_id: str) -> dict[str, Any]:
        """Swap state of one pool, for ``/v1/status`` and the status page."""
        pool = self.state.pools[pool_id]
        default = self._file_pool(pool_id) or pool.config
        reservation = self.reservations.get(pool_id)
        return {
            "variant": pool.variant,
            "variants": [
                {"id": DEFAULT_VARIANT, "models": default.models},
                *({"id": v.id, "models": v.models or default.models} for v in default.variants),
            ],
            "reload": self.progress.get(pool_id),
            "reservation": reservation.view(self.reservations.now()) if reservation else None,
        }

    async def aclose(self) -> None:
        """Shutdown: a reload still starting its new set loses it; retirements end early
        (the gateway stops the retiring sets itself)."""
        for task in list(self._retire_tasks):
            task.cancel()
        await asyncio.gather(*self._retire_tasks, return_exceptions=True)
        await asyncio.gather(*(pool.stop() for pool in self._starting), return_exceptions=True)
        self._starting.clear()


def _carry_counters(change: _Change, old: PoolRuntime, new: PoolRuntime) -> None:
    """Totals continue across a reload for replicas that keep their id; what the old set
    still adds while it finishes is carried over when it retires."""
    new.retried += old.retried
    new.queue.rejected.update(old.queue.rejected)
    for replica in old.replicas:
        heir = _same_replica(new, replica.replica_id)
        if heir is not None:
            at_switch = replica.counters()
            heir.add_counters(at_switch)
            change.carried.append((replica, at_switch))


def _same_replica(pool: PoolRuntime | None, replica_id: str) -> ReplicaState | None:
    if pool is None:
        return None
    return next((r for r in pool.replicas if r.replica_id == replica_id), None)


def _replica_estimate(replica: ReplicaConfig, shape: Any) -> tuple[FitEstimate, float | None]:
    settings = launch_settings(replica.launch or [])

    def number(key: str, default: float) -> float:
        try:
            return float(settings[key])
        except (KeyError, ValueError):
            return default

    fit = estimate(
        shape,
        context_tokens=int(number("context", 0)) or None,
        parallel=int(number("parallel", 1)),
        kv_type=settings.get("kv_type", "f16"),
        device="cuda",
        micro_batch=int(number("micro_batch", 512)),
    )
    # vLLM reserves this share of the whole GPU, whatever the model needs
    engine = type(replica).__struct_config__.tag
    utilisation = number("gpu_memory_utilization", 0.9) if engine == "vllm" else None
    return fit, utilisation


def _address(root: str) -> tuple[str, int]:
    netloc = root.split("://", 1)[1].split("/", 1)[0]
    host, _, port = netloc.rpartition(":")
    if not host:
        return netloc, 443 if root.startswith("https") else 80
    return host.strip("[]"), int(port)


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port
