"""Placement: which ready replica a granted request goes to. Pure, synchronous, no I/O."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from policies.replicas import ReplicaState


def choose_replica(
    replicas: Sequence[ReplicaState], avoid: Collection[str] = ()
) -> ReplicaState | None:
    """The least-loaded ready replica with a free slot: most free slots wins; on a tie,
    the GPU with more free VRAM, then the less busy one (where NVML knows the GPU); then
    the first configured. Replicas in ``avoid`` (ones that just failed this request) are
    used only when no other replica has room."""
    best: ReplicaState | None = None
    fallback: ReplicaState | None = None
    for replica in replicas:
        free = replica.free_slots
        if free <= 0:
            continue
        if replica.replica_id in avoid:
            if fallback is None or _less_loaded(replica, free, fallback):
                fallback = replica
        elif best is None or _less_loaded(replica, free, best):
            best = replica
    return best or fallback


def _less_loaded(replica: ReplicaState, free: int, than: ReplicaState) -> bool:
    other = than.free_slots
    if free != other:
        return free > other
    gpu, other_gpu = replica.gpu, than.gpu
    if gpu is None or other_gpu is None:
        return False
    if gpu.vram_free_bytes != other_gpu.vram_free_bytes:
        return gpu.vram_free_bytes > other_gpu.vram_free_bytes
    return gpu.utilization_pct < other_gpu.utilization_pct
