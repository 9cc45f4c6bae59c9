"""Service-rate estimates behind ``Retry-After`` and ``predicted_start_ms``. Pure.

The pool's mean service time is an EWMA of observed lease durations; its throughput is
``total slots / mean service time``; the wait for queue position ``p`` is ``p / throughput``.
Until a request has finished the prior (``initial_service_s``) stands in.
"""

from __future__ import annotations

import math

RETRY_AFTER_MIN_S = 1
RETRY_AFTER_MAX_S = 120  # openai-python v3 gives up at once above 120 s


class ServiceRate:
    __slots__ = ("_alpha", "mean_service_s", "observations")

    def __init__(self, *, initial_service_s: float = 1.0, alpha: float = 0.2) -> None:
        self.mean_service_s = initial_service_s
        self._alpha = alpha
        self.observations = 0

    def observe(self, duration_s: float) -> None:
        if duration_s < 0:
            return
        if self.observations == 0:
            self.mean_service_s = duration_s
        else:
            self.mean_service_s += self._alpha * (duration_s - self.mean_service_s)
        self.observations += 1

    def wait_s(self, position: int, total_slots: int) -> float:
        """Expected seconds until the request at 1-based ``position`` in the queue starts."""
        if position <= 0:
            return 0.0
        return position * self.mean_service_s / max(total_slots, 1)


def retry_after_seconds(wait_s: float) -> int:
    """Whole seconds for ``Retry-After``, clamped to 1..120."""
    return max(RETRY_AFTER_MIN_S, min(RETRY_AFTER_MAX_S, math.ceil(wait_s)))
