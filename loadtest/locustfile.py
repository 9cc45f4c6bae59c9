"""Load test recipe for orchgate with Locust: OpenAI chat (streaming and not) and the
OrchQueue task API, as a mixed population of users.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8080            # web UI on :8089
    locust -f loadtest/locustfile.py --host http://127.0.0.1:8080 \\
        --headless -u 64 -r 8 -t 2m --csv results                            # headless, CSV

Environment: ORCHGATE_MODEL (default ``smollm2-135m``), ORCHGATE_API_TOKEN (sent as a
bearer token when set), ORCHGATE_MAX_TOKENS (default 64). A 429 or 503 from the gateway's
admission is counted as a failure named after the status, so overload is visible in the
report rather than hidden. Locust times a streamed request to its response headers, so
streams add two entries of their own: ``TTFT`` (to the first ``data:`` event) and ``DONE``
(to ``data: [DONE]``).
"""

from __future__ import annotations

import os
import time

from locust import HttpUser, between, task

MODEL = os.environ.get("ORCHGATE_MODEL", "smollm2-135m")
MAX_TOKENS = int(os.environ.get("ORCHGATE_MAX_TOKENS", "64"))
TOKEN = os.environ.get("ORCHGATE_API_TOKEN")
MESSAGES = [{"role": "user", "content": "Write two sentences about the sea."}]


def _headers(**extra: str) -> dict[str, str]:
    headers = {"Content-Type": "application/json", **extra}
    if TOKEN:
        headers["Authorization"] = f"Bearer {TOKEN}"
    return headers


class ChatUser(HttpUser):
    """An OpenAI SDK-like client: mostly streaming chats, some plain ones."""

    weight = 3
    wait_time = between(0.1, 0.5)

    @task(1)
    def chat(self) -> None:
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": MAX_TOKENS}
        with self.client.post(
            "/v1/chat/completions", json=body, headers=_headers(), name="chat",
            catch_response=True,
        ) as response:  # fmt: skip
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}")
            elif not response.json().get("choices"):
                response.failure("no choices")

    @task(3)
    def chat_stream(self) -> None:
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": MAX_TOKENS, "stream": True}
        started = time.perf_counter()
        first: float | None = None
        with self.client.post(
            "/v1/chat/completions", json=body, headers=_headers(), name="chat stream",
            stream=True, catch_response=True,
        ) as response:  # fmt: skip
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}")
                return
            last = b""
            try:
                for line in response.iter_lines():
                    if line.startswith(b"data: ") and first is None:
                        first = time.perf_counter()
                    if line:
                        last = line
            except Exception as exc:  # a broken stream is a failure in the report, not lost
                response.failure(f"stream broke: {exc!r}")
                return
            if last != b"data: [DONE]":
                response.failure(f"stream ended without [DONE]: {last[:80]!r}")
            elif b'"error"' in last:
                response.failure("in-band error")
        if first is not None:
            self._timing("TTFT", (first - started) * 1000)
            self._timing("DONE", (time.perf_counter() - started) * 1000)

    def _timing(self, kind: str, milliseconds: float) -> None:
        self.environment.events.request.fire(
            request_type=kind, name="chat stream", response_time=milliseconds,
            response_length=0, exception=None, context={},
        )  # fmt: skip


class TaskUser(HttpUser):
    """An OrchQueue v1 client: submit a task, follow its SSE stream to ``end``."""

    weight = 1
    wait_time = between(0.2, 1.0)

    @task
    def task_roundtrip(self) -> None:
        body = {"model_ref": MODEL, "prompt": "Once upon a time", "max_tokens": MAX_TOKENS}
        with self.client.post(
            "/v1/tasks", json=body, headers=_headers(), name="task submit", catch_response=True
        ) as response:
            if response.status_code != 202:
                response.failure(f"HTTP {response.status_code}")
                return
            task_id = response.json()["task_id"]
        with self.client.get(
            f"/v1/tasks/{task_id}/stream", headers=_headers(), name="task stream",
            stream=True, catch_response=True,
        ) as response:  # fmt: skip
            last_event = None
            try:
                for line in response.iter_lines():
                    if line.startswith(b"event: "):
                        last_event = line[7:].decode()
            except Exception as exc:  # a broken stream is a failure in the report, not lost
                response.failure(f"stream broke: {exc!r}")
                return
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}")
            elif last_event != "end":
                response.failure(f"task stream ended with {last_event!r}")
