"""The task API's event logs in Redis, so the next leader can answer for a task.

Write-through: a task's events reach its readers only once they are in Redis (one Lua
script per batch; the events that arrive while one is in flight form the next batch, so
under load there is less than one call per token). The script checks the fencing token:
the leader lease's value must still be this node's ``node|epoch`` and no newer leader may
have claimed the task -- a paused former leader writes nothing. Keys, for task ``t``:
``<prefix>:task:t`` (hash: its view, owner, next id, terminal) and ``<prefix>:task:t:ev``
(stream, explicit ids ``0-1``, ``0-2``, ...: the SSE ids), both expiring ``retention_s``
after the task ends.

A leader asked about a task it does not hold reads it here: a finished task is answered
from its log, byte for byte; an unfinished one belonged to a node that stopped leading, so
it is ended with a retriable ``WORKER_RESET`` (``gateway.tasks.failover_error``), written
with this leader's fencing token, and a client resuming with ``Last-Event-ID`` gets the
events it missed and that error.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec

from gateway.cluster.lease import LeaderLease
from gateway.errors import NotLeader, StoreUnavailable
from gateway.tasks import Task, failover_error, sse

log = logging.getLogger("orchgate.cluster")

_APPEND = """
if redis.call('GET', KEYS[4]) ~= ARGV[1] then return -1 end
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner and owner ~= ARGV[1] then return -1 end
if redis.call('HGET', KEYS[1], 'terminal') == '1' then return -2 end
local n = tonumber(ARGV[2])
for i = 7, #ARGV do
  redis.call('XADD', KEYS[2], '0-' .. n, 'f', ARGV[i])
  n = n + 1
end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'view', ARGV[3], 'terminal', ARGV[4], 'next', n)
if ARGV[4] == '1' then
  redis.call('ZREM', KEYS[3], ARGV[6])
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
else
  redis.call('ZADD', KEYS[3], 'NX', 0, ARGV[6])
end
return 1
"""
# a task whose owner stopped leading: this leader ends it (ARGV[2]: the error event, no id);
# -3 when its owner is a live member of an active cluster (it runs there: follow it)
_CLAIM_FAIL = """
if redis.call('GET', KEYS[4]) ~= ARGV[1] then return -1 end
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('HGET', KEYS[1], 'terminal') == '1' then return 0 end
local owner = redis.call('HGET', KEYS[1], 'owner') or ''
local node = string.match(owner, '^(.+)|%d+$')
if node and redis.call('GET', ARGV[6] .. ':node:' .. node) == owner then return -3 end
local n = tonumber(redis.call('HGET', KEYS[1], 'next') or '1')
redis.call('XADD', KEYS[2], '0-' .. n, 'f', 'id: ' .. n .. '\\n' .. ARGV[2])
local view = cjson.decode(redis.call('HGET', KEYS[1], 'view'))
view['state'] = 'failed'
view['error'] = cjson.decode(ARGV[3])
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'terminal', '1', 'next', n + 1,
           'view', cjson.encode(view))
