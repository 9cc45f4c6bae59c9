"""The gateway's own view of one replica: readiness and slot accounting.

Written by three owners only: the health monitor (``ready``, ``slots``,
``engine_version``, ``detail``, the ejection fields), the admission queue (``in_use``)
the dispatcher, which resets ``failures`` when a request succeeds and counts ``placed``,
and the relays, which add ``tokens_in``/``tokens_out`` when an exchange ends. All run on
the one event loop, so no lock is needed; nothing here awaits.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from backends.base import Backend
from backends.gpu import GpuSample


class ReplicaState:
    """Mutable runtime state of one replica, next to its adapter."""

    __slots__ = (
        "backend",
        "detail",
        "ejected_until",
        "ejections",
        "engine_version",
        "errors",
        "ejected_total",
        "failures",
        "accelerator",
        "gpu",
        "in_use",
        "placed",
        "ready",
        "slots",
        "tokens_in",
        "tokens_out",
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
        # counters for GET /metrics, written by the dispatcher and the relays
        self.placed: Counter[str] = Counter()  # requests placed here, by priority
        self.tokens_in = 0
        self.tokens_out = 0
        self.errors: Counter[str] = Counter()  # failed attempts by kind
        self.ejected_total = 0
        self.gpu: GpuSample | None = None  # latest NVML sample (replicas with gpu_device)
        self.accelerator: dict[str, Any] | None = None  # what the engine reports (NPU worker)

    def add_tokens(self, tokens_in: int, tokens_out: int) -> None:
        self.tokens_in += tokens_in
        self.tokens_out += tokens_out

    @property
    def replica_id(self) -> str:
        return self.backend.replica_id

    @property
    def engine(self) -> str:
        return self.backend.engine

    @property
    def free_slots(self) -> int:
        return self.slots - self.in_use if self.ready else 0
