"""Reading the task API's SSE stream the way a client does, for assertions."""

from __future__ import annotations

from typing import Any

import httpx
import msgspec


def parse_task_events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """``id: N`` / ``event: NAME`` / ``data: JSON`` frames, the ids dense from 1 (asserted);
    comment frames (keep-alives) are skipped."""
    return [(name, data) for _, name, data in parse_task_frames(raw)]


def parse_task_frames(raw: bytes) -> list[tuple[int, str, dict[str, Any]]]:
    """``(id, event, data)`` of every frame."""
    frames = []
    for frame in raw.split(b"\n\n"):
        if not frame or frame.startswith(b":"):
            continue
        ident, name, data = frame.split(b"\n", 2)
        assert ident.startswith(b"id: ") and name.startswith(b"event: "), frame
        assert data.startswith(b"data: "), frame
        frames.append((int(ident[4:]), name[7:].decode(), msgspec.json.decode(data[6:])))
    ids = [ident for ident, _, _ in frames]
    assert ids == list(range(ids[0], ids[0] + len(ids))) if ids else True, ids
    return frames


def read_task_events(
    base_url: str, task_id: str, timeout: float = 20, auth: dict[str, str] | None = None
) -> list[tuple[str, Any]]:
    """The whole stream of one task; asserts it is served as SSE."""
    url = f"{base_url}/v1/tasks/{task_id}/stream"
    with httpx.stream("GET", url, timeout=timeout, headers=auth) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        return parse_task_events(b"".join(r.iter_bytes()))
