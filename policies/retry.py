"""Retry policy: when a request that failed before its first byte is tried again.

Driven by tenacity (``AsyncRetrying``) with three decisions made here:

* **what** is retried: ``BackendError.retryable`` -- connect failures, resets and in-band
  errors before the first event, timeouts, upstream 5xx, 408, 409 and 429. Any other 4xx
  is the client's fault and goes back as it is.
* **whether** there is room: bounded attempts (fewer when the client says it is itself
  retrying, ``x-stainless-retry-count``), the request's overall deadline (an upstream
  ``Retry-After`` that does not fit is passed on instead of waited out), and a retry
  budget per pool: retries in flight are at most ``budget_ratio`` of the requests in
  flight, or ``budget_min``. A dead backend sees a trickle of retries, not a multiple of
  the offered load.
* **how long** to wait: exponential backoff with jitter; an upstream ``Retry-After`` when
  no other replica can take the retry.

Pure policy: no I/O, no HTTP. ``gateway.dispatch`` runs the attempts.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from backends.errors import BackendError

RETRY_COUNT_HEADER = b"x-stainless-retry-count"


class RetryBudget:
    """Caps concurrent retries at ``max(minimum, ratio * in_flight())`` for one pool."""

    __slots__ = ("_in_flight", "minimum", "ratio", "retrying", "refused")

    def __init__(self, ratio: float, minimum: int, in_flight: Callable[[], int]) -> None:
        self.ratio = ratio
        self.minimum = minimum
        self._in_flight = in_flight
        self.retrying = 0
        self.refused = 0  # retries the budget said no to, for metrics and tests

    def limit(self) -> int:
        return max(self.minimum, int(self.ratio * self._in_flight()))

    def try_acquire(self) -> bool:
        if self.retrying >= self.limit():
            self.refused += 1
            return False
        self.retrying += 1
        return True

    def release(self) -> None:
        self.retrying -= 1


def client_retry_count(value: bytes | None) -> int:
    """The OpenAI SDKs' ``x-stainless-retry-count``: how many times the client retried."""
    if value is None:
        return 0
    try:
        return max(0, int(value))
    except ValueError:
        return 0


def _is_retryable(error: BaseException) -> bool:
    return isinstance(error, BackendError) and error.retryable


class RetryPolicy:
    """One pool's retry settings and budget; ``attempts()`` makes the per-request loop."""

    def __init__(
        self,
        *,
        attempts: int,
        backoff_base_s: float,
        backoff_max_s: float,
        budget: RetryBudget,
    ) -> None:
        self.max_attempts = attempts
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.budget = budget

    def attempts_for(self, client_retries: int) -> int:
        """Each retry the client already made costs one of ours: a client on its third try
        gets one attempt, so the two retry loops never multiply."""
        return max(1, self.max_attempts - client_retries)

    def backoff_s(self, attempt: int) -> float:
        """Exponential with equal jitter: half fixed, half random."""
        ceiling = min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1))
        return float(ceiling / 2 + random.uniform(0, ceiling / 2))

    def attempts(
        self,
        *,
        client_retries: int,
        deadline: float,
        has_alternative: Callable[[], bool],
    ) -> RequestRetries:
        return RequestRetries(self, self.attempts_for(client_retries), deadline, has_alternative)


class RequestRetries:
    """The retry loop of one request. Iterate it like tenacity's ``AsyncRetrying``;
    call ``attempt_done()`` after every attempt (it returns a held budget token)."""

    __slots__ = ("_has_alternative", "_holding", "_retrying", "deadline", "max_attempts", "policy")

    def __init__(
        self,
        policy: RetryPolicy,
        max_attempts: int,
        deadline: float,
        has_alternative: Callable[[], bool],
    ) -> None:
        self.policy = policy
        self.max_attempts = max_attempts
        self.deadline = deadline
        self._has_alternative = has_alternative
        self._holding = False
        self._retrying = AsyncRetrying(
            retry=retry_if_exception(_is_retryable),
            wait=self._wait,
            stop=self._stop,
            reraise=True,
        )

    def __aiter__(self):  # type: ignore[no-untyped-def]
        return self._retrying.__aiter__()

    def _wait(self, state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        delay = self.policy.backoff_s(state.attempt_number)
        retry_after = getattr(error, "retry_after_s", None)
        if retry_after is not None and not self._has_alternative():
            # that replica asked for a pause and no other one can take the retry
            delay = max(delay, retry_after)
        return delay

    def _stop(self, state: RetryCallState) -> bool:
        if state.attempt_number >= self.max_attempts:
            return True
        loop = asyncio.get_running_loop()
        if loop.time() + state.upcoming_sleep >= self.deadline:
            return True  # the wait alone would pass the deadline: pass the error on now
        if not self.policy.budget.try_acquire():
            return True
        self._holding = True
        return False

    def attempt_done(self) -> None:
        if self._holding:
            self._holding = False
            self.policy.budget.release()
