"""The last minutes of every pool's activity, for the status page's charts.

One owner task samples the pools every ``[metrics] history_interval_s`` into a ring
buffer of ``history_s``: cumulative counters (tokens out, time-to-first-byte sums) and
gauges (queue depth per priority, slots running, GPU memory). ``GET /v1/status/history``
turns consecutive samples into rates. A page that opens gets the whole window at once;
after that it asks only for what came ``since`` its last point.

Tokens of streams still running are counted from their relayed events (one per token on
vLLM and llama.cpp), so the rate moves while a long stream runs; the engine's exact count
replaces that estimate when the stream ends.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Iterable
from typing import Any, NamedTuple, Protocol

from gateway.pools import PoolRuntime
from policies.admission import Priority

SERIES = (
    "tokens_per_s",
    "ttft_ms",
    "queue_interactive",
    "queue_batch",
    "running",
    "slots",
    "vram_used_bytes",
)


class Pools(Protocol):
    """Who holds the pool table (``GatewayState``; a reload replaces the table)."""

    pools: dict[str, PoolRuntime]


class PoolPoint(NamedTuple):
    """One pool at one instant: counters are cumulative, the rest are gauges."""

    tokens_out: int
    first_byte_s_sum: float
    first_bytes: int
    queue_interactive: int
    queue_batch: int
    running: int
    slots: int
    vram_used_bytes: int | None  # the pool's GPUs (NVML), None without telemetry

    @property
    def idle(self) -> bool:
        return not (self.running or self.slots or self.queue_interactive or self.queue_batch)


class Sample(NamedTuple):
    wall: float  # time.time(): the chart's x axis
    monotonic: float  # for the rates
    pools: dict[str, PoolPoint]


def sample_pool(pool: PoolRuntime) -> PoolPoint:
    tokens = 0
    first_byte_s = 0.0
    first_bytes = 0
    running = 0
    slots = 0
    vram: dict[int, int] = {}  # by device: replicas sharing a GPU count it once
    for replica in pool.replicas:
        tokens += replica.tokens_out
        for stats in replica.live:  # a running stream: its events less the role chunk
            tokens += max(0, stats.events - 1)
        first_byte_s += replica.first_byte_s_sum
        first_bytes += replica.first_byte_count
        running += replica.in_use
        if replica.ready:
            slots += replica.slots
        if replica.gpu is not None:
            vram[replica.gpu.device] = replica.gpu.vram_used_bytes
    return PoolPoint(
        tokens_out=tokens,
        first_byte_s_sum=first_byte_s,
        first_bytes=first_bytes,
        queue_interactive=pool.queue.depth(Priority.INTERACTIVE),
        queue_batch=pool.queue.depth(Priority.BATCH),
        running=running,
        slots=slots,
        vram_used_bytes=sum(vram.values()) if vram else None,
    )


def _increase(now: float, before: float) -> float:
    """A counter's increase; a counter that went down was reset (its replica replaced)."""
    return now - before if now >= before else now


def rates(before: PoolPoint | None, now: PoolPoint, seconds: float) -> tuple[Any, ...]:
    """One point of every series in ``SERIES`` order, between two samples."""
    tokens_per_s = ttft_ms = None
    if before is not None and seconds > 0:
        tokens_per_s = round(_increase(now.tokens_out, before.tokens_out) / seconds, 2)
        count = _increase(now.first_bytes, before.first_bytes)
        if count:
            total = _increase(now.first_byte_s_sum, before.first_byte_s_sum)
            ttft_ms = round(total / count * 1000, 2)
    return (
        tokens_per_s,
        ttft_ms,
        now.queue_interactive,
        now.queue_batch,
        now.running,
        now.slots,
        now.vram_used_bytes,
    )


class History:
    """The ring buffer and the task that fills it (started by the app's lifespan)."""

    def __init__(self, state: Pools, *, interval_s: float, window_s: float) -> None:
        self._state = state
        self.interval_s = interval_s
        self.window_s = window_s
        self.samples: deque[Sample] = deque(maxlen=max(2, int(window_s / interval_s) + 1))
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.window_s > 0

    def take(self) -> None:
        points = {pool_id: sample_pool(pool) for pool_id, pool in self._state.pools.items()}
        self.samples.append(Sample(time.time(), time.monotonic(), points))

    def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.create_task(self._run(), name="status-history")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            self.take()
            await asyncio.sleep(self.interval_s)

    def view(self, since: float | None = None) -> dict[str, Any]:
        """``{interval_s, window_s, t: [...], pools: {id: {series: [...]}}}``: one point per
        interval after the first sample (or after ``since``, a ``t`` the caller has); only
        pools that did something in the window or are loaded (a catalog of idle models on
        disk would otherwise fill every answer with zeros)."""
        samples = list(self.samples)
        pairs = [
            (before, now)
            for before, now in zip(samples, samples[1:], strict=False)
            if since is None or round(now.wall, 3) > since
        ]
        active = _active_pools(now.pools for _, now in pairs)
        pools: dict[str, dict[str, list[Any]]] = {
            pool_id: {name: [] for name in SERIES} for pool_id in active
        }
        for before, now in pairs:
            seconds = now.monotonic - before.monotonic
            for pool_id, series in pools.items():
                point = now.pools.get(pool_id)
                values = (
                    (None,) * len(SERIES)
                    if point is None
                    else rates(before.pools.get(pool_id), point, seconds)
                )
                for name, value in zip(SERIES, values, strict=True):
                    series[name].append(value)
        return {
            "interval_s": self.interval_s,
            "window_s": self.window_s,
            "t": [round(now.wall, 3) for _, now in pairs],
            "pools": pools,
        }


def _active_pools(points: Iterable[dict[str, PoolPoint]]) -> list[str]:
    seen: dict[str, bool] = {}
    last: dict[str, PoolPoint] = {}
    for by_pool in points:
        for pool_id, point in by_pool.items():
            before = last.get(pool_id)
            moved = before is not None and point.tokens_out != before.tokens_out
            seen[pool_id] = seen.get(pool_id, False) or moved or not point.idle
            last[pool_id] = point
    return [pool_id for pool_id, active in seen.items() if active]
