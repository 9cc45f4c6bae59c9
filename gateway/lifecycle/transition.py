"""One reload's mechanics, pool by pool: bring the new replica set up and gate it, switch
routing to it, and retire the old set once it has finished what it holds."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import msgspec

from backends.base import Endpoint, Limits, UpstreamCall
from backends.errors import BackendError, BackendRejected
from gateway.config import Config, PoolConfig
from gateway.pools import AdmissionFactory, Hold, PoolRuntime
from gateway.state import GatewayState
from policies.admission import PoolClosed
from policies.replicas import Counters, ReplicaLatency, ReplicaState

log = logging.getLogger("orchgate.lifecycle")

_GATE_POLL_S = 0.1
_RETIRE_POLL_S = 0.05


class BringUpFailed(Exception):
    """The new set did not come up; the message says why, for the reload's answer."""


class Change:
    """One pool's part of a reload: ``target`` None removes the pool."""

    __slots__ = (
        "carried", "new", "old", "old_stopped", "pool_id", "strategy", "switched", "target",
        "variant",
    )  # fmt: skip

    def __init__(
        self,
        pool_id: str,
        old: PoolRuntime | None,
        target: PoolConfig | None,
        variant: str,
        strategy: str | None = None,
    ) -> None:
        self.pool_id = pool_id
        self.old = old
        self.target = target
        self.variant = variant
        # "replace" only makes sense when there is a set to replace
        wanted = strategy or (target.swap_strategy if target is not None else "blue_green")
        self.strategy = wanted if old is not None else "blue_green"
        self.old_stopped = False
        self.new: PoolRuntime | None = None
        self.switched = False
        self.carried: list[tuple[ReplicaState, Counters]] = []


async def bring_up(
    change: Change,
    on_phase: Callable[[Change, str], None],
    admission: AdmissionFactory,
) -> None:
    """Launch, health gate, warm-up; bounded as a whole by ``reload_timeout_s``. The new
    set is ``change.new`` from the first step on, so a failure can stop it. ``admission``:
    how the new set's queue is built (``GatewayState.admission``)."""
    assert change.target is not None
    limit = change.target.reload_timeout_s
    try:
        async with asyncio.timeout(limit + 5.0):  # backstop: each step has its own limit
            await _gate(change, on_phase, admission)
    except TimeoutError:
        raise BringUpFailed(f"not serving within reload_timeout_s={limit:g}") from None
    log.info("pool %s: new replica set is healthy and serving", change.pool_id)


async def replace_in_place(
    state: GatewayState,
    change: Change,
    on_phase: Callable[[Change, str], None],
    expected_s: float = 5.0,
) -> None:
    """``swap_strategy = "replace"``, for hosts that cannot run both sets at once: new
    requests wait (``GatewayState.settled``), the old set finishes what it holds (at most
    ``timeouts.total_s``) and stops, then the new set starts on the same addresses and is
    gated. On failure the caller restores the old set (``restore``)."""
    old = change.old
    assert old is not None
    state.holds[change.pool_id] = Hold(expected_s)
    on_phase(change, "draining")
    await _let_finish(old, "the pool is swapping its model")
    on_phase(change, "stopping")
    change.old_stopped = True
    await old.stop()
    await bring_up(change, on_phase, state.admission)


async def restore(
    state: GatewayState, change: Change, on_phase: Callable[[Change, str], None]
) -> str | None:
    """After a failed in-place swap: start the previous setting again and route to it.
    Returns why it did not come back, if it did not (it keeps trying, as any replica)."""
    old = change.old
    assert old is not None
    back = Change(change.pool_id, None, old.config, old.variant)
    problem = None
    try:
        await bring_up(back, on_phase, state.admission)
    except BringUpFailed as exc:
        problem = str(exc)
        log.error("pool %s: the previous setting did not come back: %s", change.pool_id, exc)
    assert back.new is not None
    back.switched = True
    _carry_counters(change, old, back.new)
    state.pools[change.pool_id] = back.new
    return problem


def release_hold(state: GatewayState, pool_id: str) -> None:
    hold = state.holds.pop(pool_id, None)
    if hold is not None:
        hold.released.set()


async def _gate(
    change: Change, on_phase: Callable[[Change, str], None], admission: AdmissionFactory
) -> None:
    assert change.target is not None
    new = change.new = PoolRuntime(change.target, change.variant, admission=admission)
    await gate(new, change.target.reload_timeout_s, lambda phase: on_phase(change, phase))