redis.call('ZREM', KEYS[3], ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return n
"""
_RETRY_S = 0.05  # Redis slow or away: how soon a batch is tried again (while leading)
_FOLLOW_BLOCK_MS = 200  # a reader of a task running on another node waits this long per read
CANCEL_WAIT_S = 5.0  # how long a cancel asked of another node waits for its task to end


AskCancel = Callable[[str, str], Awaitable[None]]  # (owner "node|epoch", task id)


class Fenced(Exception):
    """This node may not write for the task any more (it stopped leading)."""


class RedisTaskLog:
    """``gateway.tasks.EventSink`` for the leader, and the reader of other nodes' tasks."""

    def __init__(
        self, client: Any, *, prefix: str, lease: LeaderLease, retention_s: float,
        op_timeout_s: float, ask_cancel: AskCancel | None = None,
        cancel_wait_s: float = CANCEL_WAIT_S,
    ) -> None:  # fmt: skip
        self._client = client
        self._cancel_wait_s = cancel_wait_s
        self._ask_cancel = ask_cancel  # active mode: how a cancel reaches a task's node
        self._prefix = prefix
        self._lease = lease
        self._retention_ms = max(1000, int(retention_s * 1000))
        self._op_timeout_s = op_timeout_s
        self._append = client.register_script(_APPEND)
        self._claim_fail = client.register_script(_CLAIM_FAIL)
        self._pending: dict[str, list[bytes]] = {}
        self._flushing: dict[str, asyncio.Task[None]] = {}

    def _keys(self, task_id: str) -> list[str]:
        base = f"{self._prefix}:task:{task_id}"
        return [base, base + ":ev", f"{self._prefix}:tasks:active", self._lease.key]

    # -- the leader's writes -------------------------------------------------------------
    def publish(self, task: Task, frame: bytes) -> None:
        self._pending.setdefault(task.id, []).append(frame)
        if task.id not in self._flushing:
            self._flushing[task.id] = asyncio.get_running_loop().create_task(self._flush(task))

    async def _flush(self, task: Task) -> None:
        try:
            while frames := self._pending.pop(task.id, None):
                try:
                    await self._write(task, frames)
                except Fenced:
                    log.warning("task %s: not leading any more; it ends here", task.id)
                    self._pending.pop(task.id, None)
                    task.fenced()
                    return
                task.deliver(frames)
        finally:
            self._flushing.pop(task.id, None)

    async def _write(self, task: Task, frames: list[bytes]) -> None:
        # one batch in flight per task, delivered once stored: what the task's readers
        # have is exactly what is stored
        first = len(task.events) + 1
        view = msgspec.json.encode(task.view())
        terminal = "1" if task.finished and not self._pending.get(task.id) else "0"
        args = [self._lease.value, first, view, terminal, self._retention_ms, task.id, *frames]
        while True:
            if not self._lease.leading:
                raise Fenced
            try:
                async with asyncio.timeout(self._op_timeout_s):
                    result = await self._append(keys=self._keys(task.id), args=args)
            except Exception as exc:  # noqa: BLE001 -- Redis slow or away: again, while leading
                log.debug("task %s: storing events failed (%s); retrying", task.id, exc)
                await asyncio.sleep(_RETRY_S)
                continue
            if result == -1:
                raise Fenced
            return

    # -- what other nodes' tasks look like to this node -----------------------------------
    async def view(self, task_id: str) -> dict[str, Any] | None:
        """The task's last stored view (ended here first if its owner stopped serving)."""
        await self._settle(task_id)
        raw = await self._client.hget(self._keys(task_id)[0], "view")
        return None if raw is None else msgspec.json.decode(raw)

    async def frames(self, task_id: str, after: int) -> AsyncIterator[bytes] | None:
        """The stored events after the ``after``-th, or None for a task Redis does not
        know; a task still running on another node is followed until it ends."""
        found = await self._settle(task_id)
        if found is _Found.UNKNOWN:
            return None
        if found is _Found.RUNNING:
            return self._follow(task_id, after)
        entries = await self._client.xrange(self._keys(task_id)[1], min=f"(0-{after}")
        return _frames(entries)

    async def cancel(self, task_id: str) -> bool | None:
        """Cancel a task another node runs: True once its node ended it cancelled, False
        when it had ended already, None for a task Redis does not know."""
        found = await self._settle(task_id)
        if found is _Found.UNKNOWN:
            return None
        if found is _Found.RUNNING and self._ask_cancel is not None:
            base = self._keys(task_id)[0]
            await self._ask_cancel((await self._client.hget(base, "owner")).decode(), task_id)
            try:
                async with asyncio.timeout(self._cancel_wait_s):
                    while await self._client.hget(base, "terminal") != b"1":
                        await asyncio.sleep(0.01)
            except TimeoutError:
                raise StoreUnavailable(
                    f"the gateway running task {task_id!r} did not confirm the cancel within "
                    f"{self._cancel_wait_s:g} s; ask again",
                    headers={"Retry-After": "1"},
                ) from None
            view = await self.view(task_id)
            return view is not None and view.get("state") == "cancelled"
        return False

    async def _follow(self, task_id: str, after: int) -> AsyncIterator[bytes]:
        events = self._keys(task_id)[1]
        last = f"0-{after}".encode()
        while True:
            answer = await self._client.xread({events: last}, block=_FOLLOW_BLOCK_MS, count=512)
            if answer:
                for entry_id, fields in answer[0][1]:
                    last = entry_id
                    yield fields[b"f"]
                continue
            # nothing new: still running there? (else ended, maybe by this node just now)
            if await self._settle(task_id) is not _Found.RUNNING:
                for _, fields in await self._client.xrange(events, min=b"(" + last):
                    yield fields[b"f"]
                return

    async def _settle(self, task_id: str) -> _Found:
        """Whether the task is known, and where it stands; one whose owner stopped serving
        is ended by this node now."""
        keys = self._keys(task_id)
        fields = await self._client.hmget(keys[0], ["terminal", "view"])
        if fields[1] is None:
            return _Found.UNKNOWN
        if fields[0] != b"1":
            engine = msgspec.json.decode(fields[1]).get("engine", "gateway")
            error = failover_error(engine)
            frame = sse("error", error)
            args = [self._lease.value, frame, msgspec.json.encode(error), self._retention_ms,
                    task_id, self._prefix]  # fmt: skip
            claimed = await self._claim_fail(keys=keys, args=args)
            if claimed == -3:
                return _Found.RUNNING
            if claimed == -1:
                raise NotLeader(
                    "this gateway stopped leading; ask again", headers={"Retry-After": "1"}
                )
        return _Found.STORED


class _Found(enum.Enum):
    UNKNOWN = "unknown"
    STORED = "stored"  # ended: its log is complete
    RUNNING = "running"  # on another live node (active mode)


async def _frames(entries: list[tuple[bytes, dict[bytes, bytes]]]) -> AsyncIterator[bytes]:
    for _, fields in entries:
        yield fields[b"f"]
