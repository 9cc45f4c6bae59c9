"""GPU telemetry through NVML (``nvidia-ml-py``): utilisation and VRAM per device index.

Only replicas that name a ``gpu_device`` are sampled. Without an NVIDIA driver (no
``libnvidia-ml.so.1``), or for an index the driver does not know, there is simply no
sample: the GPU series are absent from ``/metrics`` and placement falls back to slots.
NVML calls block for micro- to milliseconds, so samples are taken in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

import msgspec
import pynvml

log = logging.getLogger("orchgate.gpu")


class GpuSample(msgspec.Struct, frozen=True):
    device: int
    name: str
    utilization_pct: int  # NVML's "percent of time a kernel was running" over its last period
    vram_used_bytes: int
    vram_free_bytes: int
    vram_total_bytes: int


class Nvml:
    """One NVML session for the process. ``available`` is False when there is no driver."""

    def __init__(self) -> None:
        self.available = False
        self.reason: str | None = None
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            self.reason = str(exc)
            log.info("no NVIDIA GPU telemetry: %s", exc)
            return
        self.available = True
        self._handles: dict[int, object] = {}

    def sample(self, device: int) -> GpuSample | None:
        if not self.available:
            return None
        try:
            handle = self._handles.get(device)
            if handle is None:
                handle = self._handles[device] = pynvml.nvmlDeviceGetHandleByIndex(device)
            utilization = pynvml.nvmlDeviceGetUtilizationRates(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
        except pynvml.NVMLError as exc:
            log.warning("NVML could not read GPU %s: %s", device, exc)
            return None
        return GpuSample(
            device=device,
            name=name if isinstance(name, str) else name.decode(),
            utilization_pct=int(utilization.gpu),
            vram_used_bytes=int(memory.used),
            vram_free_bytes=int(memory.free),
            vram_total_bytes=int(memory.total),
        )

    def sample_all(self, devices: Iterable[int]) -> dict[int, GpuSample]:
        samples = {}
        for device in set(devices):
            sample = self.sample(device)
            if sample is not None:
                samples[device] = sample
        return samples

    async def sample_all_async(self, devices: Iterable[int]) -> dict[int, GpuSample]:
        return await asyncio.to_thread(self.sample_all, list(devices))

    def close(self) -> None:
        if self.available:
            self.available = False
            try:
                pynvml.nvmlShutdown()
            except pynvml.NVMLError:
                pass


class GpuDevice(msgspec.Struct, frozen=True):
    """One device as NVML enumerates it (hardware detection)."""

    index: int
    name: str
    vram_total_bytes: int
    vram_free_bytes: int


def enumerate_gpus() -> tuple[list[GpuDevice], str | None]:
    """Every NVIDIA GPU the driver knows, and why there are none when there are none.
    Opens and closes its own NVML session; never raises."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return [], f"no NVIDIA driver: {exc}"
    try:
        devices = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            devices.append(
                GpuDevice(
                    index=index,
                    name=name if isinstance(name, str) else name.decode(),
                    vram_total_bytes=int(memory.total),
                    vram_free_bytes=int(memory.free),
                )
            )
        return devices, None
    except pynvml.NVMLError as exc:
        return [], f"NVML failed: {exc}"
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass
