"""Residency: what may run at once, decided by memory -- which models to unload so that
another one fits, least recently used first.

Each loaded model holds its fit estimate (``policies.fit``) on one device ("cpu" for RAM,
"cuda:N" for a GPU). To make room for a model, idle models are chosen first, least
recently used first (ties by id, so a plan is reproducible); busy ones only when idle ones
are not enough -- the caller drains those (no new requests, in-flight ones finish) before
it unloads them. Pinned models and models still loading are never chosen. ``max_loaded``
bounds how many run at once, whatever the memory.

Pure: no I/O, no clock (times are given).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import msgspec


class Resident(msgspec.Struct, frozen=True):
    model_id: str
    device: str
    bytes: int
    last_used: float
    busy: bool = False  # requests in flight or queued
    pinned: bool = False
    loading: bool = False


class Verdict(enum.StrEnum):
    FITS = "fits"  # load now
    MAKE_ROOM = "make_room"  # unload ``evict`` now, drain ``drain``; then load
    IMPOSSIBLE = "impossible"  # nothing that may be unloaded makes enough room


class RoomPlan(msgspec.Struct, frozen=True):
    verdict: Verdict
    device: str
    evict: list[str] = []  # idle: unload now
    drain: list[str] = []  # busy: stop admitting, unload once in-flight requests finish
    reason: str = ""


def plan_room(
    need: int,
    device: str,
    budget: int,
    residents: Sequence[Resident],
    *,
    max_loaded: int | None = None,
) -> RoomPlan:
    """Room for ``need`` bytes on ``device`` (``budget`` bytes in all)."""
    if need > budget:
        return RoomPlan(
            Verdict.IMPOSSIBLE, device,
            reason=f"needs {_mib(need)}, more than {device}'s whole budget of {_mib(budget)}",
        )  # fmt: skip
    free = budget - sum(r.bytes for r in residents if r.device == device)
    over_count = 0 if max_loaded is None else len(residents) + 1 - max_loaded
    if free >= need and over_count <= 0:
        return RoomPlan(Verdict.FITS, device)
    chosen, free = _choose(need, device, free, over_count, residents)
    if free < need or len(chosen) < over_count:
        held = [r.model_id for r in residents if (r.pinned or r.loading) and r.device == device]
        why = (
            f"needs {_mib(need)} on {device}; {_mib(free)} could be freed"
            if free < need
            else f"catalog.max_loaded={max_loaded} models already run"
        )
        if held:
            why += f" (pinned, reserved or loading: {', '.join(sorted(held))})"
        return RoomPlan(Verdict.IMPOSSIBLE, device, reason=why)
    return RoomPlan(
        Verdict.MAKE_ROOM,
        device,
        evict=[r.model_id for r in chosen if not r.busy],
        drain=[r.model_id for r in chosen if r.busy],
    )


def _choose(
    need: int, device: str, free: int, over_count: int, residents: Sequence[Resident]
) -> tuple[list[Resident], int]:
    """Which models to unload: memory first (only this device's free any), then the
    count (any device); idle before busy, least recently used first."""
    movable = sorted(
        (r for r in residents if not r.pinned and not r.loading),
        key=lambda r: (r.busy, r.last_used, r.model_id),
    )
    chosen: list[Resident] = []
    for resident in movable:
        if free >= need:
            break
        if resident.device == device:
            chosen.append(resident)
            free += resident.bytes
    for resident in movable:
        if len(chosen) >= over_count:
            break
        if resident not in chosen:
            chosen.append(resident)
    return chosen, free


def choose_device(
    need: int, budgets: dict[str, int], residents: Sequence[Resident], **kwargs: int | None
) -> RoomPlan:
    """Among several devices (GPUs), the least-loaded one that fits now; else the one
    that needs the fewest unloads (then the most free memory; then its name)."""
    plans = {device: plan_room(need, device, budget, residents, **kwargs)
             for device, budget in budgets.items()}  # fmt: skip

    def free(device: str) -> int:
        return budgets[device] - sum(r.bytes for r in residents if r.device == device)

    possible = [p for p in plans.values() if p.verdict is not Verdict.IMPOSSIBLE]
    if not possible:
        reasons = "; ".join(p.reason for p in plans.values())
        return RoomPlan(Verdict.IMPOSSIBLE, "", reason=reasons or "no device to place it on")
    return min(
        possible,
        key=lambda p: (len(p.evict) + len(p.drain), len(p.drain), -free(p.device), p.device),
    )


def _mib(n: int) -> str:
    return f"{n / 1024**2:,.0f} MiB"
