"""How fast will a model run here: decode tokens/s from the bytes read per token against
the device's memory bandwidth, capped by its arithmetic; prompt processing from its
arithmetic alone. Pure: no I/O; every constant lives in the tables below.

decode    every generated token reads the *active* weights once (a mixture of experts
          reads its shared weights and ``experts_used / experts`` of the expert tensors)
          plus the KV cache of the context so far (counted at half the context); at
          ``bandwidth x efficiency``. Small models on few CPU cores are bound by arithmetic
          instead (2 FLOPs per active parameter per token): the lower of the two wins.
prefill   2 FLOPs per active parameter per prompt token, at the device's sustained rate;
          batched, so bandwidth rarely binds it.
offload   layers left on the CPU (``gpu_fraction`` < 1) are read at the CPU's bandwidth:
          the time per token is the sum of both parts.

Efficiencies are the share of peak bandwidth an engine reaches in decode, calibrated on
what runs here (llama-server and OpenVINO GenAI with SmolLM2 on this CPU, in the tests)
and on published figures (DGX Spark GB10, 273 GB/s: Qwen3.6-35B-A3B NVFP4 on vLLM ~97
tokens/s, seed spark-control-agents.md). Confidence says how much of that applies.
"""

from __future__ import annotations

import msgspec

from backends.model_file import ModelShape

# share of peak memory bandwidth reached in decode, by engine and device kind
EFFICIENCY: dict[tuple[str, str], float] = {
    ("llamacpp", "cpu"): 0.60,
    ("llamacpp", "cuda"): 0.70,
    ("vllm", "cuda"): 0.75,
    ("openvino", "cpu"): 0.45,
    ("openvino", "npu"): 0.30,
}
DEFAULT_EFFICIENCY = 0.5
# sustained arithmetic per CPU core for quantised matrix-vector work (GFLOP/s), one
# thread per core: measured 11 with llama-server -t 2 and SmolLM2 Q4_1 on a 2-core Xeon
# VM slice (81.5 tokens/s x 2 x 135M params / 2 cores; tests/test_speed.py)
CPU_GFLOPS_PER_CORE = 11.0
# prompt processing batches tokens into matrix-matrix work: a multiple of the decode
# arithmetic, by engine. Measured with SmolLM2 Q4_1, 2 cores (tests/test_speed.py):
# llama-server --no-repack 326-341 prompt tokens/s (241 tokens); OpenVINO GenAI, whose
# oneDNN kernels use AMX/AVX-512, 7,700-9,000 (271 tokens, after its first compile)
CPU_PREFILL_FACTOR = {"llamacpp": 4.0, "openvino": 60.0}
DEFAULT_CPU_PREFILL_FACTOR = 4.0
# sustained arithmetic of a GPU for prompt processing (TFLOP/s, fp16 tensor cores at a
# realistic share), by name pattern; unknown GPUs get no prefill estimate
GPU_TFLOPS: list[tuple[str, float]] = [
    ("B200", 900.0), ("H200", 400.0), ("H100", 400.0), ("A100", 150.0), ("L40", 90.0),
    ("4090", 80.0), ("5090", 100.0), ("3090", 35.0), ("GB10", 50.0), ("L4", 30.0),
]  # fmt: skip


class Device(msgspec.Struct, frozen=True):
    kind: str  # "cpu" | "cuda" | "npu"
    name: str
    bandwidth_gbps: float | None
    cores: int = 1  # cpu
    tflops: float | None = None  # cuda: sustained, for prefill


class SpeedEstimate(msgspec.Struct, frozen=True):
    decode_tokens_s: float  # 0: it does not run here (``reason`` says why)
    prefill_tokens_s: float | None
    bytes_per_token: int
    bound: str  # "bandwidth" | "compute" | "none"
    efficiency: float
    confidence: str  # "measured-class" | "estimate" | "rough" | "none"
    reason: str | None = None


