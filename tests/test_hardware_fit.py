"""Hardware detection and the fit estimate.

Detection runs for real on this GPU-less machine, against the NVML stand-in (the real
``pynvml`` loading ``tests/fakes/nvml/libnvml_standin.c``), and against a fake accel sysfs
tree for the NPU. The fit estimate for SmolLM2 is checked against the GGUF's real size and
against the memory breakdown a real llama-server reports for the same file and settings.
A reload whose model cannot fit a GPU's free VRAM is refused before anything starts.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from backends.gpu import GpuDevice
from backends.hardware import HardwareConfig, detect
from backends.model_file import read_model
from policies.fit import estimate, launch_settings
from tests.conftest import ADMIN, ADMIN_TOKEN, REPO, free_port, test_assets
from tests.fakes.servers import gateway_process

GIB = 1024**3
MIB = 1024**2


def orchgate(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=REPO, capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip


def nvml_env(nvml_dir: Path, gpus: Path) -> dict[str, str]:
    return {**os.environ, "LD_LIBRARY_PATH": str(nvml_dir), "ORCHGATE_FAKE_NVML": str(gpus)}


def test_hw_on_this_machine_is_a_cpu_profile_with_a_warning() -> None:
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    result = orchgate("hw", env=env)
    assert result.returncode == 0, result.stderr
    assert "profile: cpu" in result.stdout
    assert "warning: no NVIDIA driver" in result.stdout
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"model name\s*:\s*(.+)", cpuinfo)
    assert model is not None and model.group(1).strip() in result.stdout
    total_kib = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))  # type: ignore[union-attr]
    assert f"ram: {total_kib * 1024 / GIB:.1f} GiB" in result.stdout


def test_hw_reads_gpus_through_nvml_with_bandwidth_from_the_table(
    nvml_dir: Path, tmp_path: Path
) -> None:
    gpus = tmp_path / "gpus.txt"
    gpus.write_text(
        f"30 {10 * GIB} {80 * GIB} NVIDIA_H100_80GB_HBM3\n"
        f"0 {1 * GIB} {24 * GIB} NVIDIA_GeForce_RTX_4090\n"
        f"0 0 {16 * GIB} Mystery_Card_9000\n"
    )
    result = orchgate("hw", "--json", env=nvml_env(nvml_dir, gpus))
    assert result.returncode == 0, result.stderr
    profile = httpx.Response(200, content=result.stdout).json()
    assert profile["profile"] == "nvidia"
    assert [(g["name"], g["bandwidth_gbps"]) for g in profile["gpus"]] == [
        ("NVIDIA_H100_80GB_HBM3", 3350),
        ("NVIDIA_GeForce_RTX_4090", 1008),
        ("Mystery_Card_9000", None),
    ]
    assert profile["gpus"][0]["vram_total_bytes"] == 80 * GIB
    assert profile["gpus"][0]["vram_free_bytes"] == 70 * GIB
    assert profile["warnings"] == ["GPU 2 (Mystery_Card_9000): memory bandwidth unknown"]


def test_operator_overrides_win_over_detection(nvml_dir: Path, tmp_path: Path) -> None:
    gpus = tmp_path / "gpus.txt"
    gpus.write_text(f"0 0 {80 * GIB} NVIDIA_H100_80GB_HBM3\n")
    config = tmp_path / "orchgate.toml"
    config.write_text(
        '[hardware]\ncpu_model = "Threadripper 7980X"\nram_gb = 256\nnpu = "Intel NPU"\n'
        '[[hardware.gpus]]\nindex = 0\nname = "NVIDIA RTX 4090"\nvram_gb = 24\n'
        '[[pools]]\nid = "p"\nmodels = ["m"]\n'
        '[[pools.replicas]]\nid = "r"\nengine = "openai"\nurl = "http://127.0.0.1:1"\n'
    )
    result = orchgate("hw", "--json", "--config", str(config), env=nvml_env(nvml_dir, gpus))
    assert result.returncode == 0, result.stderr
    profile = httpx.Response(200, content=result.stdout).json()
    assert profile["cpu"]["model"] == "Threadripper 7980X"
    assert profile["cpu"]["ram_total_bytes"] == 256 * GIB
    assert profile["gpus"] == [
        {
            "index": 0, "name": "NVIDIA RTX 4090", "vram_total_bytes": 24 * GIB,
            "vram_free_bytes": None, "bandwidth_gbps": 1008, "source": "config",
        }
    ]  # fmt: skip
    assert profile["npu"]["name"] == "Intel NPU" and profile["npu"]["source"] == "config"
    assert sorted(profile["overridden"]) == ["cpu_model", "gpus", "npu", "ram_gb"]


def test_an_intel_npu_is_found_through_the_accel_sysfs_node(tmp_path: Path) -> None:
    device = tmp_path / "devices" / "pci0000:00" / "0000:00:0b.0"
    device.mkdir(parents=True)
    (device / "vendor").write_text("0x8086\n")
    (device / "device").write_text("0x7d1d\n")
    driver = tmp_path / "bus" / "pci" / "drivers" / "intel_vpu"
    driver.mkdir(parents=True)
    (device / "driver").symlink_to(driver)
    node = tmp_path / "class" / "accel" / "accel0"
    node.mkdir(parents=True)
    (node / "device").symlink_to(device)
    profile = detect(sysfs=tmp_path, gpus=lambda: ([], "no NVIDIA driver"))
    assert profile.npu is not None
    assert profile.npu.name == "Intel NPU (Meteor Lake)"
    assert profile.npu.driver == "intel_vpu" and profile.npu.node == str(node)
    assert profile.profile == "cpu"


def test_any_probe_failure_degrades_to_a_cpu_profile_and_never_raises(tmp_path: Path) -> None:
    def broken_driver() -> tuple[list[GpuDevice], str | None]:
        raise RuntimeError("driver/library version mismatch")

    (tmp_path / "class" / "accel").mkdir(parents=True)
    (tmp_path / "class" / "accel" / "accel0").mkdir()  # no device link: unreadable node
    profile = detect(
        HardwareConfig(), proc=tmp_path / "no-proc", sysfs=tmp_path, gpus=broken_driver
    )
    assert profile.profile == "cpu" and profile.gpus == [] and profile.npu is None
    assert any("driver/library version mismatch" in w for w in profile.warnings)
    assert any("CPU/RAM probe failed" in w for w in profile.warnings)
    assert profile.cpu.cores >= 1


def test_get_hardware_serves_the_same_profile(gateway_factory: Any, fake_upstream: Any) -> None:
    _, server = fake_upstream
    replica = {"id": "f0", "engine": "openai", "url": server.url}
    config = {
        "hardware": {"cpu_bandwidth_gbps": 77.0},
        "pools": [{"id": "p", "models": ["m"], "replicas": [replica]}],
    }
    with gateway_factory(config) as gw:
        profile = httpx.get(gw.url + "/v1/hardware?refresh=true", timeout=30).json()
        assert profile["profile"] == "cpu" and profile["cpu"]["bandwidth_gbps"] == 77.0
        assert profile["overridden"] == ["cpu_bandwidth_gbps"]


# -- fit -----------------------------------------------------------------------------------


@pytest.mark.slow  # the real SmolLM2 GGUF (fetched on a fresh machine)
def test_gguf_metadata_matches_the_real_file() -> None:
    path = test_assets.smollm2_model()
    shape = read_model(path)
    size = path.stat().st_size
    assert shape.source == "gguf" and shape.architecture == "llama"
    assert shape.quant == "Q4_1"
    assert 134_000_000 < shape.params < 136_000_000  # "135M"
    # weights are the tensors: the file minus its header and tokenizer
    assert 0.95 * size < shape.weights_bytes < size
    assert (shape.layers, shape.heads, shape.kv_heads, shape.key_length) == (30, 9, 3, 64)
    assert shape.context_train == 8192 and shape.vocab == 49152


@pytest.mark.llamacpp
@pytest.mark.parametrize(("context", "parallel"), [(2048, 4), (8192, 2)])
def test_fit_estimate_matches_llama_servers_own_memory_breakdown(
    tmp_path: Path, context: int, parallel: int
) -> None:
    model = test_assets.smollm2_model()
    log = tmp_path / "llama.log"
    port = free_port()
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [str(test_assets.llama_server()), "-m", str(model), "--port", str(port),
             "-c", str(context), "-np", str(parallel), "-t", "1", "-lv", "4", "--no-webui"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
    finally:
        server.terminate()  # it prints its memory breakdown on the way out
        server.wait(timeout=15)
    text = log.read_text(errors="replace")
    host = re.search(r"-\s*Host\s*\|\s*(\d+)\s*=\s*(\d+)\s*\+\s*(\d+)\s*\+\s*(\d+)", text)
    assert host is not None, text[-3000:]
    total, weights, kv, compute = (int(g) * MIB for g in host.groups())

    fit = estimate(read_model(model), context_tokens=context, parallel=parallel, device="cpu")
    assert abs(fit.weights_bytes - weights) <= MIB  # llama.cpp prints whole MiB
    assert abs(fit.kv_cache_bytes - kv) <= MIB
    assert abs(fit.compute_bytes - compute) <= 3 * MIB
    assert abs(fit.total_bytes - total) <= 0.03 * total
    print(
        f"\nctx {context}: llama-server {total / MIB:.0f} MiB, estimate {fit.total_bytes / MIB:.1f}"
    )


@pytest.mark.slow  # the real SmolLM2 GGUF (fetched on a fresh machine)
def test_orchgate_fit_prints_the_breakdown_and_the_verdict() -> None:
    model = str(test_assets.smollm2_model())
    result = orchgate("fit", model, "--context", "2048", "--parallel", "4", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "135M params, Q4_1" in result.stdout
    assert "KV cache        45.0 MiB" in result.stdout
    assert re.search(r"fits on RAM \(\d+\.\d GiB free\)", result.stdout)
    missing = orchgate("fit", "/nonexistent.gguf")
    assert missing.returncode == 2 and "no such file" in missing.stderr


@pytest.mark.slow  # the real SmolLM2 GGUF (fetched on a fresh machine)
def test_hw_and_fit_refuse_an_invalid_config_cleanly(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nbogus = 1\n")
    model = str(test_assets.smollm2_model())
    for args in (["hw", "--config", str(bad)], ["fit", model, "--config", str(bad)]):
        result = orchgate(*args)
        assert result.returncode == 2, result.stderr
        assert "invalid config" in result.stderr and "bogus" in result.stderr
        assert "Traceback" not in result.stderr


def test_config_json_models_are_estimated_from_their_architecture(tmp_path: Path) -> None:
    # Llama-3.1-8B's published config: 8.03B parameters
    (tmp_path / "config.json").write_text(
        '{"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": '
        '14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, '
        '"vocab_size": 128256, "max_position_embeddings": 131072, "torch_dtype": "bfloat16", '
        '"tie_word_embeddings": false}'
    )
    shape = read_model(tmp_path)
    assert 7.9e9 < shape.params < 8.1e9
    fit = estimate(shape, context_tokens=8192, device="cuda")
    assert 14.8 * GIB < fit.weights_bytes < 15.2 * GIB  # 16 bits per weight
    assert fit.kv_cache_bytes == 32 * 8 * 256 * 8192 * 2  # 1 GiB
    assert launch_settings(["vllm", "--max-model-len=8192", "--gpu-memory-utilization", "0.8"]) == {
        "context": "8192",
        "gpu_memory_utilization": "0.8",
    }


@pytest.mark.llamacpp
def test_a_reload_that_cannot_fit_the_gpu_is_refused_before_anything_starts(
    nvml_dir: Path, tmp_path: Path, fake_upstream: Any
) -> None:
    gpus = tmp_path / "gpus.txt"
    gpus.write_text(f"0 {int(79.5 * GIB)} {80 * GIB} NVIDIA_H100_80GB_HBM3\n")  # 512 MiB free
    port = free_port()
    config = tmp_path / "orchgate.toml"
    launch = [str(test_assets.llama_server()), "-m", "{model}", "--port", "{port}", "-c", "8192"]
    config.write_text(
        f'[server]\nbind = "127.0.0.1:{port}"\n[auth]\nadmin_token = "{ADMIN_TOKEN}"\n'
        f'[[pools]]\nid = "p"\nmodels = ["m"]\n'
        f'[[pools.replicas]]\nid = "f0"\nengine = "openai"\nurl = "{fake_upstream[1].url}"\n'
        f'[[pools.variants]]\nid = "gpu"\n[[pools.variants.replicas]]\nid = "g0"\n'
        f'engine = "llamacpp"\nurl = "http://127.0.0.1:{free_port()}"\ngpu_device = 0\n'
        f'model_path = "{test_assets.smollm2_model()}"\nlaunch = {json.dumps(launch)}\n'
    )
    body = {"variant": "gpu"}
    with gateway_process(config, port, env=nvml_env(nvml_dir, gpus)) as gw:
        refused = httpx.post(
            gw.url + "/v1/pools/p/reload?wait=true", json=body, headers=ADMIN, timeout=60
        )
        assert refused.status_code == 409, refused.text
        answer = refused.json()
        assert answer["error"]["code"] == "insufficient_vram"
        assert "nothing was changed" in answer["error"]["message"]
        fit = answer["fit"]
        assert fit["device"] == 0 and fit["free_bytes"] == 512 * MIB
        breakdown = fit["replicas"]["g0"]
        assert breakdown["context_tokens"] == 8192 and breakdown["quant"] == "Q4_1"
        assert breakdown["total_bytes"] == fit["required_bytes"] > 512 * MIB
        assert breakdown["kv_cache_bytes"] == 180 * MIB
        status = httpx.get(gw.url + "/v1/status").json()["pools"][0]
        assert [r["id"] for r in status["replicas"]] == ["f0"]
        assert status["lifecycle"]["reload"] is None  # refused before it began
    assert "llama-server" not in gw.log() and "starting managed replica" not in gw.log()


@pytest.mark.slow  # the real SmolLM2 GGUF
async def test_the_fit_check_counts_what_a_replace_swap_gives_back() -> None:
    from gateway.config import config_from_mapping
    from gateway.lifecycle.preflight import InsufficientMemory, check_fit
    from gateway.lifecycle.transition import Change
    from gateway.pools import PoolRuntime

    replica = {
        "id": "g0", "engine": "llamacpp", "url": "http://127.0.0.1:9", "gpu_device": 0,
        "model_path": str(test_assets.smollm2_model()), "launch": ["llama-server", "-c", "8192"],
    }  # fmt: skip
    config = config_from_mapping({"pools": [{"id": "p", "models": ["m"], "replicas": [replica]}]})
    target = config.pools[0]
    running = PoolRuntime(target)  # the same model runs now: ~805 MiB on GPU 0

    def free_vram(device: int) -> tuple[int, int]:
        return 512 * MIB, 80 * GIB

    with pytest.raises(InsufficientMemory) as refused:
        await check_fit([Change("p", running, target, "b", "blue_green")], free_vram)
    assert "512 MiB free;" in refused.value.message
    # in place, the running set's ~805 MiB come back first: 1,317 MiB for 805 needed
    assert await check_fit([Change("p", running, target, "b", "replace")], free_vram) == []
