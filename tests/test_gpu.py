"""GPU telemetry and GPU-aware placement, against a stand-in for NVIDIA's NVML library.

``tests/fakes/nvml/libnvml_standin.c`` implements the NVML entry points orchgate calls with
the real ABI and is loaded by the real ``pynvml`` as ``libnvidia-ml.so.1`` (through
``LD_LIBRARY_PATH``) inside a real ``orchgate serve`` process. What the "GPUs" report comes
from a text file the test rewrites. Without the library (this machine has no driver) the
GPU series are absent and nothing fails.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.browser import Browser
from tests.conftest import free_port
from tests.fakes.servers import gateway_process, wait_until
from tests.prom import scrape, value

pytestmark = pytest.mark.slow  # compiles the NVML stand-in; real orchgate serve processes

GIB = 1024**3


def write_gpus(path: Path, *gpus: tuple[int, int, str]) -> None:
    """``(utilization %, GiB used, name)`` per device; every device has 80 GiB."""
    path.write_text("".join(f"{u} {used * GIB} {80 * GIB} {name}\n" for u, used, name in gpus))


@contextmanager
def gateway(
    tmp_path: Path, upstream_url: str, env: dict[str, str], *, devices: tuple[int, ...]
) -> Iterator[str]:
    port = free_port()
    replicas = "".join(
        f"""
[[pools.replicas]]
id = "gpu{device}"
engine = "openai"
url = "{upstream_url}"
slots = 4
gpu_device = {device}
"""
        for device in devices
    )
    config = tmp_path / "orchgate.toml"
    config.write_text(
        f"""
[server]
bind = "127.0.0.1:{port}"

[metrics]
gpu_interval_s = 0.1
history_interval_s = 0.2

[[pools]]
id = "p"
models = ["m"]
{replicas}"""
    )
    with gateway_process(config, port, env=env) as running:
        yield running.url
    assert "Traceback" not in running.log(), running.log()


def _placed_on(url: str) -> str:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    response = httpx.post(url + "/v1/chat/completions", json=body, timeout=10)
    assert response.status_code == 200
    return response.headers["x-orchgate-replica"]


def test_nvml_series_and_vram_aware_placement(
    nvml_dir: Path, fake_upstream: Any, tmp_path: Path
) -> None:
    gpus = tmp_path / "gpus.txt"
    write_gpus(gpus, (90, 70, "H100-A"), (10, 10, "H100-B"))
    env = {
        **_clean_env(),
        "LD_LIBRARY_PATH": str(nvml_dir),
        "ORCHGATE_FAKE_NVML": str(gpus),
    }
    with gateway(tmp_path, fake_upstream[1].url, env, devices=(0, 1)) as url:
        assert wait_until(lambda: "gpu_utilization" in scrape(url), timeout=5)
        series = scrape(url)
        assert value(series, "gpu_utilization", replica_id="gpu0", device="0") == 90
        assert value(series, "gpu_utilization", replica_id="gpu1", device="1") == 10
        assert value(series, "vram_used_bytes", replica_id="gpu0", device="0") == 70 * GIB
        labels = {got_labels for got_labels in _label_sets(series, "vram_used_bytes")}
        assert labels == {("device", "engine", "engine_version", "pool_id", "replica_id")}

        # equal free slots: the GPU with more free VRAM gets the request
        assert [_placed_on(url) for _ in range(3)] == ["gpu1"] * 3

        # the GPUs change: placement follows within a sampling period
        write_gpus(gpus, (20, 5, "H100-A"), (95, 75, "H100-B"))
        assert wait_until(lambda: _placed_on(url) == "gpu0", timeout=5)
        assert value(scrape(url), "vram_used_bytes", replica_id="gpu1", device="1") == 75 * GIB

        # the status data behind the pool health shows the same telemetry
        replicas = httpx.get(url + "/v1/pools/p/health").json()["metrics"]["replicas"]
        assert {r["id"]: r["gpu"]["name"] for r in replicas} == {"gpu0": "H100-A", "gpu1": "H100-B"}

        # the status page's GPU memory chart: the pool's two devices, summed once each
        def vram() -> list[Any]:
            history = httpx.get(url + "/v1/status/history").json()
            return [v for v in history["pools"]["p"]["vram_used_bytes"] if v is not None]

        assert wait_until(lambda: vram() and vram()[-1] == 80 * GIB, timeout=5), vram()
        assert 80 * GIB in vram() and 80 * GIB == max(vram())  # 70 + 10 before, 5 + 75 now
        with Browser() as browser:
            browser.goto(url + "/status")
            assert browser.wait_for(lambda: "GPU memory" in browser.text()), browser.text()
            assert re.search(r"GPU memory\s*now 80\.0 GiB", browser.text()), browser.text()
            browser.screenshot(tmp_path / "status-gpu.png")


def test_a_device_the_driver_does_not_know_has_no_series(
    nvml_dir: Path, fake_upstream: Any, tmp_path: Path
) -> None:
    gpus = tmp_path / "gpus.txt"
    write_gpus(gpus, (50, 40, "only-one"))
    env = {**_clean_env(), "LD_LIBRARY_PATH": str(nvml_dir), "ORCHGATE_FAKE_NVML": str(gpus)}
    with gateway(tmp_path, fake_upstream[1].url, env, devices=(0, 3)) as url:
        assert wait_until(lambda: "gpu_utilization" in scrape(url), timeout=5)
        series = scrape(url)
        assert [labels["replica_id"] for labels, _ in series["gpu_utilization"]] == ["gpu0"]
        assert _placed_on(url) in ("gpu0", "gpu3")  # still served


def test_without_an_nvidia_driver_gpu_series_are_absent_and_nothing_fails(
    fake_upstream: Any, tmp_path: Path
) -> None:
    env = _clean_env()
    env.pop("LD_LIBRARY_PATH", None)
    with gateway(tmp_path, fake_upstream[1].url, env, devices=(0,)) as url:
        assert _placed_on(url) == "gpu0"
        series = scrape(url)
        assert "gpu_utilization" not in series and "vram_used_bytes" not in series
        assert value(series, "tasks_enqueued_total", replica_id="gpu0", priority="interactive") == 1


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "ORCHGATE_FAKE_NVML"}


def _label_sets(series: dict[str, Any], name: str) -> list[tuple[str, ...]]:
    return [tuple(sorted(labels)) for labels, _ in series[name]]