def active_weight_bytes(shape: ModelShape) -> int:
    """Weights read per generated token: all of a dense model; for a mixture of experts
    the shared part plus the used experts' share of the expert tensors."""
    if shape.experts > 1 and shape.expert_bytes > 0:
        used = max(1, shape.experts_used or 1)
        shared = shape.weights_bytes - shape.expert_bytes
        return int(shared + shape.expert_bytes * used / shape.experts)
    return shape.weights_bytes


def active_params(shape: ModelShape) -> int:
    if shape.weights_bytes <= 0:
        return shape.params
    return int(shape.params * active_weight_bytes(shape) / shape.weights_bytes)


def kv_bytes_per_token_read(shape: ModelShape, context: int, kv_bytes_per_element: float) -> int:
    """The KV cache one decode step reads, at half the context filled."""
    per_token = shape.layers * shape.kv_heads * (shape.key_length + shape.value_length)
    return int(per_token * kv_bytes_per_element * context / 2)


def estimate_speed(
    shape: ModelShape,
    device: Device,
    engine: str,
    *,
    context: int = 4096,
    kv_bytes_per_element: float = 2.0,
    fits: bool = True,
    gpu_fraction: float = 1.0,
    cpu: Device | None = None,
) -> SpeedEstimate:
    """Decode and prefill rates of ``shape`` on ``device`` with ``engine``. ``fits`` False
    (the memory check said no) gives 0 with the reason; ``gpu_fraction`` below 1 reads the
    rest of the weights from ``cpu`` (partial offload)."""
    if not fits:
        return SpeedEstimate(0.0, None, 0, "none", 0.0, "none", "does not fit in memory")
    if not device.bandwidth_gbps:
        return SpeedEstimate(0.0, None, 0, "none", 0.0, "none",
                             f"no memory bandwidth known for {device.name}")  # fmt: skip
    efficiency = EFFICIENCY.get((engine, device.kind), DEFAULT_EFFICIENCY)
    weights = active_weight_bytes(shape)
    kv = kv_bytes_per_token_read(shape, context, kv_bytes_per_element)
    per_token = weights + kv
    seconds = per_token * gpu_fraction / (device.bandwidth_gbps * 1e9 * efficiency)
    if gpu_fraction < 1.0:
        if cpu is None or not cpu.bandwidth_gbps:
            return SpeedEstimate(0.0, None, per_token, "none", efficiency, "none",
                                 "partial offload without a CPU bandwidth")  # fmt: skip
        cpu_efficiency = EFFICIENCY.get((engine, "cpu"), DEFAULT_EFFICIENCY)
        seconds += per_token * (1 - gpu_fraction) / (cpu.bandwidth_gbps * 1e9 * cpu_efficiency)
    bandwidth_rate = 1.0 / seconds if seconds > 0 else 0.0
    flops_per_token = 2.0 * active_params(shape)
    compute = _compute_flops(device)
    rate, bound = bandwidth_rate, "bandwidth"
    if compute is not None and flops_per_token > 0 and compute / flops_per_token < rate:
        rate, bound = compute / flops_per_token, "compute"
    prefill = compute / flops_per_token if compute and flops_per_token else None
    if prefill is not None and device.kind == "cpu":
        prefill *= CPU_PREFILL_FACTOR.get(engine, DEFAULT_CPU_PREFILL_FACTOR)
    confidence = (
        "measured-class" if (engine, device.kind) in (("llamacpp", "cpu"), ("openvino", "cpu"))
        else "estimate" if (engine, device.kind) in EFFICIENCY
        else "rough"
    )  # fmt: skip
    if gpu_fraction < 1.0:
        confidence = "rough"
    return SpeedEstimate(
        decode_tokens_s=round(rate, 1),
        prefill_tokens_s=round(prefill, 1) if prefill else None,
        bytes_per_token=per_token,
        bound=bound,
        efficiency=efficiency,
        confidence=confidence,
    )


def _compute_flops(device: Device) -> float | None:
    if device.kind == "cpu":
        return device.cores * CPU_GFLOPS_PER_CORE * 1e9
    if device.tflops:
        return device.tflops * 1e12
    return None


def gpu_tflops(name: str) -> float | None:
    for pattern, tflops in GPU_TFLOPS:
        if pattern.lower() in name.lower():
            return tflops
    return None
