"""Lifecycle webhooks: ``swap_complete`` / ``swap_failed`` POSTed to configured receivers.

Each delivery is a JSON body with three headers:

- ``X-Orchgate-Event``: the event name,
- ``X-Orchgate-Delivery``: an id that stays the same across retries (deduplicate on it),
- ``X-Orchgate-Timestamp``: Unix seconds when this attempt was signed,
- ``X-Orchgate-Signature``: ``sha256=`` + hex HMAC-SHA256 over ``{timestamp}.{body}`` with
  the receiver's secret. Receivers recompute it, compare in constant time and reject old
  timestamps (replays).

Deliveries run in the background with bounded retries (connection errors, 408, 429, 5xx;
1 s doubling, at most ``max_attempts``); they never delay or fail the reload that caused
them. At shutdown, pending deliveries get a short grace and are then dropped.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import time
import uuid
from typing import TYPE_CHECKING, Any

import msgspec

from gateway.config import WebhookConfig

if TYPE_CHECKING:
    import httpx

log = logging.getLogger("orchgate.webhooks")

SIGNATURE_HEADER = "X-Orchgate-Signature"
TIMESTAMP_HEADER = "X-Orchgate-Timestamp"
_RETRIED_STATUS = frozenset({408, 425, 429})
_SHUTDOWN_GRACE_S = 2.0
_MAX_PENDING = 1000


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(
    secret: bytes, timestamp: str, body: bytes, signature: str, *, max_age_s: float = 300
) -> bool:
    """The receiver's side, for Python receivers and the tests."""
    try:
        ts = int(timestamp)
    except ValueError:
        return False
    if abs(time.time() - ts) > max_age_s:
        return False
    return hmac.compare_digest(sign(secret, ts, body), signature)


def redact(url: str) -> str:
    """A webhook URL as logs may show it: scheme, host and the first path segment. Many
    receivers (Slack, Discord, Teams) carry their secret in the rest of the path or the
    query."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "<webhook>"
    host, _, path = rest.partition("/")
    host = host.rpartition("@")[2]  # never credentials in the authority
    first = path.split("?", 1)[0].split("/", 1)[0]
    tail = "/…" if "/" in path or "?" in path else ""
    return f"{scheme}://{host}/{first}{tail}" if first else f"{scheme}://{host}/"


class _Receiver:
    __slots__ = ("config", "secret")

    def __init__(self, config: WebhookConfig) -> None:
        self.config = config
        secret = config.secret
        if secret is None and config.secret_env is not None:
            secret = os.environ.get(config.secret_env)
            if not secret:
                log.error(
                    "webhook %s: %s is not set; its deliveries are unsigned and will be "
                    "rejected by a verifying receiver",
                    redact(config.url),
                    config.secret_env,
                )
        self.secret = (secret or "").encode()


class Webhooks:
    """Owns the HTTP client and the background deliveries."""

    def __init__(self, configs: list[WebhookConfig], *, backoff_s: float = 1.0) -> None:
        self._receivers = [_Receiver(c) for c in configs]
        self._backoff_s = backoff_s
        self._client: httpx.AsyncClient | None = None  # made at the first delivery
        self._pending: set[asyncio.Task[None]] = set()
        self.delivered = 0
        self.failed = 0

    def configure(self, configs: list[WebhookConfig]) -> None:
        """A reloaded config's receivers apply to the next event (deliveries in flight keep
        theirs)."""
        self._receivers = [_Receiver(c) for c in configs]

    def emit(self, event: str, payload: dict[str, Any]) -> None:
        """Queue ``event`` for every receiver that wants it; returns at once."""
        receivers = [r for r in self._receivers if event in r.config.events]
        if not receivers:
            return
        body = msgspec.json.encode({"event": event, "sent_at": round(time.time(), 3), **payload})
        delivery = uuid.uuid4().hex
        for receiver in receivers:
            if len(self._pending) >= _MAX_PENDING:
                log.error(
                    "webhook backlog full: dropping %s for %s", event, redact(receiver.config.url)
                )
                self.failed += 1
                continue
            task = asyncio.create_task(self._deliver(receiver, event, delivery, body))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _deliver(self, receiver: _Receiver, event: str, delivery: str, body: bytes) -> None:
        import httpx  # here: a gateway without webhooks never pays its import (~5 MB)

        if self._client is None:
            self._client = httpx.AsyncClient(follow_redirects=False)
        config = receiver.config
        backoff = self._backoff_s
        for attempt in range(1, config.max_attempts + 1):
            now = int(time.time())
            headers = {
                "Content-Type": "application/json",
                "User-Agent": "orchgate-webhooks",
                "X-Orchgate-Event": event,
                "X-Orchgate-Delivery": delivery,
                "X-Orchgate-Attempt": str(attempt),
                TIMESTAMP_HEADER: str(now),
                SIGNATURE_HEADER: sign(receiver.secret, now, body),
            }
            try:
                response = await self._client.post(
                    config.url, content=body, headers=headers, timeout=config.timeout_s
                )
                status: int | None = response.status_code
            except httpx.HTTPError as exc:
                status, outcome = None, type(exc).__name__
            else:
                outcome = f"HTTP {status}"
            if status is not None and 200 <= status < 300:
                self.delivered += 1
                log.info(
                    "webhook %s delivered to %s (attempt %s)", event, redact(config.url), attempt
                )
                return
            if status is not None and status < 500 and status not in _RETRIED_STATUS:
                break  # the receiver refused it; the same body will not fare better
            if attempt < config.max_attempts:
                await asyncio.sleep(backoff)
                backoff *= 2
        self.failed += 1
        log.warning(
            "webhook %s to %s failed after %s attempts: %s",
            event,
            redact(config.url),
            attempt,
            outcome,
        )

    async def aclose(self) -> None:
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=_SHUTDOWN_GRACE_S)
        for task in list(self._pending):
            task.cancel()
        await asyncio.gather(*self._pending, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None
