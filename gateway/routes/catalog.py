"""Models on demand, control plane (admin token for anything that changes what runs).

``POST /v1/models/{id}/load``     202 + a job (``?wait=true``: answers when it is done;
                                  ``?replace=OTHER``: a swap, OTHER unloads to make room)
``POST /v1/models/{id}/unload``   202 + a job; in-flight requests finish first. A reserved
                                  model needs its holder's X-Reservation-Token (423)
``GET /v1/jobs/{id}`` / ``GET /v1/jobs``   a job's phases and timings / the recent ones
                                  (loads, unloads and pool reloads)
``GET /v1/catalog`` (admin)       every catalog model with its metadata, memory estimate,
                                  status and suggested launch flags; what was skipped
``GET /v1/catalog/rank`` (admin)  every model on every device: fit, estimated speed, in order
``POST /v1/catalog/rescan``       scan the catalog folders again

Model ids may hold slashes (``org/name``): the action is the path's last segment. No body
is read: a request never names a file, a program or an address.
"""

from __future__ import annotations

import asyncio
from typing import Any

from litestar import Request, Response, get, post

from backends.hardware import detect
from gateway.catalog_report import ranked_rows
from gateway.errors import InvalidRequest, NotFound
from gateway.jobs import Job, JobBook
from gateway.residency import Residency
from gateway.routes.lifecycle import TOKEN_HEADER as RESERVATION_HEADER
from policies.ranking import JOBS

_ACTIONS = ("load", "unload")


def _answer(job: Job) -> Response[dict[str, Any]]:
    """202 while it runs; 200 once done (409 when it failed), with where to follow it."""
    status = (200 if job.succeeded else 409) if job.done.is_set() else 202
    return Response(job.view(), status_code=status, headers={"Location": f"/v1/jobs/{job.id}"})


def _start(catalog: Residency, rest: str, request: Request[Any, Any, Any]) -> Job:
    model_id, _, action = rest.strip("/").rpartition("/")
    if action not in _ACTIONS or not model_id:
        raise InvalidRequest(
            "use POST /v1/models/{id}/load or /v1/models/{id}/unload", param="action"
        )
    token = request.headers.get(RESERVATION_HEADER)
    if action == "unload":
        return catalog.request_unload(model_id, token)
    replace = request.query_params.get("replace")
    if replace:  # a swap: that model drains and unloads, this one loads in its room
        return catalog.request_swap(replace, model_id, token)
    return catalog.request_load(model_id)


def _rank_query(request: Request[Any, Any, Any]) -> tuple[str | None, int | None]:
    job = request.query_params.get("job")
    if job is not None and job not in JOBS:
        raise InvalidRequest(f"job must be one of {', '.join(JOBS)}", param="job")
    raw = request.query_params.get("context")
    if raw is not None and not (raw.isdigit() and 128 <= int(raw) <= 1_048_576):
        raise InvalidRequest("context must be a number of tokens, 128..1048576", param="context")
    return job, int(raw) if raw else None


def catalog_handlers(
    residency: Residency | None, jobs: JobBook, *, guards: list[Any], admin: list[Any]
) -> list[Any]:
    def owner() -> Residency:
        if residency is None:
            raise NotFound("this gateway has no [catalog]; models come from [[pools]] only")
        return residency

    @post("/v1/models/{rest:path}", guards=admin, status_code=202)
    async def model_action(rest: str, request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
        job = _start(owner(), rest, request)
        if request.query_params.get("wait", "").lower() in ("1", "true", "yes"):
            await asyncio.shield(job.done.wait())
        return _answer(job)

    @get("/v1/catalog", guards=admin)  # file paths and memory: the operator's view
    async def catalog() -> dict[str, Any]:
        return owner().view()

    @get("/v1/catalog/rank", guards=admin)
    async def ranking(request: Request[Any, Any, Any]) -> dict[str, Any]:
        """What runs best here (as ``orchgate models rank``): ``?job=chat|embed|vision``,
        ``?context=N``."""
        catalog = owner()
        job, context = _rank_query(request)
        hardware = catalog.hardware
        if hardware is None:
            hardware = await asyncio.to_thread(detect)
        report = await asyncio.to_thread(
            ranked_rows, catalog.catalog, hardware, job=job, context=context
        )
        return {"object": "list", "data": report["models"], "scores": report["scores"]}

    @post("/v1/catalog/rescan", guards=admin, status_code=200)
    async def rescan() -> dict[str, Any]:
        return await owner().rescan()

    return [model_action, catalog, ranking, rescan, *_job_handlers(jobs, guards)]


def _job_handlers(book: JobBook, guards: list[Any]) -> list[Any]:
    @get("/v1/jobs/{job_id:str}", guards=guards)
    async def job(job_id: str) -> dict[str, Any]:
        found = book.get(job_id)
        if found is None:
            raise NotFound(f"no job {job_id!r} (finished jobs are kept for a while)")
        return found.view()

    @get("/v1/jobs", guards=guards)
    async def recent_jobs() -> dict[str, Any]:
        return {"object": "list", "data": [j.view() for j in book.recent()]}

    return [job, recent_jobs]
