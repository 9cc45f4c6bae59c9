"""Admission, placement and estimates as pure logic: no sockets, a fake clock."""

from __future__ import annotations

import asyncio
import random
from typing import ClassVar

import pytest

from backends.base import Endpoint, ReplicaInfo
from backends.gpu import GpuSample
from policies.admission import AdmissionQueue, PoolUnready, Priority, QueueFull, QueueTimeout
from policies.estimates import ServiceRate, retry_after_seconds
from policies.health import Ejector, HealthMonitor
from policies.placement import choose_replica
from policies.replicas import ReplicaState


class StubBackend:
    """Only what ReplicaState reads; admission never calls the backend."""

    engine: ClassVar[str] = "stub"
    default_slots: ClassVar[int] = 1
    endpoints = frozenset(Endpoint)

    def __init__(self, replica_id: str, slots: int) -> None:
        self.replica_id = replica_id
        self.configured_slots = slots


def replica(replica_id: str, slots: int, *, ready: bool = True) -> ReplicaState:
    state = ReplicaState(StubBackend(replica_id, slots))  # type: ignore[arg-type]
    state.ready = ready
    return state


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_queue(
    *replicas: ReplicaState, capacity: int = 10, clock: Clock | None = None, timeout: float = 60
) -> AdmissionQueue:
    return AdmissionQueue(
        list(replicas), capacity=capacity, queue_timeout_s=timeout, clock=clock or Clock()
    )


def test_placement_prefers_most_free_slots_and_avoids_failed() -> None:
    a, b, c = replica("a", 4), replica("b", 4), replica("c", 8, ready=False)
    a.in_use = 3
    assert choose_replica([a, b, c]) is b
    assert choose_replica([a, b, c], avoid={"b"}) is a
    b.in_use = 4
    a.in_use = 4
    assert choose_replica([a, b, c]) is None
    a.in_use = 3
    assert choose_replica([a, b], avoid={"a"}) is a  # avoided only when there is a choice


def gpu(device: int, *, util: int, free_gib: int) -> GpuSample:
    total = 80 * 1024**3
    free = free_gib * 1024**3
    return GpuSample(device, "gpu", util, total - free, free, total)


def test_placement_breaks_slot_ties_by_free_vram_then_utilisation() -> None:
    a, b, c = replica("a", 4), replica("b", 4), replica("c", 4)
    a.gpu = gpu(0, util=10, free_gib=20)
    b.gpu = gpu(1, util=90, free_gib=60)
    c.gpu = gpu(2, util=50, free_gib=60)
    assert choose_replica([a, b, c]) is c  # most free VRAM; of those, the less busy
    c.in_use = 1
    assert choose_replica([a, b, c]) is b  # free slots come first
    b.in_use = c.in_use = 0
    a.in_use = 0
    b.gpu = gpu(1, util=50, free_gib=60)
    assert choose_replica([a, b, c]) is b  # a full tie: the first configured
    assert choose_replica([a, b, c], avoid={"b", "c"}) is a


def test_placement_without_gpu_telemetry_keeps_configured_order_on_ties() -> None:
    a, b = replica("a", 4), replica("b", 4)
    b.gpu = gpu(1, util=0, free_gib=80)  # only one GPU known: no comparison is possible
    assert choose_replica([a, b]) is a


async def test_interactive_before_batch_and_fifo_within_priority() -> None:
    queue = make_queue(replica("r", 1))
    holder = await queue.acquire(Priority.INTERACTIVE)
    order: list[str] = []

    async def waiter(name: str, priority: Priority) -> None:
        lease = await queue.acquire(priority)
        order.append(name)
        await asyncio.sleep(0)
        lease.release()

    tasks = []
    for name, prio in [
        ("b1", Priority.BATCH),
        ("i1", Priority.INTERACTIVE),
        ("b2", Priority.BATCH),
        ("i2", Priority.INTERACTIVE),
    ]:
        tasks.append(asyncio.create_task(waiter(name, prio)))
        await asyncio.sleep(0)
    assert queue.depth() == 4
    assert queue.depth(Priority.BATCH) == 2
    holder.release()
    await asyncio.gather(*tasks)
    assert order == ["i1", "i2", "b1", "b2"]
    assert queue.depth() == 0 and queue.in_use() == 0


async def test_new_request_does_not_jump_the_queue() -> None:
    queue = make_queue(replica("r", 1))
    lease = await queue.acquire(Priority.INTERACTIVE)
    first = asyncio.create_task(queue.acquire(Priority.INTERACTIVE))
    await asyncio.sleep(0)
    lease.release()  # grants `first` synchronously, before any newcomer
    second = asyncio.create_task(queue.acquire(Priority.INTERACTIVE))
    await asyncio.sleep(0)
    assert first.done() and not second.done()
    (await first).release()
    (await second).release()


