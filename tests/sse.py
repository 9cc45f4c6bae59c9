"""Reading the task API's SSE stream the way a client does, for assertions."""

from __future__ import annotations

from typing import Any

import httpx
import msgspec


def parse_task_events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """``event: NAME`` / ``data: JSON`` frames; comment frames (keep-alives) are skipped."""
    events = []
    for frame in raw.split(b"\n\n"):
        if not frame or frame.startswith(b":"):
            continue
        name, data = frame.split(b"\n", 1)
        assert name.startswith(b"event: ") and data.startswith(b"data: "), frame
        events.append((name[7:].decode(), msgspec.json.decode(data[6:])))
    return events


def read_task_events(
    base_url: str, task_id: str, timeout: float = 20, auth: dict[str, str] | None = None
) -> list[tuple[str, Any]]:
    """The whole stream of one task; asserts it is served as SSE."""
    url = f"{base_url}/v1/tasks/{task_id}/stream"
    with httpx.stream("GET", url, timeout=timeout, headers=auth) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        return parse_task_events(b"".join(r.iter_bytes()))
