"""``Lifecycle``: the one owner of reloads -- a pool's (``POST /v1/pools/{id}/reload``) or the
whole config file's (``POST /v1/config/reload``, SIGHUP). Resolves what to run, checks the
reservation, plans, runs the transition (``transition``) after the preflight checks
(``preflight``), answers, reports progress and sends the webhooks."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Protocol

import msgspec
from msgspec import Meta

from backends.base import Strict
from gateway.auth import TokenCheck
from gateway.config import (
    Config,
    ConfigError,
    PoolConfig,
    SwapStrategy,
    load_config,
    validate,
)
from gateway.errors import (
    Conflict,
    GatewayError,
    InvalidConfigError,
    LockedError,
    NotFound,
    ReloadFailedError,
)
from gateway.jobs import Job, JobBook
from gateway.lifecycle.preflight import check_fit, nvml_free_vram, relocate_ports
from gateway.lifecycle.transition import (
    BringUpFailed,
    Change,
    bring_up,
    release_hold,
    replace_in_place,
    restore,
    retire,
    switch,
)
from gateway.pools import PoolRuntime
from gateway.state import GatewayState
from gateway.webhooks import Webhooks
from policies.reservation import Locked, Reservation, ReservationBook

log = logging.getLogger("orchgate.lifecycle")

DEFAULT_VARIANT = "default"


class ReloadRequest(Strict, frozen=True):
    """``POST /v1/pools/{id}/reload`` body. Empty: the pool as the config file defines it
    now. ``variant``: one of the pool's ``[[pools.variants]]`` (or ``"default"``).
    ``strategy`` overrides the pool's ``swap_strategy`` for this reload. Nothing else: a
    request never describes a process, a file or an address (the config file does)."""

    strategy: SwapStrategy | None = None
    variant: Annotated[str, Meta(min_length=1, max_length=128)] | None = None
    # llama-orch's control contract: the setting that serves this model (a variant's id
    # or one of its model names; the pool's own setting counts as "default")
    new_model_ref: Annotated[str, Meta(min_length=1, max_length=256)] | None = None

    def is_empty(self) -> bool:
        return self.variant is None and self.new_model_ref is None


class ReservationStore(Protocol):
    """Where a cluster keeps reservations for the next leader (``gateway.cluster``)."""

    async def save(self, reservation: Reservation, ttl_s: float) -> None: ...

    async def drop(self, pool_id: str) -> None: ...


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
        jobs: JobBook | None = None,
    ) -> None:
        self.state = state
        self.jobs = jobs or JobBook()
        self._jobs: dict[str, Job] = {}  # pool -> the reload job running for it
        self.auth = auth
        self.webhooks = webhooks
        self.reservations = reservations
        # [cluster]: reservations also kept where the next leader finds them
        self.reservation_store: ReservationStore | None = None
        self.config_path = config_path
        self.file_config = state.config  # as last read from the file (or the startup config)
        self._free_vram = free_vram or partial(nvml_free_vram, state)
        self._lock = asyncio.Lock()
        self._retire_tasks: set[asyncio.Task[None]] = set()
        self._starting: set[Change] = set()  # changes whose new set is not switched to yet
        self.progress: dict[str, dict[str, Any]] = {}  # per pool: the last reload, for /v1/status
        self.swap_seconds: dict[str, float] = {}  # per pool: how long its last swap took

    # -- pool reload ---------------------------------------------------------------------
    async def reload_pool(
        self, pool_id: str, request: ReloadRequest | None, token: str | None, trigger: str = "api"
    ) -> dict[str, Any]:
        pool = self._reloadable(pool_id, token)
        request = request or ReloadRequest()
        async with self._exclusive():
            target, variant = await self._target(pool, request)
            config = self._running_config_with(target)
            change = Change(pool_id, pool, target, variant, request.strategy)
            results = await self._apply([change], config, trigger)
            if request.is_empty():  # this pool now runs as the file says: a later whole-file
                pools = [target if p.id == pool_id else p for p in self.file_config.pools]
                self.file_config = msgspec.structs.replace(self.file_config, pools=pools)
            return results[pool_id]

    def _reloadable(self, pool_id: str, token: str | None) -> PoolRuntime:
        """The pool a reload may swap now: it exists (404), is not a catalog model (409),
        and the caller holds its reservation if there is one (423)."""
        pool = self.state.pools.get(pool_id)
        if pool is None:
            raise NotFound(f"no pool {pool_id!r}", param="pool_id")
        if pool.on_demand:
            raise Conflict(
                f"pool {pool_id!r} is a catalog model: POST /v1/models/{{id}}/load or /unload"
            )
        self._check_reservation(pool_id, token)
        return pool

    def start_reload(self, pool_id: str, request: ReloadRequest | None, token: str | None) -> Job:
        """The reload as a job, answered at once: what can be refused now is (404, 409,
        423); the rest -- and the outcome -- is the job's (``GET /v1/jobs/{id}``)."""
        self._reloadable(pool_id, token)
        self._exclusive()  # a reload already running: 409 now, not a failed job later
        job = self.jobs.create("reload", pool_id)
        job.result["pool"] = pool_id

        async def run() -> None:
            self._jobs[pool_id] = job
            try:
                result = await self.reload_pool(pool_id, request, token)
                job.advance("swapped", result=result)
            except GatewayError as exc:
                job.result["result"] = exc.envelope()
                job.fail(exc.message)
            except Exception as exc:  # a bug: the job says so, the gateway goes on
                log.exception("reload job failed")
                job.fail(f"internal error: {type(exc).__name__}")
            finally:
                self._jobs.pop(pool_id, None)

        task = asyncio.create_task(run(), name=f"reload-job:{pool_id}")
        self._retire_tasks.add(task)
        task.add_done_callback(self._retire_tasks.discard)
        return job

    async def _target(self, pool: PoolRuntime, request: ReloadRequest) -> tuple[PoolConfig, str]:
        if request.variant is not None and request.new_model_ref is not None:
            raise InvalidConfigError("give 'variant' or 'new_model_ref', not both")
        if request.new_model_ref is not None:
            return self._variant(pool, self._variant_serving(pool, request.new_model_ref))
        if request.variant is not None:
            return self._variant(pool, request.variant)
        return await self._from_file(pool.id), DEFAULT_VARIANT

    def _variant_serving(self, pool: PoolRuntime, model_ref: str) -> str:
        """The variant a ``new_model_ref`` names: by id, else the first whose models hold
        it (the pool's own setting, "default", included)."""
        default = self._file_pool(pool.id) or pool.config
        ids = [DEFAULT_VARIANT, *(v.id for v in default.variants)]
        if model_ref in ids:
            return model_ref
        if model_ref in default.models:
            return DEFAULT_VARIANT
        for variant in default.variants:
            if model_ref in (variant.models or default.models):
                return variant.id
        raise NotFound(
            f"pool {pool.id!r} has no setting that serves {model_ref!r} (settings: "
            f"{', '.join(ids)})",
            param="new_model_ref",
        )

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
        pools = [
            target if p.id == target.id else p.config
            for p in self.state.pools.values()
            if not p.on_demand
        ]
        return _validated(msgspec.structs.replace(self.state.config, pools=pools))

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
            running_config = _validated(
                msgspec.structs.replace(
                    fresh,
                    pools=pools,
                    server=self.state.config.server,
                    tasks=self.state.config.tasks,
                    metrics=self.state.config.metrics,
                )
            )
            results = await self._apply(changes, running_config, trigger) if changes else {}
            self.state.config = running_config
            self.auth.set_tokens(fresh.auth.token, fresh.auth.admin_token)
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

    def _plan(self, fresh: Config) -> tuple[list[Change], dict[str, str]]:
        """What a re-read file changes, pool by pool, against the file as last applied."""
        before = {p.id: p for p in self.file_config.pools}
        after = {p.id: p for p in fresh.pools}
        changes: list[Change] = []
        outcome: dict[str, str] = {}
        for pool_id, pool_config in after.items():
            running = self.state.pools.get(pool_id)
            if running is not None and running.on_demand:
                raise InvalidConfigError(
                    f"pool {pool_id!r}: a catalog model already has this id; rename the pool"
                )
            if running is None:
                changes.append(Change(pool_id, None, pool_config, DEFAULT_VARIANT))
                outcome[pool_id] = "added"
            elif before.get(pool_id) != pool_config:
                changes.append(Change(pool_id, running, pool_config, DEFAULT_VARIANT))
                outcome[pool_id] = "reloaded"
            else:
                outcome[pool_id] = "unchanged"
        for pool_id, running in self.state.pools.items():
            if pool_id not in after and not running.on_demand:
                changes.append(Change(pool_id, running, None, DEFAULT_VARIANT))
                outcome[pool_id] = "removed"
        return changes, outcome

    # -- the transition ------------------------------------------------------------------
    async def _apply(
        self, changes: list[Change], config: Config, trigger: str
    ) -> dict[str, dict[str, Any]]:
        started = time.monotonic()
        relocate_ports(self.state, changes)
        warnings = await check_fit(changes, self._free_vram)
        log.info(
            "reload (%s): starting %s",
            trigger,
            ", ".join(f"{c.pool_id} -> {c.variant}" for c in changes if c.target is not None)
            or "nothing (removals only)",
        )
        for change in changes:
            if change.target is not None:
                self._progress(change, "starting", trigger=trigger)
        starting = [c for c in changes if c.target is not None]
        self._starting.update(starting)
        try:
            outcomes = await asyncio.gather(
                *(self._start(c) for c in starting), return_exceptions=True
            )
            if any(isinstance(o, BaseException) for o in outcomes):
                await self._roll_back(
                    changes, list(zip(starting, outcomes, strict=True)), trigger, started
                )
            switch(self.state, changes, config)
        finally:  # requests held by an in-place swap go on, to whatever serves the pool now
            for change in changes:
                release_hold(self.state, change.pool_id)
        self._starting.difference_update(changes)
        for change in changes:
            if change.old is not None:
                task = asyncio.create_task(
                    retire(self.state, change), name=f"retire:{change.pool_id}"
                )
                self._retire_tasks.add(task)
                task.add_done_callback(self._retire_tasks.discard)
        duration_ms = round((time.monotonic() - started) * 1000, 1)
        results = {}
        for change in changes:
            results[change.pool_id] = self._result(change, duration_ms, warnings)
            if change.target is not None:
                self._progress(change, "swapped", duration_ms=duration_ms)
                self.swap_seconds[change.pool_id] = duration_ms / 1000
            self.webhooks.emit("swap_complete", self._event(change, trigger, duration_ms))
            log.info(
                "pool %s %s in %.0f ms (%s)",
                change.pool_id,
                "removed" if change.target is None else f"now serves {change.variant}",
                duration_ms,
                trigger,
            )
        return results

    async def _start(self, change: Change) -> None:
        if change.strategy == "replace":
            expected = self.swap_seconds.get(change.pool_id, 5.0)
            await replace_in_place(self.state, change, self._progress, expected)
        else:
            await bring_up(change, self._progress, self.state.admission)

    async def _roll_back(
        self,
        changes: list[Change],
        outcomes: list[tuple[Change, object]],
        trigger: str,
        started: float,
    ) -> None:
        """Stop every new set; the old ones kept serving, except those replaced in place,
        which are started again (their held requests wait for them)."""
        await asyncio.gather(*(c.new.stop() for c in changes if c.new is not None))
        self._starting.difference_update(changes)
        restored = [c for c in changes if c.old_stopped]
        # a restored pool runs its previous config: model names and routing are unchanged
        problems = await asyncio.gather(*(restore(self.state, c, self._progress) for c in restored))
        duration_ms = round((time.monotonic() - started) * 1000, 1)
        reasons = []
        failed_pools = {}
        for change, outcome in outcomes:
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, BringUpFailed):
                    log.error("reload failed unexpectedly", exc_info=outcome)
                reason = str(outcome) or type(outcome).__name__
                reasons.append(f"pool {change.pool_id}: {reason}")
            else:
                reason = "not applied: another pool of the same reload failed"
            failed_pools[change.pool_id] = reason
            self._progress(change, "failed", error=reason, duration_ms=duration_ms)
            event = self._event(change, trigger, duration_ms)
            self.webhooks.emit("swap_failed", {**event, "error": reason, "rolled_back": True})
        for change, problem in zip(restored, problems, strict=True):
            if problem is not None:
                failed_pools[change.pool_id] += (
                    f"; the previous setting did not come back: {problem}"
                )
                reasons.append(f"pool {change.pool_id}: previous setting not back yet: {problem}")
        log.warning("reload rolled back after %.0f ms: %s", duration_ms, "; ".join(reasons))
        raise ReloadFailedError(
            "reload failed and was rolled back; the previous replicas kept serving: "
            + "; ".join(reasons),
            extra={"rolled_back": True, "pools": failed_pools, "duration_ms": duration_ms},
        )

    # -- checks before anything starts ---------------------------------------------------
    def _check_reservation(self, pool_id: str, token: str | None) -> None:
        try:
            self.reservations.check(pool_id, token)
        except Locked as exc:
            raise LockedError(
                str(exc),
                extra={"reservation": exc.reservation.view(self.reservations.now())},
            ) from None

    # -- bookkeeping ---------------------------------------------------------------------
    def _exclusive(self) -> asyncio.Lock:
        if self._lock.locked():
            raise Conflict("a reload is already in progress; try again when it has finished")
        return self._lock

    def _progress(self, change: Change, phase: str, **fields: Any) -> None:
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
        record["state"] = phase
        record.update(fields)
        job = self._jobs.get(change.pool_id)
        if job is not None and phase not in ("swapped", "failed"):  # run() ends the job
            job.advance(phase)

    def _result(self, change: Change, duration_ms: float, warnings: list[str]) -> dict[str, Any]:
        old = change.old
        result: dict[str, Any] = {
            "pool": change.pool_id,
            "status": "removed" if change.new is None else "swapped",
            "duration_ms": duration_ms,
            "previous": _previous(old),
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
    def _event(change: Change, trigger: str, duration_ms: float) -> dict[str, Any]:
        target = change.target
        return {
            "pool_id": change.pool_id,
            "variant": change.variant if target is not None else None,
            "models": target.models if target is not None else [],
            "previous": _previous(change.old),
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
        pools = [c.new for c in self._starting if c.new is not None]
        await asyncio.gather(*(pool.stop() for pool in pools), return_exceptions=True)
        self._starting.clear()


def _validated(config: Config) -> Config:
    try:
        validate(config)
    except ConfigError as exc:
        raise InvalidConfigError(f"not applied: {exc}") from None
    return config


def _previous(old: PoolRuntime | None) -> dict[str, Any] | None:
    """What a pool ran before a reload, for the answer and the webhook event."""
    return None if old is None else {"variant": old.variant, "models": old.config.models}