async def test_full_queue_rejects_with_an_estimate() -> None:
    clock = Clock()
    queue = make_queue(replica("r", 2), capacity=1, clock=clock)
    a = await queue.acquire(Priority.INTERACTIVE)
    clock.now = 4.0
    a.release()  # one observed service time: 4 s
    held = [await queue.acquire(Priority.INTERACTIVE) for _ in range(2)]
    waiting = asyncio.create_task(queue.acquire(Priority.BATCH))
    await asyncio.sleep(0)
    with pytest.raises(QueueFull) as info:
        await queue.acquire(Priority.INTERACTIVE)
    # position 2 behind a 4 s service time on 2 slots -> 4 s
    assert info.value.retry_after_s == pytest.approx(4.0)
    waiting.cancel()
    for lease in held:
        lease.release()


async def test_cancelled_waiter_leaves_the_queue_and_is_never_granted() -> None:
    r = replica("r", 1)
    queue = make_queue(r)
    lease = await queue.acquire(Priority.INTERACTIVE)
    task = asyncio.create_task(queue.acquire(Priority.INTERACTIVE))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert queue.depth() == 0
    lease.release()
    assert r.in_use == 0


async def test_waiter_cancelled_in_the_turn_it_was_granted_returns_the_slot() -> None:
    r = replica("r", 1)
    queue = make_queue(r)
    lease = await queue.acquire(Priority.INTERACTIVE)
    task = asyncio.create_task(queue.acquire(Priority.INTERACTIVE))
    await asyncio.sleep(0)
    lease.release()  # grants the waiter...
    task.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await task
    assert r.in_use == 0 and queue.depth() == 0


async def test_unready_pool_and_queue_timeout() -> None:
    r = replica("r", 1, ready=False)
    queue = make_queue(r, timeout=0.05)
    with pytest.raises(PoolUnready):
        await queue.acquire(Priority.INTERACTIVE)
    r.ready = True
    lease = await queue.acquire(Priority.INTERACTIVE)
    with pytest.raises(QueueTimeout):
        await queue.acquire(Priority.INTERACTIVE)
    assert queue.depth() == 0
    lease.release()


async def test_pump_after_a_replica_becomes_ready() -> None:
    a, b = replica("a", 1), replica("b", 1, ready=False)
    queue = make_queue(a, b)
    held = await queue.acquire(Priority.INTERACTIVE)
    task = asyncio.create_task(queue.acquire(Priority.INTERACTIVE))
    await asyncio.sleep(0)
    b.ready = True
    queue.pump()
    lease = await task
    assert lease.replica is b
    lease.release()
    held.release()


def test_service_rate_and_retry_after_bounds() -> None:
    rate = ServiceRate(initial_service_s=1.0)
    assert rate.wait_s(4, 2) == 2.0
    rate.observe(10.0)
    assert rate.mean_service_s == 10.0
    rate.observe(0.0)
    assert rate.mean_service_s == pytest.approx(8.0)
    assert retry_after_seconds(0.01) == 1
    assert retry_after_seconds(3.2) == 4
    assert retry_after_seconds(10_000) == 120


class ProbedBackend(StubBackend):
    async def probe(self) -> ReplicaInfo:
        return ReplicaInfo(ready=True, total_slots=1)


async def test_health_monitor_stops_even_when_woken_in_the_same_tick() -> None:
    """Regression: the probe loop waited with asyncio.wait_for, which on Python 3.11
    swallows a cancellation landing in the tick its wait completes (cpython#86296): a wake
    (a data-plane failure) just before stop() left the loop running and stop() waiting for
    ever -- it hung a reload's rollback. Also at random offsets with waits ending often."""
    rng = random.Random(7)
    for interval, woken in [(10.0, True)] * 20 + [(0.001, False)] * 100:
        states = [ReplicaState(ProbedBackend(f"r{i}", 1)) for i in range(3)]  # type: ignore[arg-type]
        queue = make_queue(*states)
        ejector = Ejector(queue, consecutive_failures=5, cooldown_s=1, max_cooldown_s=1)
        monitor = HealthMonitor(states, queue, interval, ejector)
        await monitor.start()
        await asyncio.sleep(0.002 if woken else rng.uniform(0, 0.004))
        if woken:
            monitor.wake("r1")  # its wait completes in the tick stop() cancels it
        async with asyncio.timeout(2):
            await monitor.stop()
