"""The shared ledger of ``[cluster] mode = "active"`` (``gateway.cluster.ledger``, driven by
``SharedAdmission``) against a real ``redis-server``, with nodes in one event loop.

One node decides exactly as the in-process queue does, operation for operation (a seeded
random differential); three nodes share one capacity, interactive-before-batch and FIFO;
a node that dies holding leases has them reaped within its lease; a frozen Redis refuses
within the timeout (503, never a hang) and nothing leaks once it answers again.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from backends.registry import build_backend
from gateway.cluster.active import Active
from gateway.cluster.admission import SharedAdmission
from gateway.config import ClusterConfig, PoolConfig, config_from_mapping
from gateway.pools import local_admission
from policies.admission import (
    AdmissionQueue,
    Lease,
    LedgerUnavailable,
    Priority,
    QueueFull,
    Ticket,
)
from policies.replicas import ReplicaState
from tests.conftest import RedisServer, pool

INTERACTIVE, BATCH = Priority.INTERACTIVE, Priority.BATCH


def _pool(slots: list[int], capacity: int) -> PoolConfig:
    replicas = [
        {"id": f"r{i}", "engine": "openai", "url": f"http://127.0.0.1:{9 + i}", "slots": n}
        for i, n in enumerate(slots, 1)
    ]
    mapping = {"pools": [pool("p", ["m"], replicas, queue_capacity=capacity)]}
    return config_from_mapping(mapping, env={}).pools[0]


def _replicas(config: PoolConfig) -> list[ReplicaState]:
    replicas = [ReplicaState(build_backend(r)) for r in config.replicas]
    for replica in replicas:
        replica.ready = True
    return replicas


@asynccontextmanager
async def _node(redis: RedisServer, name: str, **cluster: Any) -> AsyncIterator[Active]:
    settings = {"mode": "active", "url": redis.url, "node_id": name, "lease_s": 2.0,
                "heartbeat_s": 0.2, "op_timeout_s": 0.3, **cluster}  # fmt: skip
    node = Active(ClusterConfig(**settings), env={})
    await node.start()
    try:
        assert await _until(lambda: node.leading), f"{name} did not join"
        yield node
    finally:
        await node.aclose()


async def _until(predicate: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


def _outcome(ticket: Ticket | Exception) -> tuple[str, Any]:
    if isinstance(ticket, QueueFull):
        return ("full", None)
    assert isinstance(ticket, Ticket)
    if ticket._lease is not None:
        return ("granted", ticket._lease.replica.replica_id)
    return ("queued", ticket.position)


async def _admit(queue: AdmissionQueue, priority: Priority) -> Ticket | Exception:
    try:
        return await queue.admit(priority)
    except QueueFull as exc:
        return exc


def _lease_of(ticket: Ticket) -> Lease | None:
    if ticket._lease is not None:
        return ticket._lease
    waiter = ticket._waiter
    assert waiter is not None
    if waiter.future.done() and not waiter.future.cancelled():
        return waiter.future.result()
    return None


def _held(tickets: list[Ticket]) -> list[str | None]:
    """Each ticket's replica once granted (None while it waits)."""
    return [lease.replica.replica_id if (lease := _lease_of(t)) else None for t in tickets]