async def gate(
    pool: PoolRuntime,
    limit_s: float,
    on_phase: Callable[[str], None],
    *,
    limit_name: str = "reload_timeout_s",
) -> None:
    """Start ``pool`` (launch its managed replicas), wait until every replica is healthy,
    then warm each up with a real one-token request -- within ``limit_s``. A managed
    process that exits meanwhile fails it at once, with the process's last words. Used
    by reloads and by models loaded on demand (``gateway.residency``)."""
    loop = asyncio.get_running_loop()
    failed: asyncio.Future[str] = loop.create_future()

    def on_exit(replica: ReplicaState, code: int) -> None:
        if failed.done():  # gated already (or failed): the pool's own handling is enough
            return
        process = next((p for p in pool.processes if p.name == replica.replica_id), None)
        output = process.last_output() if process is not None else ""
        failed.set_result(
            f"replica {replica.replica_id} exited with code {code} while starting"
            + (f": {output}" if output else "")
        )

    try:
        await pool.start(on_exit)
    except OSError as exc:
        raise BringUpFailed(f"a replica could not be launched: {exc}") from None
    deadline = loop.time() + limit_s
    on_phase("loading")
    while not all(r.ready for r in pool.replicas):
        if failed.done():
            raise BringUpFailed(failed.result())
        if loop.time() > deadline:
            waiting = "; ".join(
                f"{r.replica_id}: {r.detail or 'not ready'}" for r in pool.replicas if not r.ready
            )
            raise BringUpFailed(f"not healthy within {limit_name}={limit_s:g}: " + waiting)
        await asyncio.wait({failed}, timeout=_GATE_POLL_S)
    on_phase("warming_up")
    for replica in pool.replicas:
        await _warm_up(pool, replica, deadline, failed)
    if not failed.done():
        failed.set_result("")  # from now on an exit is the pool's business, not the gate's


async def _warm_up(
    pool: PoolRuntime, replica: ReplicaState, deadline: float, failed: asyncio.Future[str]
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
                raise BringUpFailed(failed.result()) from None
            refusal = exc.message
            break
    raise BringUpFailed(
        f"replica {replica.replica_id} is healthy but did not serve model {model!r}: {refusal}"
    )


def switch(state: GatewayState, changes: list[Change], config: Config) -> None:
    """Atomic for the data plane: no await from the first assignment to the last."""
    for change in changes:
        old, new = change.old, change.new
        if new is not None:
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
        on_demand = {k: p for k, p in state.pools.items() if p.on_demand}
        state.pools = {pool_id: state.pools[pool_id] for pool_id in order} | on_demand
    state.config = config
    state.reindex()
    _mark_retired_models(state, changes)
    state.retiring.extend(c.old for c in changes if c.old is not None)


def _mark_retired_models(state: GatewayState, changes: list[Change]) -> None:
    """A replaced pool's model that no pool serves any more is ``Retired``; a model a
    reload brings back is ``Active`` again."""
    active = set(state.models.names())
    now = time.time()
    for change in changes:
        if change.old is not None and change.old.canonical not in active:
            state.retired_models[change.old.canonical] = now
    for name in active:
        state.retired_models.pop(name, None)


async def retire(state: GatewayState, change: Change) -> None:
    """Let the old set finish what it holds (at most the pool's ``total_s``), then stop."""
    old = change.old
    assert old is not None
    try:
        await _let_finish(old, "the pool was reloaded")
        current = state.pools.get(change.pool_id)
        for replica, at_switch in change.carried:
            heir = _same_replica(current, replica.replica_id)
            if heir is not None:
                heir.add_counters(replica.counters().since(at_switch))
    finally:
        await old.stop()
        if old in state.retiring:
            state.retiring.remove(old)
        log.info("pool %s: previous replica set retired", change.pool_id)


async def _let_finish(old: PoolRuntime, reason: str) -> None:
    """Give a set that no longer receives requests the pool's ``total_s`` to finish what
    it holds; then refuse whatever still waits (retriable) and end what still runs."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + old.config.timeouts.total_s
    while not old.idle() and loop.time() < deadline:
        await asyncio.sleep(_RETIRE_POLL_S)
    old.queue.close(PoolClosed(f"{reason}; retry", retry_after_s=1.0))
    if not old.idle():
        log.warning("pool %s: ending requests still on the previous set", old.id)
        for replica in old.replicas:
            replica.backend.interrupt(reason)


def _carry_counters(change: Change, old: PoolRuntime, new: PoolRuntime) -> None:
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
