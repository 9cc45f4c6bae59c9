"""The catalog as a table, without a running gateway (``orchgate models``): what
discovery finds under ``[catalog] dirs``, which recipe runs each model, and its memory
estimate at that recipe's settings."""

from __future__ import annotations

from typing import Any

import msgspec

from backends.catalog import CatalogEntry, discover
from gateway.config import CatalogConfig
from policies.fit import MIB, estimate
from policies.recipes import match_recipe, suggested_flags, with_override


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
