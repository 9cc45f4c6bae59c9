"""The shared slot ledger of ``[cluster] mode = "active"``: one pool's queue and slot leases
in Redis, every decision one Lua script.

Keys, for pool ``p`` under ``<prefix>:pool:p``: ``:used`` (hash replica -> slots leased),
``:leases`` (hash ticket -> replica), ``:qi`` / ``:qb`` (sorted sets of waiting tickets,
interactive and batch, scored by ``:seq`` so FIFO holds across nodes), ``:w`` (hash ticket
-> the replicas it must avoid) and ``:rate`` (the pool's mean service time, learnt from
every node's releases, behind ``Retry-After``).

A ticket is ``<node>|<epoch>|<n>``: the node's membership (``<prefix>:node:<node>`` holds
``<node>|<epoch>`` while it lives, ``gateway.cluster.active``) and a counter. A ticket whose
node is not that member any more is dead: its waiters are skipped and its leases reaped,
checked inside the script, so a node re-registering while another reaps cannot lose a live
lease. A waiter granted by another node's release is told through its node's inbox list
(``<prefix>:inbox:<node>``: ``"<ticket> <replica>"``).

The caller's view of its replicas travels in ARGV, in configured order (a hash has no
order; ties go to the first configured, as ``policies.placement.choose_replica``): what each
serves (its slots if ready, else 0), as that node's health checks see it.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from gateway.cluster.resp import RespClient
from policies.admission import Priority
from policies.replicas import ReplicaState

_PRELUDE = """
local base, prefix = KEYS[1], ARGV[1]
local used, leases, waiting = base .. ':used', base .. ':leases', base .. ':w'
local queues = {base .. ':qi', base .. ':qb'}
local function view_at(at)
  local view = {}
  for i = at, #ARGV, 2 do view[#view + 1] = {ARGV[i], tonumber(ARGV[i + 1])} end
  return view
end
local function alive(ticket)
  local node, epoch = string.match(ticket, '^(.+)|(%d+)|%d+$')
  return node ~= nil and redis.call('GET', prefix .. ':node:' .. node) == node .. '|' .. epoch
end
local function avoid_set(csv)
  local set = {}
  for id in string.gmatch(csv or '', '[^,]+') do set[id] = true end
  return set
end
-- most free slots wins, the first configured on a tie; avoided replicas only as a fallback
local function choose(view, avoid)
  local best, best_free, fallback, fallback_free = nil, 0, nil, 0
  for _, replica in ipairs(view) do
    local free = replica[2] - (tonumber(redis.call('HGET', used, replica[1])) or 0)
    if free > 0 then
      if avoid[replica[1]] then
        if free > fallback_free then fallback, fallback_free = replica[1], free end
      elseif free > best_free then best, best_free = replica[1], free end
    end
  end
  return best or fallback
end
local function grant(ticket, replica)
  redis.call('HINCRBY', used, replica, 1)
  redis.call('HSET', leases, ticket, replica)
end
local function free_lease(ticket)
  local replica = redis.call('HGET', leases, ticket)
  if not replica then return false end
  redis.call('HDEL', leases, ticket)
  if redis.call('HINCRBY', used, replica, -1) <= 0 then redis.call('HDEL', used, replica) end
  return true
end
local function dequeue(ticket)
  local gone = redis.call('ZREM', queues[1], ticket) + redis.call('ZREM', queues[2], ticket)
  redis.call('HDEL', waiting, ticket)
  return gone > 0
end
-- interactive strictly first, FIFO; a head that finds no slot stops everyone behind it
local function grant_next(view)
  local granted = 0
  for _, queue in ipairs(queues) do
    while true do
      local head = redis.call('ZRANGE', queue, 0, 0)[1]
      if not head then break end
      if alive(head) then
        local replica = choose(view, avoid_set(redis.call('HGET', waiting, head)))
        if not replica then return granted end
        dequeue(head)
        grant(head, replica)
        local inbox = prefix .. ':inbox:' .. string.match(head, '^(.+)|%d+|%d+$')
        redis.call('RPUSH', inbox, head .. ' ' .. replica)
        redis.call('PEXPIRE', inbox, 60000)
        granted = granted + 1
      else
        dequeue(head)
      end
    end
  end
  return granted
end
local function depth() return redis.call('ZCARD', queues[1]) + redis.call('ZCARD', queues[2]) end
local function mean() return redis.call('HGET', base .. ':rate', 'mean') or '' end
"""

# ARGV: prefix, ticket, 'i' | 'b', capacity, avoid csv, view...
_ADMIT = (
    _PRELUDE
    + """
local ticket, capacity = ARGV[2], tonumber(ARGV[4])
if not alive(ticket) then return {'X'} end
local ahead = redis.call('ZCARD', queues[1])
local queued = ahead + redis.call('ZCARD', queues[2])
if ARGV[3] == 'b' then ahead = queued end
if ahead == 0 then
  local replica = choose(view_at(6), avoid_set(ARGV[5]))
  if replica then
    grant(ticket, replica)
    return {'G', replica}
  end
