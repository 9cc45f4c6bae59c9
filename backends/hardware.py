"""Hardware detection: what this host can run models on.

NVIDIA GPUs through NVML (name, VRAM total/free, memory bandwidth from a table of known
cards), an Intel NPU through the kernel's accel sysfs node, the CPU model and RAM from
``/proc``. Keys the operator sets in ``[hardware]`` win over what is detected. A probe that
fails adds a warning and the profile degrades towards CPU-only: :func:`detect` never
raises. Used by ``orchgate hw``, ``GET /v1/hardware`` and the fit check.
"""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import msgspec
from msgspec import Meta

from backends.base import Strict
from backends.gpu import GpuDevice, enumerate_gpus

GIB = 1024**3

# Published memory bandwidth (GB/s); first match on the NVML name wins, so specific
# names come before the families they belong to.
GPU_BANDWIDTH_GBPS: list[tuple[str, float]] = [
    (r"B200", 8000), (r"H200", 4800), (r"H100.*NVL", 3900), (r"H100.*PCIe", 2000),
    (r"H100", 3350), (r"GH200", 4000), (r"A100.*(80GB.*PCIE|PCIE.*80GB)", 1935),
    (r"A100.*80GB", 2039), (r"A100", 1555), (r"L40S?", 864), (r"\bL4\b", 300),
    (r"A10G?\b", 600), (r"A40\b", 696), (r"RTX PRO 6000", 1792), (r"RTX 6000 Ada", 960),
    (r"RTX A6000", 768), (r"V100", 900), (r"\bT4\b", 320), (r"GB10\b", 273),
    (r"RTX 5090", 1792), (r"RTX 5080", 960), (r"RTX 5070 Ti", 896), (r"RTX 5070", 672),
    (r"RTX 4090", 1008), (r"RTX 4080 SUPER", 736), (r"RTX 4080", 717),
    (r"RTX 4070 Ti SUPER", 672), (r"RTX 4070", 504), (r"RTX 4060 Ti", 288),
    (r"RTX 4060", 272), (r"RTX 3090 Ti", 1008), (r"RTX 3090", 936), (r"RTX 3080 Ti", 912),
    (r"RTX 3080", 760), (r"RTX 3070", 448), (r"RTX 3060", 360),
]  # fmt: skip

# Conservative CPU memory bandwidth (GB/s) by brand string: server DDR5, server DDR4,
# desktop DDR5, desktop DDR4; anything else gets the floor.
CPU_BANDWIDTH_GBPS: list[tuple[str, float]] = [
    (r"EPYC 9\d\d\d|Xeon.*(Platinum|Gold) [89]\d\d\d|Xeon 6", 200),
    (r"EPYC|Xeon", 100),
    (r"Core\(TM\) Ultra|Ryzen \w+ [79]\d\d\d|Apple", 80),
    (r"Core\(TM\) i\d|Ryzen", 50),
]
CPU_BANDWIDTH_FLOOR_GBPS = 40.0

# PCI device ids of Intel NPUs (the intel_vpu driver)
INTEL_NPU_NAMES = {
    "0x7d1d": "Intel NPU (Meteor Lake)",
    "0xad1d": "Intel NPU (Arrow Lake)",
    "0x643e": "Intel NPU (Lunar Lake)",
    "0xb03e": "Intel NPU (Panther Lake)",
    "0xfd3e": "Intel NPU (Wildcat Lake)",
}


class GpuOverride(Strict, frozen=True):
    index: Annotated[int, Meta(ge=0)]
    name: str
    vram_gb: Annotated[float, Meta(gt=0)]
    bandwidth_gbps: Annotated[float, Meta(gt=0)] | None = None


class HardwareConfig(Strict, frozen=True):
    """``[hardware]``: what the operator knows better than detection. Set keys win;
    ``gpus`` replaces the detected list as a whole."""

    cpu_model: str | None = None
    ram_gb: Annotated[float, Meta(gt=0)] | None = None
    cpu_bandwidth_gbps: Annotated[float, Meta(gt=0)] | None = None
    gpus: list[GpuOverride] | None = None
    npu: str | None = None  # a name, e.g. "Intel NPU"; "" says there is none


