"""Placement: which ready replica a granted request goes to. Pure, synchronous, no I/O."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from policies.replicas import ReplicaState


def choose_replica(
    replicas: Sequence[ReplicaState], avoid: Collection[str] = ()
) -> ReplicaState | None:
    """The least-loaded ready replica with a free slot: most free slots wins, ties go to
    the first configured. Replicas in ``avoid`` (ones that just failed this request) are
    used only when no other replica has room."""
    best: ReplicaState | None = None
    fallback: ReplicaState | None = None
    for replica in replicas:
        free = replica.free_slots
        if free <= 0:
            continue
        if replica.replica_id in avoid:
            if fallback is None or free > fallback.free_slots:
                fallback = replica
        elif best is None or free > best.free_slots:
            best = replica
    return best or fallback
