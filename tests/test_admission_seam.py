"""The seam a shared admission ledger plugs into (``[cluster] mode = "active"``, issue 18):
every pool, a reload's too, builds its queue through ``GatewayState.admission``, and the
task API admits through ``await queue.admit()``, which may suspend -- so two submits of one
``task_id`` racing through a suspending ledger still start one task and leak no slot."""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Sequence
from typing import Any

import msgspec

from gateway.config import PoolConfig, config_from_mapping
from gateway.pools import local_admission
from gateway.routes.tasks import TaskError, admit_task
from gateway.state import GatewayState
from policies.admission import AdmissionQueue, Priority, Ticket
from policies.replicas import ReplicaState
from tests.conftest import pool


class SuspendingQueue(AdmissionQueue):
    """Decides like the local queue, after a pause: what a round trip to Redis does."""

    async def admit(self, priority: Priority, *, avoid: Collection[str] = ()) -> Ticket:
        await asyncio.sleep(0.02)
        return self.enqueue(priority, avoid=avoid)


def _config(url: str) -> Any:
    replicas = [{"id": "r1", "engine": "openai", "url": url, "slots": 2}]
    return config_from_mapping(
        {"pools": [pool("p", ["m"], replicas), pool("q", ["n"], [{**replicas[0], "id": "r2"}])]},
        env={},
    )


def test_every_pool_builds_its_queue_through_the_states_factory() -> None:
    built: list[str] = []

    def factory(replicas: Sequence[ReplicaState], config: PoolConfig) -> AdmissionQueue:
        built.append(config.id)
        return SuspendingQueue(replicas, capacity=config.queue_capacity, queue_timeout_s=1)

    state = GatewayState(_config("http://127.0.0.1:9"), admission=factory)
    assert built == ["p", "q"] and state.admission is factory
    assert all(type(p.queue) is SuspendingQueue for p in state.pools.values())
    plain = GatewayState(_config("http://127.0.0.1:9"))  # the default: in process
    assert plain.admission is local_admission
    assert all(type(p.queue) is AdmissionQueue for p in plain.pools.values())


async def test_local_admit_never_suspends() -> None:
    state = GatewayState(_config("http://127.0.0.1:9"))
    queue = state.pools["p"].queue
    queue.replicas[0].ready = True
    step = queue.admit(Priority.INTERACTIVE).__await__()
    try:
        step.send(None)
        raise AssertionError("the in-process admit suspended")
    except StopIteration as done:
        ticket = done.value
    assert isinstance(ticket, Ticket) and queue.in_use() == 1
    ticket.abandon()
    assert queue.in_use() == 0


async def test_twin_task_ids_through_a_suspending_ledger_start_one_task(
    fake_upstream: Any,
) -> None:
    _, upstream = fake_upstream

    def factory(replicas: Sequence[ReplicaState], config: PoolConfig) -> AdmissionQueue:
        return SuspendingQueue(replicas, capacity=config.queue_capacity, queue_timeout_s=5)

    state = GatewayState(_config(upstream.url), admission=factory)
    queue = state.pools["p"].queue
    queue.replicas[0].ready = True
    raw = msgspec.json.encode({"task_id": "twin", "model_ref": "m", "prompt": "hi"})
    outcomes = await asyncio.gather(
        admit_task(state, state.tasks, raw), admit_task(state, state.tasks, raw),
        return_exceptions=True,
    )  # fmt: skip
    refused = [o for o in outcomes if isinstance(o, TaskError)]
    started = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(started) == 1 and len(refused) == 1, outcomes
    assert refused[0].status == 409
    assert queue.in_use() <= 1  # the twin's slot went straight back
    task = state.tasks.get("twin")
    assert task is started[0]
    async with asyncio.timeout(10):
        while queue.in_use():
            await asyncio.sleep(0.01)
    assert queue.depth() == 0


async def test_acquire_goes_through_admit() -> None:
    """The OpenAI path (``acquire``) and the task API (``admit``) meet in one override."""
    admitted: list[Priority] = []

    class Counting(AdmissionQueue):
        async def admit(self, priority: Priority, *, avoid: Collection[str] = ()) -> Ticket:
            admitted.append(priority)
            return await super().admit(priority, avoid=avoid)

    state = GatewayState(
        _config("http://127.0.0.1:9"),
        admission=lambda replicas, config: Counting(replicas, capacity=4, queue_timeout_s=1),
    )
    queue = state.pools["p"].queue
    queue.replicas[0].ready = True
    lease = await queue.acquire(Priority.BATCH)
    assert admitted == [Priority.BATCH] and queue.in_use() == 1
    lease.release()
    assert queue.in_use() == 0
