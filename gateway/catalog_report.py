"""The catalog as a table, without a running gateway: what discovery finds under
``[catalog] dirs``, which recipe runs each model and its memory estimate at that recipe's
settings (``orchgate models``), and what runs best on this host (``orchgate models rank``:
fit on each device, estimated speed, a deterministic order)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from backends.catalog import CatalogEntry, discover
from backends.hardware import HardwareProfile
from gateway.config import CatalogConfig
from policies.fit import MIB, estimate
from policies.ranking import Ranked, merit, normalise_quant, place, rank
from policies.recipes import match_recipe, suggested_flags, with_override
from policies.scores import ScoreSnapshot, parse_snapshot, score_for
from policies.speed import Device, gpu_tflops


def catalog_rows(catalog: CatalogConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    found = discover(catalog.dirs)
    rows = [_row(entry, catalog) for entry in found.models]
    return rows, [msgspec.structs.asdict(s) for s in found.skipped]


def _row(entry: CatalogEntry, catalog: CatalogConfig) -> dict[str, Any]:
    recipe = match_recipe(entry, catalog.recipes)
    if recipe is not None:
        recipe = with_override(recipe, catalog.models.get(entry.id))
    shape = entry.shape
    memory = None
    if recipe is not None and shape is not None:
        memory = estimate(shape, context_tokens=recipe.ctx, parallel=recipe.slots,
                          kv_type=recipe.kv_type, device=recipe.device).total_bytes  # fmt: skip
    context = recipe.ctx if recipe is not None else shape.context_train if shape else None
    return {
        "id": entry.id,
        "status": "failed" if entry.error else "needs_setup" if recipe is None else "available",
        "format": entry.format,
        "size_bytes": entry.size_bytes,
        "engine": recipe.engine if recipe is not None else None,
        "quant": shape.quant if shape is not None else None,
        "params": shape.params if shape is not None else None,
        "context": context,
        "memory_bytes": memory,
        "capabilities": entry.capabilities(),
        "error": entry.error,
        "suggested_launch": suggested_flags(entry) if recipe is None else None,
    }


def render_rows(rows: list[dict[str, Any]], skipped: list[dict[str, Any]]) -> str:
    lines = [
        f"{'ID':40} {'STATUS':12} {'FORMAT':12} {'SIZE':>10} {'QUANT':8} {'CTX':>6} "
        f"{'MEMORY':>10}  CAPABILITIES"
    ]
    for r in rows:
        memory = f"{r['memory_bytes'] / MIB:,.0f} MiB" if r["memory_bytes"] else "-"
        size = f"{r['size_bytes'] / MIB:,.0f} MiB"
        lines.append(
            f"{r['id'][:40]:40} {r['status']:12} {r['format']:12} {size:>10} "
            f"{r['quant'] or '-':8} {r['context'] or '-':>6} {memory:>10}  "
            + (",".join(r["capabilities"]) or "-")
        )
        if r["suggested_launch"]:
            lines.append(f"{'':4}suggested recipe launch: {' '.join(r['suggested_launch'])}")
        if r["error"]:
            lines.append(f"{'':4}{r['error']}")
    lines += [f"skipped {s['path']}: {s['reason']}" for s in skipped]
    return "\n".join(lines)


# which device kinds each engine runs on (a vLLM model on a CPU-only host fits nowhere)
_ENGINE_DEVICES = {"llamacpp": ("cpu", "cuda"), "vllm": ("cuda",), "openvino": ("cpu",)}
_FORMAT_ENGINE = {"gguf": "llamacpp", "transformers": "vllm", "openvino": "openvino"}


def host_devices(hardware: HardwareProfile) -> list[tuple[Device, int]]:
    """This host's devices, each with the memory a model may take on it now."""
    cpu = hardware.cpu
    devices: list[tuple[Device, int]] = [
        (
            Device("cpu", f"CPU {cpu.model}", cpu.bandwidth_gbps, cores=cpu.cores),
            cpu.ram_available_bytes or cpu.ram_total_bytes or 0,
        )
    ]
    for gpu in hardware.gpus:
        device = Device("cuda", f"GPU {gpu.index} {gpu.name}", gpu.bandwidth_gbps,
                        tflops=gpu_tflops(gpu.name))  # fmt: skip
        devices.append((device, gpu.vram_free_bytes or gpu.vram_total_bytes))
    return devices


def load_scores(catalog: CatalogConfig) -> tuple[ScoreSnapshot | None, dict[str, Any] | None]:
    """The operator's score snapshot (read on every ranking: a new export needs no reload)
    and what the answer says about it; unreadable, it is reported and left out."""
    if catalog.scores_file is None:
        return None, None
    info: dict[str, Any] = {"file": catalog.scores_file, "weight": catalog.score_weight}
    try:
        snapshot = parse_snapshot(Path(catalog.scores_file).read_bytes())
    except OSError as exc:
        return None, info | {"source": None, "error": f"cannot read it: {exc.strerror}"}
    except ValueError as exc:
        return None, info | {"source": None, "error": str(exc)}
    return snapshot, info | {"source": snapshot.source, "error": None}


