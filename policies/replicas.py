"""The gateway's own view of one replica: readiness and slot accounting.

Written by four owners only: the health monitor (``ready``, ``slots``,
``engine_version``, ``detail``, the ejection fields), the admission queue (``in_use``),
the dispatcher, which resets ``failures`` when a request succeeds and counts ``placed``,
and the exchanges, which register their running streams in ``live`` and add the tokens
and the time to first byte when they end. All run on
the one event loop, so no lock is needed; nothing here awaits.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from typing import Any, NamedTuple

from backends.base import Backend, ModelFacts
from backends.gpu import GpuSample


class Counters(NamedTuple):
    """The monotonic counters of one replica, as ``GET /metrics`` exports them."""

    tokens_in: int
    tokens_out: int
    placed: Counter[str]
    errors: Counter[str]
    ejected_total: int

    def since(self, earlier: Counters) -> Counters:
        return Counters(
            self.tokens_in - earlier.tokens_in,
            self.tokens_out - earlier.tokens_out,
            self.placed - earlier.placed,
            self.errors - earlier.errors,
            self.ejected_total - earlier.ejected_total,
        )


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
        "first_byte_count",
        "first_byte_s_sum",
        "accelerator",
        "gpu",
        "in_use",
        "live",
        "model",
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
        # time to first byte, always (the status page's chart; histograms are extended)
        self.first_byte_s_sum = 0.0
        self.first_byte_count = 0
        # the token counts of streams still running (each has an ``events`` count), so
        # the status page's tokens/s moves while a long stream runs, not when it ends
        self.live: set[Any] = set()
        self.gpu: GpuSample | None = None  # latest NVML sample (replicas with gpu_device)
        self.accelerator: dict[str, Any] | None = None  # what the engine reports (NPU worker)
        self.model: ModelFacts | None = None  # context and capabilities the engine reports

    def counters(self) -> Counters:
        return Counters(
            self.tokens_in, self.tokens_out, Counter(self.placed), Counter(self.errors),
            self.ejected_total,
        )  # fmt: skip

    def add_counters(self, counters: Counters) -> None:
        """A reload replaced a replica of the same id: its totals continue here, so the
        ``*_total`` series never go backwards."""
        self.tokens_in += counters.tokens_in
        self.tokens_out += counters.tokens_out
        self.placed.update(counters.placed)
        self.errors.update(counters.errors)
        self.ejected_total += counters.ejected_total

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


# seconds: from a fast local replica's TTFT to a long generation
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Histogram:
    """A fixed-bucket histogram that costs one bisect per observation."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(LATENCY_BUCKETS, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
        return out


class ReplicaLatency:
    """Extended metrics only: time to first byte and whole-request duration."""

    __slots__ = ("duration", "ttft")

    def __init__(self) -> None:
        self.ttft = Histogram()
        self.duration = Histogram()