class Gpu(msgspec.Struct, frozen=True):
    index: int
    name: str
    vram_total_bytes: int
    vram_free_bytes: int | None
    bandwidth_gbps: float | None
    source: str  # "nvml" | "config"


class Npu(msgspec.Struct, frozen=True):
    name: str
    node: str | None  # the accel sysfs node, e.g. /sys/class/accel/accel0
    driver: str | None
    source: str  # "sysfs" | "config"


class Cpu(msgspec.Struct, frozen=True):
    model: str
    cores: int
    ram_total_bytes: int | None
    ram_available_bytes: int | None
    bandwidth_gbps: float


class HardwareProfile(msgspec.Struct, frozen=True):
    profile: str  # "nvidia" when a GPU is usable, else "cpu"
    cpu: Cpu
    gpus: list[Gpu]
    npu: Npu | None
    warnings: list[str]
    overridden: list[str]  # the [hardware] keys that replaced detection


def gpu_bandwidth(name: str) -> float | None:
    spaced = re.sub(r"[_-]+", " ", name)  # "A100-SXM4-80GB", as some drivers write it
    for pattern, gbps in GPU_BANDWIDTH_GBPS:
        if re.search(pattern, spaced, re.IGNORECASE):
            return gbps
    return None


def cpu_bandwidth(model: str) -> float:
    for pattern, gbps in CPU_BANDWIDTH_GBPS:
        if re.search(pattern, model):
            return gbps
    return CPU_BANDWIDTH_FLOOR_GBPS


def _read(path: Path) -> str:
    return path.read_text(errors="replace").strip()


def _detect_cpu(proc: Path) -> tuple[str, int | None, int | None]:
    model = platform.processor() or platform.machine()
    try:
        for line in _read(proc / "cpuinfo").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                model = value.strip()
                break
    except OSError:
        pass
    total = available = None
    meminfo = _read(proc / "meminfo")  # OSError handled by the caller
    for line in meminfo.splitlines():
        key, _, value = line.partition(":")
        if key in ("MemTotal", "MemAvailable"):
            size = int(value.split()[0]) * 1024
            if key == "MemTotal":
                total = size
            else:
                available = size
    return model, total, available


def _detect_npu(sysfs: Path) -> Npu | None:
    accel = sysfs / "class" / "accel"
    if not accel.is_dir():
        return None
    for node in sorted(accel.iterdir()):
        device = node / "device"
        driver_link = device / "driver"
        driver = os.path.basename(os.readlink(driver_link)) if driver_link.is_symlink() else None
        vendor = _read(device / "vendor") if (device / "vendor").exists() else ""
        if driver != "intel_vpu" and vendor != "0x8086":
            continue
        device_id = _read(device / "device") if (device / "device").exists() else ""
        return Npu(
            name=INTEL_NPU_NAMES.get(device_id, f"Intel NPU ({device_id or 'unknown id'})"),
            node=str(node),
            driver=driver,
            source="sysfs",
        )
    return None


def detect(
    override: HardwareConfig | None = None,
    *,
    proc: Path = Path("/proc"),
    sysfs: Path = Path("/sys"),
    gpus: Callable[[], tuple[list[GpuDevice], str | None]] = enumerate_gpus,
) -> HardwareProfile:
    """Probe everything; never raises. ``proc``/``sysfs``/``gpus`` are seams for tests."""
    override = override or HardwareConfig()
    warnings: list[str] = []
    overridden: list[str] = []
    found = _gpus(override, gpus, warnings, overridden)
    return HardwareProfile(
        profile="nvidia" if found else "cpu",
        cpu=_cpu(override, proc, warnings, overridden),
        gpus=found,
        npu=_npu(override, sysfs, warnings, overridden),
        warnings=warnings,
        overridden=overridden,
    )