def ranked_rows(
    catalog: CatalogConfig,
    hardware: HardwareProfile,
    *,
    job: str | None = None,
    context: int | None = None,
) -> dict[str, Any]:
    """``orchgate models rank`` and ``GET /v1/catalog/rank``: every model on every device,
    fits first, then estimated speed (or score and speed blended), size, id."""
    snapshot, scores = load_scores(catalog)
    ranked = _rankable(catalog, host_devices(hardware), context)
    if snapshot is not None:
        ranked = [msgspec.structs.replace(m, score=score_for(snapshot, m.id, job)) for m in ranked]
    weight = catalog.score_weight if snapshot is not None else None
    ordered = rank(ranked, job, score_weight=weight)
    rows = [_ranked_row(position, model) for position, model in enumerate(ordered, start=1)]
    if weight is not None:
        for row, model in zip(rows, ordered, strict=True):
            row["score"] = None if model.score is None else round(model.score, 4)
            row["merit"] = merit(model, ordered, weight)
    return {"models": rows, "scores": scores}


def _rankable(
    catalog: CatalogConfig, devices: list[tuple[Device, int]], context: int | None
) -> list[Ranked]:
    ranked: list[Ranked] = []
    for entry in discover(catalog.dirs).models:
        if entry.shape is None:
            continue
        recipe = match_recipe(entry, catalog.recipes)
        if recipe is not None:
            recipe = with_override(recipe, catalog.models.get(entry.id))
        engine = recipe.engine if recipe is not None else _FORMAT_ENGINE[entry.format]
        usable = [(d, free) for d, free in devices if d.kind in _ENGINE_DEVICES[engine]]
        quant, known = normalise_quant(entry.shape.quant)
        ranked.append(
            Ranked(
                id=entry.id,
                size_bytes=entry.size_bytes,
                capabilities=entry.capabilities(),
                quant=quant,
                quant_known=known,
                placements=place(
                    entry.shape,
                    usable,
                    engine,
                    context=context or (recipe.ctx if recipe is not None else 4096),
                    parallel=recipe.slots if recipe is not None else 1,
                    kv_type=recipe.kv_type if recipe is not None else "f16",
                ),
            )  # fmt: skip
        )
    return ranked


def _ranked_row(position: int, model: Ranked) -> dict[str, Any]:
    best = model.best
    return {
        "rank": position, "id": model.id, "fits": best is not None,
        "device": best.device if best else None,
        "decode_tokens_s": best.speed.decode_tokens_s if best else 0.0,
        "prefill_tokens_s": best.speed.prefill_tokens_s if best else None,
        "bound": best.speed.bound if best else None,
        "confidence": best.speed.confidence if best else "none",
        "need_bytes": best.need_bytes if best else min(
            (p.need_bytes for p in model.placements), default=0),
        "size_bytes": model.size_bytes, "quant": model.quant,
        "quant_known": model.quant_known, "capabilities": model.capabilities,
        "placements": [msgspec.structs.asdict(p) for p in model.placements],
        "why_not": [f"{p.device}: {p.why}" for p in model.placements if not p.fits]
        or (["no device this engine runs on"] if not model.placements else []),
    }  # fmt: skip


def render_ranked(report: dict[str, Any]) -> str:
    rows, scores = report["models"], report["scores"]
    scored = scores is not None and scores["error"] is None
    lines = []
    if scores is not None:
        lines.append(
            f"scores: {scores['source']} ({scores['file']}), weight {scores['weight']:g} "
            "against speed" if scored else
            f"scores: {scores['file']} left out: {scores['error']}"
        )  # fmt: skip
    score_head = "SCORE " if scored else ""
    lines.append(f"{'#':>3} {'ID':40} {'FITS':5} {'TOK/S':>8} {'PREFILL':>8} {'MEMORY':>10} "
                 f"{'QUANT':8} {score_head}{'DEVICE':28} CONFIDENCE")  # fmt: skip
    for r in rows:
        prefill = f"{r['prefill_tokens_s']:,.0f}" if r["prefill_tokens_s"] else "-"
        quant = r["quant"] + ("" if r["quant_known"] else "?")
        score = "" if not scored else (
            f"{r['score'] * 100:>5.1f} " if r["score"] is not None else f"{'-':>5} ")  # fmt: skip
        lines.append(
            f"{r['rank']:>3} {r['id'][:40]:40} {'yes' if r['fits'] else 'no':5} "
            f"{r['decode_tokens_s']:>8,.1f} {prefill:>8} {r['need_bytes'] / MIB:>6,.0f} MiB "
            f"{quant:8} {score}{(r['device'] or '-')[:28]:28} {r['confidence']}"
        )
        lines += [f"{'':4}{why}" for why in r["why_not"] if not r["fits"]]
    return "\n".join(lines)