async def test_one_node_decides_as_the_in_process_queue(redis_server: RedisServer) -> None:
    """Seeded random admits (both priorities), releases and abandons, applied to the local
    queue and to the shared one: the same grants, on the same replicas, the same queue
    positions and refusals, the same waiters granted in the same order."""
    config = _pool([2, 1], capacity=4)
    rng = random.Random(18)
    async with _node(redis_server, "solo") as node:
        local = local_admission(_replicas(config), config)
        shared = node.admission(_replicas(config), config)
        tickets: dict[str, list[Ticket]] = {"local": [], "shared": []}
        for step in range(160):
            op = rng.choice(["admit_i", "admit_b", "admit_i", "release", "release", "abandon"])
            if op.startswith("admit"):
                priority = INTERACTIVE if op == "admit_i" else BATCH
                results = [await _admit(q, priority) for q in (local, shared)]
                assert _outcome(results[0]) == _outcome(results[1]), (step, op)
                for name, result in zip(tickets, results, strict=True):
                    if isinstance(result, Ticket):
                        tickets[name].append(result)
                continue
            live = [i for i, t in enumerate(tickets["local"]) if not t._consumed]
            if not live:
                continue
            index = rng.choice(live)
            for name in tickets:
                ticket = tickets[name][index]
                lease = _lease_of(ticket)
                if op == "release" and lease is not None:
                    ticket._consumed = True
                    lease.release()
                elif op == "abandon" or lease is None:
                    ticket.abandon()
                    ticket._consumed = True
            # give-backs go out after the call returns, and the grants they make come back
            # through the inbox: wait for both before the next step
            ok = await _until(lambda: node._sending is None
                              and _held(tickets["local"]) == _held(tickets["shared"]))  # fmt: skip
            assert ok, (step, op, _held(tickets["local"]), _held(tickets["shared"]))
        assert local.depth() == shared.depth() and local.in_use() == shared.in_use()


async def test_three_nodes_share_one_queue_in_priority_then_arrival_order(
    redis_server: RedisServer,
) -> None:
    config = _pool([1], capacity=4)
    async with _node(redis_server, "a") as a, _node(redis_server, "b") as b, \
            _node(redis_server, "c") as c:  # fmt: skip
        qa, qb, qc = (n.admission(_replicas(config), config) for n in (a, b, c))
        running = await qa.admit(INTERACTIVE)
        assert _outcome(running) == ("granted", "r1")
        order = [(qb, BATCH), (qc, BATCH), (qa, INTERACTIVE), (qb, INTERACTIVE)]
        waiting = [await q.admit(p) for q, p in order]
        # positions count across nodes: interactive ahead of every batch request
        assert [t.position for t in waiting] == [1, 2, 1, 2]
        with pytest.raises(QueueFull) as full:
            await qc.admit(BATCH)  # capacity 4, all taken -- whichever node is asked
        assert full.value.retry_after_s > 0
        granted: list[int] = []
        current = await running.wait()
        for _ in waiting:
            current.release()
            assert await _until(lambda: any(_lease_of(t) and i not in granted
                                            for i, t in enumerate(waiting)))  # fmt: skip
            index = next(i for i, t in enumerate(waiting) if _lease_of(t) and i not in granted)
            granted.append(index)
            current = await waiting[index].wait()
        current.release()
        assert granted == [2, 3, 0, 1]  # interactive first (a, then b), then batch in order
        assert await _until(lambda: all(q.in_use() == 0 for q in (qa, qb, qc)))


async def test_a_dead_nodes_leases_are_reaped_within_its_lease(redis_server: RedisServer) -> None:
    config = _pool([1, 1], capacity=4)
    async with _node(redis_server, "survivor") as survivor:
        queue = survivor.admission(_replicas(config), config)
        settings = ClusterConfig(mode="active", url=redis_server.url, node_id="doomed",
                                 lease_s=1.0, heartbeat_s=0.2, op_timeout_s=0.3)  # fmt: skip
        doomed = Active(settings, env={})
        await doomed.start()
        assert await _until(lambda: doomed.leading)
        theirs = doomed.admission(_replicas(config), config)
        held = [await theirs.admit(INTERACTIVE), await theirs.admit(INTERACTIVE)]
        assert sorted(_held(held)) == ["r1", "r2"]
        waiter = await queue.admit(INTERACTIVE)
        assert waiter.position == 1
        # the node dies: no resign, no releases -- its lease just stops being renewed
        died = time.monotonic()
        for task in [doomed.lease._task, *doomed._loops]:
            assert task is not None
            task.cancel()
        lease = await asyncio.wait_for(waiter.wait(), timeout=3)
        assert time.monotonic() - died <= 1.0 + 0.2 + 0.3  # lease + one sync + slack
        assert queue.reaped == 2
        lease.release()
        await doomed._client.aclose()
        await doomed._inbox_client.aclose()
        await doomed._ledger_client.aclose()