end
if queued >= capacity then return {'F', queued, mean()} end
local queue = queues[1]
if ARGV[3] == 'b' then queue = queues[2] end
redis.call('ZADD', queue, redis.call('INCR', base .. ':seq'), ticket)
redis.call('HSET', waiting, ticket, ARGV[5])
return {'Q', ahead + 1, mean()}
"""
)

# ARGV: prefix, ticket, seconds it held the slot ('' to learn nothing), view...
_RELEASE = (
    _PRELUDE
    + """
if not free_lease(ARGV[2]) then return -1 end
if ARGV[3] ~= '' then
  -- the EWMA of policies.estimates.ServiceRate: the first observation replaces the prior
  local held, rate = tonumber(ARGV[3]), base .. ':rate'
  local m = tonumber(redis.call('HGET', rate, 'mean'))
  if m then m = m + 0.2 * (held - m) else m = held end
  redis.call('HSET', rate, 'mean', tostring(m))
end
return grant_next(view_at(4))
"""
)

# ARGV: prefix, ticket, view...: a waiter gone (timeout, client gone), or a lease unused
_ABANDON = (
    _PRELUDE
    + """
if dequeue(ARGV[2]) then return 1 end
if free_lease(ARGV[2]) then
  grant_next(view_at(3))
  return 2
end
return 0
"""
)

# ARGV: prefix, view...: reap dead nodes' leases and waiters, grant what is free now
_SYNC = (
    _PRELUDE
    + """
local reaped = 0
local held = redis.call('HKEYS', leases)
for _, ticket in ipairs(held) do
  if not alive(ticket) then
    free_lease(ticket)
    reaped = reaped + 1
  end
end
for _, queue in ipairs(queues) do
  for _, ticket in ipairs(redis.call('ZRANGE', queue, 0, -1)) do
    if not alive(ticket) then
      dequeue(ticket)
      reaped = reaped + 1
    end
  end
end
local granted = grant_next(view_at(2))
return {reaped, granted, depth(), mean()}
"""
)

# ARGV: prefix, new ticket, old ticket, replica: a request still running here after this
# node rejoined; 0 when the ledger still counts it under its old ticket (kept), 1 when it
# is counted under the new one (the ledger lost it, or reaps the old epoch's)
_CLAIM = (
    _PRELUDE
    + """
if not alive(ARGV[2]) then return -1 end
if redis.call('HEXISTS', leases, ARGV[3]) == 1 and alive(ARGV[3]) then return 0 end
if redis.call('HEXISTS', leases, ARGV[2]) == 1 then return 1 end
grant(ARGV[2], ARGV[4])
return 1
"""
)

_PRIORITY = {Priority.INTERACTIVE: "i", Priority.BATCH: "b"}


def replica_view(replicas: Sequence[ReplicaState]) -> list[str | int]:
    """ARGV's tail: each replica's id and the slots it serves now, in configured order."""
    view: list[str | int] = []
    for replica in replicas:
        view += (replica.replica_id, replica.slots if replica.ready else 0)
    return view


class PoolLedger:
    """One pool's scripts, bound to its keys. Every call may raise the store's errors
    (``ConnectionError``, ``resp.ReplyError``): the caller owns the timeout and what a
    failure means."""

    def __init__(self, client: RespClient, *, prefix: str, pool_id: str) -> None:
        self._client = client
        self.prefix = prefix
        self.pool_id = pool_id
        self._keys = [f"{prefix}:pool:{pool_id}"]
        self._admit = client.script(_ADMIT)
        self._release = client.script(_RELEASE)
        self._abandon = client.script(_ABANDON)
        self._sync = client.script(_SYNC)
        self._claim = client.script(_CLAIM)

    async def admit(
        self,
        ticket: str,
        priority: Priority,
        capacity: int,
        avoid: Collection[str],
        view: list[str | int],
    ) -> list[Any]:
        """``[b'G', replica]`` granted, ``[b'Q', position, mean]`` queued, ``[b'F',
        depth, mean]`` full, ``[b'X']`` when this ticket's node is no member."""
        args = [self.prefix, ticket, _PRIORITY[priority], capacity, ",".join(avoid), *view]
        result: list[Any] = await self._client.evalsha(self._admit, self._keys, args)
        return result

    async def release(self, ticket: str, held_s: float | None, view: list[str | int]) -> Any:
        """Free the lease, learn its duration, grant whoever is next (how many)."""
        held = "" if held_s is None else f"{held_s:.6f}"
        args = [self.prefix, ticket, held, *view]
        return await self._client.evalsha(self._release, self._keys, args)

    async def abandon(self, ticket: str, view: list[str | int]) -> Any:
        """The ticket's place, or its lease, given back."""
        return await self._client.evalsha(self._abandon, self._keys, [self.prefix, ticket, *view])

    async def sync(self, view: list[str | int]) -> Any:
        """Reap dead nodes' tickets, then grant what is free: ``[reaped, granted, depth,
        mean]``."""
        return await self._client.evalsha(self._sync, self._keys, [self.prefix, *view])

    async def claim(self, old: str, new: str, replica_id: str) -> Any:
        """Count a running request again after a rejoin (``_CLAIM``)."""
        args = [self.prefix, new, old, replica_id]
        return await self._client.evalsha(self._claim, self._keys, args)
