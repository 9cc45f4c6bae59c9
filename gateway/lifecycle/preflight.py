"""Checks a reload makes before anything starts: the new set's addresses (a managed
replica is moved to a free port while the set it replaces still holds its own) and whether
its models fit the free VRAM of their GPUs."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any

import msgspec

from backends.gpu import Nvml
from backends.http1 import address
from backends.model_file import ModelFileError, read_model
from backends.openai_compat import replica_root
from backends.registry import ReplicaConfig
from gateway.errors import Conflict
from gateway.lifecycle.transition import Change
from gateway.state import GatewayState
from policies.fit import FitEstimate, estimate, launch_settings

log = logging.getLogger("orchgate.lifecycle")


class InsufficientMemory(Conflict):
    code = "insufficient_vram"


def relocate_ports(state: GatewayState, changes: list[Change]) -> None:
    """A managed replica whose address the running (or retiring) sets still hold is
    launched on a free port instead: both sets must run side by side until the switch.
    A set replaced in place (``replace``) is stopped first: its addresses are reused."""
    replaced = {id(c.old) for c in changes if c.strategy == "replace"}
    held = {
        address(replica.backend.root)  # type: ignore[attr-defined]
        for pool in state.running_pools()
        if id(pool) not in replaced
        for replica in pool.replicas
    }
    for change in changes:
        if change.target is None:
            continue
        replicas = []
        for replica in change.target.replicas:
            host, port = address(replica_root(replica.url))
            if replica.launch is not None and (host, port) in held:
                free = _free_port(host)
                url = replica.url.replace(f":{port}", f":{free}", 1)
                log.info(
                    "replica %s: %s:%s is in use; launching on port %s",
                    replica.id,
                    host,
                    port,
                    free,
                )
                replica = msgspec.structs.replace(replica, url=url)
            held.add(address(replica_root(replica.url)))
            replicas.append(replica)
        change.target = msgspec.structs.replace(change.target, replicas=replicas)


async def check_fit(
    changes: list[Change], free_vram: Callable[[int], tuple[int, int] | None]
) -> list[str]:
    """Refuse a set that cannot fit in its GPUs' free VRAM; returns warnings for what
    could not be checked."""
    warnings: list[str] = []
    needs: dict[int, list[tuple[str, FitEstimate, float | None]]] = {}
    # what sets replaced in place give back before the new ones start
    freed: dict[int, list[tuple[str, FitEstimate, float | None]]] = {}
    for change in changes:
        for replica in change.target.replicas if change.target is not None else []:
            await _size(replica, needs, warnings)
        if change.strategy == "replace" and change.old is not None:
            for replica in change.old.config.replicas:
                await _size(replica, freed, warnings)
    for device, wanted in needs.items():
        sample = await asyncio.to_thread(free_vram, device)
        if sample is None:
            warnings.append(f"GPU {device}: free VRAM unknown (no NVML); fit not checked")
            continue
        free, total = sample
        given_back = _bytes(freed.get(device, []), total)
        free += given_back
        required = _bytes(wanted, total)
        if required > free:
            lines = "; ".join(f"{rid}: {fit.describe()}" for rid, fit, _ in wanted)
            counting = " (counting what the replaced set gives back)" if given_back else ""
            raise InsufficientMemory(
                f"the new replicas need {required / 2**20:,.0f} MiB on GPU {device}, which has "
                f"{free / 2**20:,.0f} MiB free{counting}; nothing was changed. {lines}",
                extra={
                    "fit": {
                        "device": device,
                        "free_bytes": free,
                        "required_bytes": required,
                        "replicas": {rid: fit.breakdown() for rid, fit, _ in wanted},
                    }
                },
            )
    return warnings


async def _size(
    replica: ReplicaConfig,
    into: dict[int, list[tuple[str, FitEstimate, float | None]]],
    warnings: list[str],
) -> None:
    if replica.gpu_device is None or replica.model_path is None:
        return
    try:
        shape = await asyncio.to_thread(read_model, replica.model_path)
    except ModelFileError as exc:
        warnings.append(f"replica {replica.id}: fit not checked: {exc}")
        return
    fit, utilisation = _replica_estimate(replica, shape)
    into.setdefault(replica.gpu_device, []).append((replica.id, fit, utilisation))


def _bytes(sized: list[tuple[str, FitEstimate, float | None]], total: int) -> int:
    """vLLM takes ``--gpu-memory-utilization`` of the card, whatever the model needs."""
    return sum(
        max(fit.total_bytes, int(util * total)) if util else fit.total_bytes
        for _, fit, util in sized
    )


def nvml_free_vram(state: GatewayState, device: int) -> tuple[int, int] | None:
    """Free and total VRAM of ``device`` now, through the gateway's NVML session or a
    short one of its own; None without a driver or for an unknown device."""
    nvml = state.nvml if state.nvml is not None and state.nvml.available else None
    own = nvml is None
    nvml = nvml or Nvml()
    try:
        sample = nvml.sample(device)
    finally:
        if own:
            nvml.close()
    return None if sample is None else (sample.vram_free_bytes, sample.vram_total_bytes)


def _replica_estimate(replica: ReplicaConfig, shape: Any) -> tuple[FitEstimate, float | None]:
    settings = launch_settings(replica.launch or [])

    def number(key: str, default: float) -> float:
        try:
            return float(settings[key])
        except (KeyError, ValueError):
            return default

    fit = estimate(
        shape,
        context_tokens=int(number("context", 0)) or None,
        parallel=int(number("parallel", 1)),
        kv_type=settings.get("kv_type", "f16"),
        device="cuda",
        micro_batch=int(number("micro_batch", 512)),
    )
    # vLLM reserves this share of the whole GPU, whatever the model needs
    engine = type(replica).__struct_config__.tag
    utilisation = number("gpu_memory_utilization", 0.9) if engine == "vllm" else None
    return fit, utilisation


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port
