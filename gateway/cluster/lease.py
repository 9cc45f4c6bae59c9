"""A leader lease on Redis with a fencing epoch: who may act for a duty, and since when.

Acquire, renew and resign are each one Lua script, so a lease changes hands atomically and
only its holder can extend or release it; the expiry is Redis's own (``PX``), never a
client clock. Every acquisition takes ``epoch = INCR <key>:epoch``: the fencing token that
later writes for the duty carry, so a paused former leader is refused even if it wakes
up believing it still leads.

The holder stops acting by its own clock at ``0.7 × lease_s`` after its last successful
renewal (Kubernetes' renew-deadline pattern): if Redis is slow or unreachable it steps down
before the lease can expire and another node take it -- no two leaders at once, whatever
the network does. A holder that shuts down resigns (compare-and-delete), so a graceful
handover takes one heartbeat, not a lease.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("orchgate.cluster")

_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local epoch = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. epoch, 'PX', ARGV[2])
return epoch
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RESIGN = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
RENEW_DEADLINE = 0.7  # of lease_s: the holder stops acting this long after its last renewal


class LeaderLease:
    """One node's side of the lease on ``duty``: ``leading`` says whether it may act now."""

    def __init__(
        self,
        client: Any,  # redis.asyncio.Redis
        *,
        key: str,
        node_id: str,
        lease_s: float,
        heartbeat_s: float,
        op_timeout_s: float,
        on_change: Callable[[bool], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._key, self._epoch_key = key, key + ":epoch"
        self.node_id = node_id
        self.lease_ms = int(lease_s * 1000)
        self.heartbeat_s = heartbeat_s
        self.op_timeout_s = op_timeout_s
        self._on_change = on_change
        self._clock = clock
        self.epoch: int | None = None  # the fencing token while leading
        self.leader: str | None = None  # who holds the lease, as last read
        self.reachable = False  # the last Redis call answered
        self._valid_until = 0.0  # our clock: act until then
        self._was_leading = False
        self._lapsed = False  # the lease was lost in this step (and maybe taken again)
        self._next_s: float | None = None  # when to try next, if sooner than a heartbeat
        self._task: asyncio.Task[None] | None = None
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._resign = client.register_script(_RESIGN)

    @property
    def leading(self) -> bool:
        return self.epoch is not None and self._clock() < self._valid_until

    @property
    def key(self) -> str:
        return self._key

    @property
    def value(self) -> str:
        """What the lease holds while this node leads: the fencing token of its writes."""
        return f"{self.node_id}|{self.epoch}"

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="leader-lease")

    async def aclose(self) -> None:
        """Stop; a leader resigns, so another node takes over within one heartbeat."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.epoch is not None:
            try:
                async with asyncio.timeout(self.op_timeout_s):
                    await self._resign(keys=[self._key], args=[self.value])
                log.warning("resigned the lead (epoch %s)", self.epoch)
            except Exception as exc:  # noqa: BLE001 -- it expires on its own then
                log.warning("could not resign the lead (it expires by itself): %s", exc)
            self.epoch = None
            self._changed()

    async def _run(self) -> None:
        while True:
            started = self._clock()
            try:
                async with asyncio.timeout(self.op_timeout_s):
                    await self._step(started)
                self.reachable = True
            except Exception as exc:  # noqa: BLE001 -- Redis down or slow: try again
                if self.reachable:
                    log.warning("cluster store unreachable: %s", exc)
                self.reachable = False
            self._changed()
            pause = self.heartbeat_s if self._next_s is None else self._next_s
            self._next_s = None
            await asyncio.sleep(max(0.0, pause - (self._clock() - started)))

    async def _step(self, started: float) -> None:
        if self.epoch is not None:
            renewed = await self._renew(keys=[self._key], args=[self.value, self.lease_ms])
            if renewed:
                self._valid_until = started + RENEW_DEADLINE * self.lease_ms / 1000
                self.leader = self.node_id
                return
            log.warning("lost the lead (epoch %s): the lease was taken or expired", self.epoch)
            self.epoch = None
            self._lapsed = True
        epoch = await self._acquire(keys=[self._key, self._epoch_key],
                                    args=[self.node_id, self.lease_ms])  # fmt: skip
        if epoch is not None:
            self.epoch = int(epoch)
            self._valid_until = started + RENEW_DEADLINE * self.lease_ms / 1000
            self.leader = self.node_id
            return
        holder = await self._client.get(self._key)
        self.leader = holder.decode().rpartition("|")[0] if holder else None
        # try again the moment the holder's lease runs out, not up to a heartbeat later
        left_ms = await self._client.pttl(self._key)
        if isinstance(left_ms, int) and 0 < left_ms < self.heartbeat_s * 1000:
            self._next_s = left_ms / 1000 + 0.005

    def _changed(self) -> None:
        leading = self.leading
        if self._lapsed and leading and self._was_leading:
            # lost and taken again within one step (Redis came back empty, say): whoever
            # listens must hear both -- what it held under the old lease is gone
            self._lapsed = False
            self._notify(False)
        self._lapsed = False
        if leading != self._was_leading:
            self._notify(leading)

    def _notify(self, leading: bool) -> None:
        self._was_leading = leading
        if leading:
            log.warning("now leading (epoch %s)", self.epoch)
        else:
            log.warning("not leading any more")
        if self._on_change is not None:
            self._on_change(leading)
