"""The gateway's own view of one replica: readiness and slot accounting.

Written by three owners only: the health monitor (``ready``, ``slots``,
``engine_version``, ``detail``, the ejection fields), the admission queue (``in_use``)
and the dispatcher, which resets ``failures`` when a request succeeds. All run on the one
event loop, so no lock is needed; nothing here awaits.
"""

from __future__ import annotations

from backends.base import Backend


class ReplicaState:
    """Mutable runtime state of one replica, next to its adapter."""

    __slots__ = (
        "backend",
        "detail",
        "ejected_until",
        "ejections",
        "engine_version",
        "failures",
        "in_use",
        "ready",
        "slots",
    )

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.ready = False
        self.slots = backend.configured_slots or backend.default_slots
        self.in_use = 0
        self.engine_version: str | None = None
        self.detail: str | None = "not probed yet"
        self.failures = 0  # consecutive data-plane failures
        self.ejections = 0  # recent ejections; each one doubles the next cooldown
        self.ejected_until = 0.0  # time.monotonic(); probes cannot restore it before then

    @property
    def replica_id(self) -> str:
        return self.backend.replica_id

    @property
    def engine(self) -> str:
        return self.backend.engine

    @property
    def free_slots(self) -> int:
        return self.slots - self.in_use if self.ready else 0
