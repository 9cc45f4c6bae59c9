"""Lifecycle control plane: pool reloads, reservations, config reload, hardware.

``POST /v1/pools/{id}/reload``          swap a pool (body: nothing, a variant, or settings)
``GET|POST|DELETE /v1/pools/{id}/reservation``  the swap lock (token in X-Reservation-Token)
``POST /v1/config/reload``              re-read the config file (also on SIGHUP)
``GET /v1/hardware``                    what ``orchgate hw`` prints, as JSON

Behaviour lives in ``gateway.lifecycle``, ``policies.reservation`` and
``backends.hardware``; this module parses, authorises and renders.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, delete, get, post
from msgspec import Meta

from backends.base import Strict
from backends.hardware import HardwareProfile, detect
from gateway.errors import (
    TOO_DEEP,
    Conflict,
    GatewayError,
    InvalidJson,
    InvalidRequest,
    LockedError,
    NotFound,
    StoreUnavailable,
)
from gateway.lifecycle import Lifecycle, ReloadRequest
from gateway.lifecycle.manager import ReservationStore
from policies.reservation import Locked, Reservation, ReservationBook, Taken

TOKEN_HEADER = "x-reservation-token"
_HARDWARE_CACHE_S = 30.0


class ReserveRequest(Strict, frozen=True):
    holder: Annotated[str, Meta(min_length=1, max_length=128)]
    ttl_s: Annotated[float, Meta(ge=1, le=86_400)] = 600.0


def _decode(raw: bytes, kind: type[Any]) -> Any:
    if not raw.strip():
        return None
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"invalid body: {exc}") from None
    except msgspec.DecodeError as exc:
        raise InvalidJson(f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidJson(TOO_DEEP) from None


# what a reload body could once carry: settings that name programs, files, addresses and
# environment variables. They come from the operator's config file only.
_CONFIG_FILE_ONLY = ("models", "replicas", "max_context_tokens", "launch", "url", "model_path",
                     "api_key_env", "engine")  # fmt: skip


_UNKNOWN_FIELD = re.compile(r"unknown field `([^`]+)`")


def _decode_reload(raw: bytes) -> ReloadRequest | None:
    """The reload body; a field only the config file may set gets a 400 that says so (the
    strict decode refuses it anyway, as any unknown field)."""
    try:
        return _decode(raw, ReloadRequest)  # type: ignore[no-any-return]
    except InvalidJson:
        raise
    except InvalidRequest as error:
        unknown = _UNKNOWN_FIELD.search(error.message)
        if unknown is None or unknown[1] not in _CONFIG_FILE_ONLY:
            raise
        name = unknown[1]
        raise InvalidRequest(
            f"'{name}' cannot be set over HTTP: what runs (programs, files, addresses) comes "
            "from the config file only. Define a [[pools.variants]] there and reload with "
            '{"variant": "<id>"}',
            param=name,
        ) from None


def _flag(request: Request[Any, Any, Any], name: str) -> bool:
    return request.query_params.get(name, "").lower() in ("1", "true", "yes")


class _HardwareCache:
    """Probing takes an NVML session and a few files: once per 30 s is plenty."""

    def __init__(self) -> None:
        self._profile: HardwareProfile | None = None
        self._at = 0.0

    async def get(self, lifecycle: Lifecycle, refresh: bool) -> HardwareProfile:
        now = time.monotonic()
        if refresh or self._profile is None or now - self._at > _HARDWARE_CACHE_S:
            self._profile = await asyncio.to_thread(detect, lifecycle.state.config.hardware)
            self._at = now
        return self._profile


def lifecycle_handlers(lifecycle: Lifecycle, *, guards: list[Any], admin: list[Any]) -> list[Any]:
    """``guards`` admit the data token (read-only routes, reservations); ``admin`` the admin
    token (anything that changes what runs)."""
    hardware_cache = _HardwareCache()

    @post("/v1/pools/{pool_id:str}/reload", guards=admin, status_code=202)
    async def reload_pool(pool_id: str, request: Request[Any, Any, Any]) -> Response[Any]:
        """Blue-green swap. Answers ``202`` with a job at once (``GET /v1/jobs/{id}``);
        ``?wait=true``: when the new set serves (200), or with why it did not (409)."""
        body: ReloadRequest | None = _decode_reload(await request.body())
        token = request.headers.get(TOKEN_HEADER)
        if _flag(request, "wait"):
            return Response(await lifecycle.reload_pool(pool_id, body, token), status_code=200)
        job = lifecycle.start_reload(pool_id, body, token)
        return Response(job.view(), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})

    @post("/v1/config/reload", guards=admin, status_code=200)
    async def reload_config(request: Request[Any, Any, Any]) -> dict[str, Any]:
        return await lifecycle.reload_config(request.headers.get(TOKEN_HEADER))

    @get("/v1/hardware", guards=guards)
    async def hardware(request: Request[Any, Any, Any]) -> dict[str, Any]:
        """Detected once per 30 s (``?refresh=true`` probes now); the config's
        ``[hardware]`` keys win."""
        profile = await hardware_cache.get(lifecycle, _flag(request, "refresh"))
        return msgspec.to_builtins(profile)  # type: ignore[no-any-return]

    return [reload_pool, reload_config, hardware, *_reservation_handlers(lifecycle, guards)]


def _reservation_handlers(lifecycle: Lifecycle, guards: list[Any]) -> list[Any]:
    state = lifecycle.state
    book = lifecycle.reservations

    def known(pool_id: str) -> None:
        if pool_id not in state.pools:
            raise NotFound(f"no pool {pool_id!r}", param="pool_id")

    @get("/v1/pools/{pool_id:str}/reservation", guards=guards)
    async def reservation(pool_id: str) -> dict[str, Any]:
        known(pool_id)
        held = book.get(pool_id)
        return {"pool": pool_id, **(held.view(book.now()) if held else {"reserved": False})}

    @post("/v1/pools/{pool_id:str}/reservation", guards=guards)
    async def reserve(pool_id: str, request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
        """Reserve (201, with the token: keep it) or renew with the token (200)."""
        known(pool_id)
        body: ReserveRequest | None = _decode(await request.body(), ReserveRequest)
        if body is None:
            raise InvalidRequest("send {'holder': '...', 'ttl_s': 600}", param="holder")
        token = request.headers.get(TOKEN_HEADER)
        renewing = book.get(pool_id) is not None
        try:
            held, token = book.reserve(pool_id, body.holder, body.ttl_s, token)
        except Taken as exc:
            raise Conflict(
                str(exc), extra={"reservation": exc.reservation.view(book.now())}
            ) from None
        await _stored(lifecycle.reservation_store, book, held, body.ttl_s, renewing=renewing)
        return Response(
            {"pool": pool_id, "token": token, **held.view(book.now())},
            status_code=200 if renewing else 201,
        )

    @delete("/v1/pools/{pool_id:str}/reservation", guards=guards, status_code=204)
    async def release(pool_id: str, request: Request[Any, Any, Any]) -> None:
        """The holder releases with its token; ``?force=true`` is the operator's override."""
        known(pool_id)
        force = _flag(request, "force")
        if force:  # the operator's override: admin only
            lifecycle.auth.check_admin(request.headers.get("authorization", "").encode() or None)
        try:
            book.release(pool_id, request.headers.get(TOKEN_HEADER), force=force)
        except Locked as exc:
            raise LockedError(
                str(exc), extra={"reservation": exc.reservation.view(book.now())}
            ) from None
        await _dropped(lifecycle.reservation_store, pool_id)

    return [reservation, reserve, release]


async def _stored(
    store: ReservationStore | None,
    book: ReservationBook,
    held: Reservation,
    ttl_s: float,
    *,
    renewing: bool,
) -> None:
    """A cluster's reservation is answered only once the next leader could find it; if it
    cannot be stored, a new one is withdrawn (the caller retries) and 503 says so."""
    if store is None:
        return
    try:
        await _store_call(store.save(held, ttl_s))
    except GatewayError:
        if not renewing:
            book.release(held.pool_id, None, force=True)
        raise


async def _dropped(store: ReservationStore | None, pool_id: str) -> None:
    """Released from the cluster store too -- also when this node had none (idempotent)."""
    if store is not None:
        await _store_call(store.drop(pool_id))


async def _store_call(call: Awaitable[None]) -> None:
    try:
        await call
    except Exception as exc:  # noqa: BLE001 -- the store's failure, in the gateway's words
        raise StoreUnavailable(
            f"the cluster store did not take it ({type(exc).__name__}); try again",
            headers={"Retry-After": "1"},
        ) from None
