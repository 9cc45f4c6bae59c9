"""Will it fit: the memory a model needs on a device, as a breakdown.

weights   the tensors (exact for GGUF) -- all of them stay resident, MoE included
kv_cache  2 (K and V) x layers x KV heads x head size x context cells x cache-type bytes
compute   activation scratch and attention mask for one micro-batch, and the output
          logits per sequence
runtime   the engine's fixed cost on the device (a CUDA context and cuBLAS workspace)

Calibrated against llama-server's own ``memory breakdown`` for SmolLM2-135M on CPU
(tests/test_fit.py): weights and KV cache match to the byte, compute within a few MiB.
An estimate for everything else -- the breakdown says which part is which.
"""

from __future__ import annotations

import msgspec

from backends.model_file import ModelShape

MIB = 1024**2

# bytes per element of the KV cache types llama.cpp accepts (-ctk/-ctv)
KV_CACHE_BYTES: dict[str, float] = {
    "f32": 4, "f16": 2, "bf16": 2, "q8_0": 34 / 32, "q5_1": 24 / 32, "q5_0": 22 / 32,
    "q4_1": 20 / 32, "q4_0": 18 / 32, "iq4_nl": 18 / 32, "fp8": 1,
}  # fmt: skip
RUNTIME_BYTES = {"cpu": 0, "cuda": 512 * MIB}
DEFAULT_MICRO_BATCH = 512
_COMPUTE_MARGIN = 1.2  # graph scratch beyond the widest activations, measured on CPU


class FitEstimate(msgspec.Struct, frozen=True):
    model: str
    quant: str
    params: int
    context_tokens: int
    parallel: int
    kv_type: str
    device: str
    weights_bytes: int
    kv_cache_bytes: int
    compute_bytes: int
    runtime_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.compute_bytes + self.runtime_bytes

    def breakdown(self) -> dict[str, object]:
        return {
            "model": self.model,
            "quant": self.quant,
            "params": self.params,
            "context_tokens": self.context_tokens,
            "parallel": self.parallel,
            "kv_type": self.kv_type,
            "device": self.device,
            "weights_bytes": self.weights_bytes,
            "kv_cache_bytes": self.kv_cache_bytes,
            "compute_bytes": self.compute_bytes,
            "runtime_bytes": self.runtime_bytes,
            "total_bytes": self.total_bytes,
        }

    def describe(self) -> str:
        def mib(n: int) -> str:
            return f"{n / MIB:,.1f} MiB"

        return (
            f"weights {mib(self.weights_bytes)} ({self.params / 1e6:,.0f}M params, {self.quant})"
            f" + KV cache {mib(self.kv_cache_bytes)} ({self.context_tokens} tokens, "
            f"{self.kv_type}) + compute {mib(self.compute_bytes)} + runtime "
            f"{mib(self.runtime_bytes)} = {mib(self.total_bytes)}"
        )


def estimate(
    shape: ModelShape,
    *,
    context_tokens: int | None = None,
    parallel: int = 1,
    kv_type: str = "f16",
    device: str = "cuda",
    micro_batch: int = DEFAULT_MICRO_BATCH,
) -> FitEstimate:
    """``context_tokens`` is the whole KV cache (llama.cpp ``-c``, shared by ``parallel``
    slots); default: the context the model was trained for."""
    context = context_tokens or shape.context_train or 4096
    per_element = KV_CACHE_BYTES.get(kv_type.lower(), 2)
    kv = shape.layers * shape.kv_heads * (shape.key_length + shape.value_length) * context
    activations = 4 * micro_batch * (4 * shape.embedding + 2 * shape.feed_forward)
    # the f16 attention mask spans one sequence's cells by the micro-batch
    mask = 2 * micro_batch * (context // max(1, parallel))
    logits = 4 * shape.vocab * max(1, parallel)
    return FitEstimate(
        model=shape.name or shape.path,
        quant=shape.quant,
        params=shape.params,
        context_tokens=context,
        parallel=parallel,
        kv_type=kv_type,
        device=device,
        weights_bytes=shape.weights_bytes,
        kv_cache_bytes=int(kv * per_element),
        compute_bytes=int(activations * _COMPUTE_MARGIN) + mask + logits,
        runtime_bytes=RUNTIME_BYTES.get(device, 0),
    )


def launch_settings(argv: list[str]) -> dict[str, str]:
    """The fit-relevant flags of an engine's command line (llama-server and vLLM names)."""
    names = {
        "-c": "context", "--ctx-size": "context", "--max-model-len": "context",
        "-np": "parallel", "--parallel": "parallel", "--max-num-seqs": "parallel",
        "-ctk": "kv_type", "--cache-type-k": "kv_type", "--kv-cache-dtype": "kv_type",
        "-ub": "micro_batch", "--ubatch-size": "micro_batch",
        "--gpu-memory-utilization": "gpu_memory_utilization",
    }  # fmt: skip
    found: dict[str, str] = {}
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if flag in names:
            if not eq:
                if i + 1 >= len(argv):
                    continue
                value = argv[i + 1]
            found[names[flag]] = value
    return found
