"""Jobs: long lifecycle actions (load, unload, pool reload) answered at once with an id.

``POST /v1/models/{id}/load`` and ``POST /v1/pools/{id}/reload`` answer ``202`` with a job;
``GET /v1/jobs/{id}`` shows its phase (queued, starting, loading, warming_up, ready or
swapped / draining, unloading, unloaded / failed) and how long each phase took. The book
keeps the last ``MAX_JOBS``; an older id is a 404.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from typing import Any

MAX_JOBS = 512
DONE_PHASES = frozenset({"ready", "unloaded", "swapped", "failed"})


class Job:
    __slots__ = ("created_at", "done", "error", "id", "kind", "model", "phase", "phases", "result")

    def __init__(self, kind: str, model: str) -> None:
        self.id = uuid.uuid4().hex
        self.kind = kind  # "load" | "unload" | "reload"
        self.model = model  # the model (a reload: the pool)
        self.created_at = time.time()
        self.phase = "queued"
        self.phases: list[tuple[str, float]] = [("queued", time.monotonic())]
        self.error: str | None = None
        self.result: dict[str, Any] = {}
        self.done = asyncio.Event()

    def advance(self, phase: str, **result: Any) -> None:
        if self.done.is_set():
            return
        self.phase = phase
        self.phases.append((phase, time.monotonic()))
        self.result.update(result)
        if phase in DONE_PHASES:
            self.done.set()

    def fail(self, error: str) -> None:
        self.error = error
        self.advance("failed")

    @property
    def succeeded(self) -> bool:
        return self.done.is_set() and self.error is None

    def view(self) -> dict[str, Any]:
        start = self.phases[0][1]
        timeline = [
            {"phase": phase, "at_ms": round((at - start) * 1000, 1)} for phase, at in self.phases
        ]
        return {
            "id": self.id,
            "object": "job",
            "kind": self.kind,
            "model": self.model,
            "phase": self.phase,
            "status": "failed" if self.error else "done" if self.done.is_set() else "running",
            "created_at": round(self.created_at, 3),
            "duration_ms": timeline[-1]["at_ms"],
            "phases": timeline,
            "error": self.error,
            **self.result,
        }


class JobBook:
    def __init__(self, limit: int = MAX_JOBS) -> None:
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._limit = limit

    def create(self, kind: str, model: str) -> Job:
        job = Job(kind, model)
        self._jobs[job.id] = job
        while len(self._jobs) > self._limit:
            self._jobs.popitem(last=False)
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def recent(self, limit: int = 50) -> list[Job]:
        return list(self._jobs.values())[-limit:][::-1]
