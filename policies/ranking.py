"""What to run on this host: every catalog model against every device -- memory fit (with
why not), estimated speed -- in one deterministic order. Pure: no I/O.

Order: models that fit somewhere first; then the faster estimated decode on their best
device; then the smaller file; ties by id (code-point order, never locale). ``job``
keeps the models whose capabilities serve it (``chat``, ``embed``, ``vision``,
``completions``). With an operator's score snapshot (``policies.scores``) the models that
fit are ordered by score and speed blended with a stated weight.

Quantisation names are normalised as the GGUF and MLX ecosystems write them (``Q4_K_M``,
``IQ4_XS``, ``F16``, ``BF16``; ``4bit``/``8bit`` for MLX, ``AWQ``, ``GPTQ``, ``FP8``,
``NVFP4``, ``MXFP4``); a name outside the table is kept as written and flagged unknown.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import msgspec

from backends.model_file import ModelShape
from policies.fit import estimate
from policies.scores import blend
from policies.speed import Device, SpeedEstimate, estimate_speed

_GGUF_QUANTS = {
    "F32", "F16", "BF16", "Q8_0", "Q8_1", "Q6_K", "Q5_0", "Q5_1", "Q5_K_S", "Q5_K_M", "Q4_0",
    "Q4_1", "Q4_K_S", "Q4_K_M", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q2_K", "Q2_K_S", "IQ4_NL",
    "IQ4_XS", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M",
    "IQ1_S", "IQ1_M", "TQ1_0", "TQ2_0", "MXFP4", "Q4_0_4_4", "Q4_0_4_8", "Q4_0_8_8",
}  # fmt: skip
_OTHER_QUANTS = {
    "float32": "F32", "float16": "F16", "fp16": "F16", "bfloat16": "BF16", "bf16": "BF16",
    "fp8": "FP8", "awq": "AWQ", "gptq": "GPTQ", "nvfp4": "NVFP4", "mxfp4": "MXFP4",
    "int8": "INT8", "int4": "INT4", "bitsandbytes": "BNB-4BIT", "4bit": "4bit", "8bit": "8bit",
    "3bit": "3bit", "6bit": "6bit",
}  # fmt: skip
JOBS = {"chat": "chat", "embed": "embeddings", "vision": "vision", "completions": "completions"}


def normalise_quant(raw: str) -> tuple[str, bool]:
    """(the ecosystem's spelling, whether it is a known name)."""
    name = raw.strip()
    upper = name.upper().replace("-", "_")
    upper = re.sub(r"^(MOSTLY_|GGML_TYPE_)", "", upper)
    if upper in _GGUF_QUANTS:
        return upper, True
    lower = name.lower().replace("_", "").replace("-", "")
    for key, spelled in _OTHER_QUANTS.items():
        if lower == key.replace("_", ""):
            return spelled, True
    return name, False


class Placement(msgspec.Struct, frozen=True):
    device: str
    fits: bool
    need_bytes: int
    free_bytes: int
    why: str | None
    speed: SpeedEstimate
    memory: dict[str, object] = {}  # the fit breakdown: weights, KV cache, compute, runtime


class Ranked(msgspec.Struct, frozen=True):
    id: str
    size_bytes: int
    capabilities: list[str]
    quant: str
    quant_known: bool
    placements: list[Placement]
    score: float | None = None  # the operator's benchmark score for the job, 0..1

    @property
    def best(self) -> Placement | None:
        fitting = [p for p in self.placements if p.fits]
        if not fitting:
            return None
        return max(fitting, key=lambda p: (p.speed.decode_tokens_s, p.device))


def place(
    shape: ModelShape,
    devices: Sequence[tuple[Device, int]],
    engine: str,
    *,
    context: int,
    parallel: int = 1,
    kv_type: str = "f16",
) -> list[Placement]:
    """``devices``: each with the memory it has free for a model."""
    placements = []
    for device, free in devices:
        kind = "cuda" if device.kind == "cuda" else "cpu"
        fit = estimate(
            shape, context_tokens=context, parallel=parallel, kv_type=kv_type, device=kind
        )
        need = fit.total_bytes
        fits = need <= free
        why = None if fits else f"needs {need / 2**20:,.0f} MiB, {free / 2**20:,.0f} MiB free"
        speed = estimate_speed(shape, device, engine, context=context, fits=fits)
        placements.append(Placement(device.name, fits, need, free, why, speed, fit.breakdown()))
    return placements


def rank(
    models: Sequence[Ranked], job: str | None = None, *, score_weight: float | None = None
) -> list[Ranked]:
    """With ``score_weight`` (a score snapshot is in use) the models that fit are ordered
    by ``policies.scores.blend`` of score and speed instead of speed alone."""
    wanted = JOBS.get(job) if job else None
    chosen = [m for m in models if wanted is None or wanted in m.capabilities]
    fastest = max((m.best.speed.decode_tokens_s for m in chosen if m.best), default=0.0)

    def key(model: Ranked) -> tuple[int, float, int, str]:
        best = model.best
        speed = best.speed.decode_tokens_s if best is not None else 0.0
        merit = speed if score_weight is None else blend(model.score, speed, fastest, score_weight)
        return (0 if best is not None else 1, -merit, model.size_bytes, model.id)

    return sorted(chosen, key=key)


def merit(model: Ranked, models: Sequence[Ranked], score_weight: float) -> float:
    """The blended figure a row shows (the same one ``rank`` orders by)."""
    fastest = max((m.best.speed.decode_tokens_s for m in models if m.best), default=0.0)
    best = model.best
    speed = best.speed.decode_tokens_s if best is not None else 0.0
    return round(blend(model.score, speed, fastest, score_weight), 4)