async def test_a_frozen_store_refuses_within_the_timeout_and_leaks_nothing(
    redis_server: RedisServer,
) -> None:
    """The first admission that times out opens the breaker: it and every later one are
    refused (503) within the timeout, the waiter already queued is refused at once, and
    the request that was running gives its slot back once Redis answers again."""
    config = _pool([1], capacity=4)
    async with _node(redis_server, "n", lease_s=5.0, op_timeout_s=0.2) as node:
        queue = node.admission(_replicas(config), config)
        before = await queue.admit(INTERACTIVE)
        waiting = await queue.admit(INTERACTIVE)
        assert waiting.position == 1
        redis_server.pause()
        try:
            started = time.monotonic()
            with pytest.raises(LedgerUnavailable):
                await queue.admit(INTERACTIVE)
            assert time.monotonic() - started <= 0.2 + 0.05
            assert node.degraded
            with pytest.raises(LedgerUnavailable):  # the waiter: refused, not left hanging
                await asyncio.wait_for(waiting.wait(), timeout=0.05)
            started = time.monotonic()
            with pytest.raises(LedgerUnavailable):  # the breaker is open: no wait at all
                await queue.admit(INTERACTIVE)
            assert time.monotonic() - started < 0.01
            (await before.wait()).release()  # goes to the outbox: sent once Redis answers
        finally:
            redis_server.resume()
        assert await _until(lambda: not node._outbox and not node.degraded, timeout=5)
        again = await queue.admit(INTERACTIVE)
        assert _outcome(again) == ("granted", "r1")  # the slot came back, nothing leaked
        (await again.wait()).release()
        assert isinstance(queue, SharedAdmission)


async def test_running_requests_are_written_back_when_redis_comes_back_empty(
    redis_server: RedisServer,
) -> None:
    """Redis restarted without persistence: the node re-registers under a new epoch and
    writes its running requests back into the ledger, so a slot they hold is not given
    to anyone else."""
    config = _pool([1], capacity=4)
    async with _node(redis_server, "n", lease_s=1.0) as node:
        queue = node.admission(_replicas(config), config)
        running = await (await queue.admit(INTERACTIVE)).wait()
        flush = await asyncio.create_subprocess_exec(
            "redis-cli", "-p", str(redis_server.port), "FLUSHALL",
            stdout=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        await flush.wait()
        assert await _until(lambda: node.rejoined == 1 and node.leading, timeout=5)
        assert await _until(lambda: not node._outbox)
        second = await queue.admit(INTERACTIVE)
        assert _outcome(second) == ("queued", 1)  # the slot is still the running request's
        running.release()
        lease = await asyncio.wait_for(second.wait(), timeout=2)
        lease.release()


async def test_a_cancel_its_node_never_confirms_is_a_retriable_503(
    redis_server: RedisServer,
) -> None:
    """A task running on a live node that does not answer the cancel (stuck, partitioned
    from its inbox): the asking node answers 503 with Retry-After after its wait, never a
    500, and the task is left as it was."""
    import redis.asyncio

    from gateway.cluster.tasks import RedisTaskLog
    from gateway.errors import StoreUnavailable

    client = redis.asyncio.Redis.from_url(redis_server.url)
    asked: list[tuple[str, str]] = []

    async def ask_cancel(owner: str, task_id: str) -> None:
        asked.append((owner, task_id))  # delivered nowhere: the owner never ends it

    async with _node(redis_server, "asker") as node:
        await client.set("og:node:owner", "owner|7", px=10_000)  # a live member runs it
        running = {"owner": "owner|7", "terminal": "0", "view": '{"state": "running"}'}
        await client.hset("og:task:t1", mapping=running)
        log = RedisTaskLog(client, prefix="og", lease=node.lease, retention_s=60,
                           op_timeout_s=0.3, ask_cancel=ask_cancel, cancel_wait_s=0.2)  # fmt: skip
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as refused:
            await log.cancel("t1")
        assert 0.2 <= time.monotonic() - started < 1.0
        assert refused.value.status == 503 and refused.value.headers == {"Retry-After": "1"}
        assert asked == [("owner|7", "t1")]
        assert await client.hget("og:task:t1", "terminal") == b"0"  # not ended behind its back
    await client.aclose()