def _cpu(override: HardwareConfig, proc: Path, warnings: list[str], overridden: list[str]) -> Cpu:
    model, ram_total, ram_available = platform.machine() or "unknown CPU", None, None
    try:
        model, ram_total, ram_available = _detect_cpu(proc)
    except (OSError, ValueError, IndexError) as exc:
        warnings.append(f"CPU/RAM probe failed: {exc}")
    if override.cpu_model is not None:
        model = override.cpu_model
        overridden.append("cpu_model")
    if override.ram_gb is not None:
        ram_total = int(override.ram_gb * GIB)
        overridden.append("ram_gb")
    bandwidth = cpu_bandwidth(model)
    if override.cpu_bandwidth_gbps is not None:
        bandwidth = override.cpu_bandwidth_gbps
        overridden.append("cpu_bandwidth_gbps")
    return Cpu(
        model=model,
        cores=os.cpu_count() or 1,
        ram_total_bytes=ram_total,
        ram_available_bytes=ram_available,
        bandwidth_gbps=bandwidth,
    )


def _gpus(
    override: HardwareConfig,
    probe: Callable[[], tuple[list[GpuDevice], str | None]],
    warnings: list[str],
    overridden: list[str],
) -> list[Gpu]:
    if override.gpus is not None:
        overridden.append("gpus")
        return [
            Gpu(
                index=g.index,
                name=g.name,
                vram_total_bytes=int(g.vram_gb * GIB),
                vram_free_bytes=None,
                bandwidth_gbps=g.bandwidth_gbps or gpu_bandwidth(g.name),
                source="config",
            )
            for g in override.gpus
        ]
    try:
        devices, reason = probe()
    except Exception as exc:  # a broken driver must not break the gateway
        devices, reason = [], f"GPU probe failed: {exc}"
    if reason is not None:
        warnings.append(reason)
    found = []
    for d in devices:
        gbps = gpu_bandwidth(d.name)
        if gbps is None:
            warnings.append(f"GPU {d.index} ({d.name}): memory bandwidth unknown")
        found.append(
            Gpu(
                index=d.index,
                name=d.name,
                vram_total_bytes=d.vram_total_bytes,
                vram_free_bytes=d.vram_free_bytes,
                bandwidth_gbps=gbps,
                source="nvml",
            )
        )
    return found


def _npu(
    override: HardwareConfig, sysfs: Path, warnings: list[str], overridden: list[str]
) -> Npu | None:
    if override.npu is not None:
        overridden.append("npu")
        return (
            Npu(name=override.npu, node=None, driver=None, source="config")
            if override.npu
            else None
        )
    try:
        return _detect_npu(sysfs)
    except OSError as exc:
        warnings.append(f"NPU probe failed: {exc}")
        return None


def describe(profile: HardwareProfile) -> str:
    """The human-readable form ``orchgate hw`` prints."""
    cpu = profile.cpu
    lines = [f"profile: {profile.profile}", f"cpu: {cpu.model} ({cpu.cores} cores)"]
    if cpu.ram_total_bytes is not None:
        ram = f"ram: {cpu.ram_total_bytes / GIB:.1f} GiB"
        if cpu.ram_available_bytes is not None:
            ram += f" ({cpu.ram_available_bytes / GIB:.1f} GiB available)"
        lines.append(ram + f", ~{cpu.bandwidth_gbps:g} GB/s")
    for gpu in profile.gpus:
        free = "" if gpu.vram_free_bytes is None else f", {gpu.vram_free_bytes / GIB:.1f} GiB free"
        gbps = "bandwidth unknown" if gpu.bandwidth_gbps is None else f"{gpu.bandwidth_gbps:g} GB/s"
        lines.append(
            f"gpu {gpu.index}: {gpu.name}, {gpu.vram_total_bytes / GIB:.1f} GiB{free}, "
            f"{gbps} [{gpu.source}]"
        )
    if not profile.gpus:
        lines.append("gpu: none")
    lines.append(f"npu: {profile.npu.name} [{profile.npu.source}]" if profile.npu else "npu: none")
    lines += [f"warning: {w}" for w in profile.warnings]
    if profile.overridden:
        lines.append("from [hardware]: " + ", ".join(profile.overridden))
    return "\n".join(lines)
