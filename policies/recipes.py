"""Launch recipes: which engine runs a catalog model, and with which argv.

A recipe matches models by a glob on the file or folder name and/or by format; the first
match wins, in config order. Its ``launch`` is a template: only the placeholders below are
substituted, each as a whole argument or inside one, and never from a request. A model no
recipe matches is ``needs_setup``: ``suggested_flags`` says what a recipe would likely
pass, for the operator to copy -- it is shown, never launched.

Pure: no I/O.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from backends.base import Strict
from backends.catalog import CatalogEntry

PLACEHOLDERS = frozenset(
    {"model_path", "model", "mmproj", "host", "port", "ctx", "slots", "gpu", "python", "id"}
)
_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")
Format = Literal["gguf", "transformers", "openvino"]
Device = Literal["cpu", "cuda"]


class RecipeConfig(Strict, frozen=True):
    """``[[catalog.recipes]]``."""

    engine: Literal["llamacpp", "vllm", "openvino"]
    launch: Annotated[list[str], Meta(min_length=1)]
    match: str = "*"  # glob on the model's file or folder name (case-insensitive)
    format: Format | None = None
    ctx: Annotated[int, Meta(ge=128)] = 4096  # {ctx}: the whole KV cache, in tokens
    slots: Annotated[int, Meta(ge=1, le=4096)] = 1  # {slots}: parallel sequences
    device: Device = "cpu"  # what the memory budget counts against; "cuda": a GPU, {gpu}
    kv_type: str = "f16"  # the KV cache type the launch sets (for the memory estimate)
    idle_ttl_s: Annotated[float, Meta(ge=0)] | None = None  # default: catalog.idle_ttl_s
    pinned: bool = False  # never evicted to make room, never unloaded when idle

    def matches(self, entry: CatalogEntry) -> bool:
        if self.format is not None and entry.format != self.format:
            return False
        pattern = self.match.lower()
        return fnmatch.fnmatchcase(entry.name.lower(), pattern) or fnmatch.fnmatchcase(
            entry.id.lower(), pattern
        )


def unknown_placeholders(template: Sequence[str]) -> list[str]:
    """Placeholders a template uses that ``render`` would not fill (a config error)."""
    return sorted({m for arg in template for m in _PLACEHOLDER.findall(arg)} - PLACEHOLDERS)


def match_recipe(entry: CatalogEntry, recipes: Sequence[RecipeConfig]) -> RecipeConfig | None:
    return next((r for r in recipes if r.matches(entry)), None)


def render(template: Sequence[str], values: dict[str, str]) -> list[str]:
    """The argv: each ``{name}`` replaced by its value. A placeholder without a value
    (``{mmproj}`` for a model without a vision tower) drops the argument and, when the
    argument before it is a flag, that flag too: ``--mmproj {mmproj}`` vanishes."""
    argv: list[str] = []
    for arg in template:
        names = _PLACEHOLDER.findall(arg)
        if any(not values.get(n) for n in names):
            if argv and argv[-1].startswith("-") and arg == f"{{{names[0]}}}":
                argv.pop()
            continue
        argv.append(_PLACEHOLDER.sub(lambda m: values[m.group(1)], arg))
    return argv


def suggested_flags(entry: CatalogEntry) -> list[str]:
    """What a recipe would likely pass this model, read from its metadata (as
    spark-control shows it): engine, context, embedding or vision switches."""
    shape = entry.shape
    if entry.format == "gguf":
        flags = ["llama-server", "-m", "{model_path}", "--host", "{host}", "--port", "{port}"]
        if shape is not None and shape.context_train:
            flags += ["-c", str(min(shape.context_train, 32768))]
        if shape is not None and shape.pooling:
            flags.append("--embeddings")
        if entry.mmproj is not None:
            flags += ["--mmproj", "{mmproj}"]
        if shape is not None and not shape.chat_template and not shape.pooling:
            flags += ["--chat-template", "chatml"]
        return flags
    if entry.format == "openvino":
        return ["{python}", "-m", "gateway", "npu-worker", "--model", "{model_path}",
                "--port", "{port}"]  # fmt: skip
    flags = ["vllm", "serve", "{model_path}", "--host", "{host}", "--port", "{port}"]
    if shape is not None and shape.context_train:
        flags += ["--max-model-len", str(min(shape.context_train, 32768))]
    if shape is not None and shape.pooling:
        flags += ["--task", "embed"]
    if shape is not None and shape.quant in ("awq", "gptq", "fp8"):
        flags += ["--quantization", shape.quant]
    return flags


def recipe_values(
    entry: CatalogEntry, recipe: RecipeConfig, *, host: str, port: int, gpu: int | None,
    python: str,
) -> dict[str, str]:  # fmt: skip
    return {
        "model_path": entry.path,
        "model": entry.path,
        "mmproj": entry.mmproj or "",
        "host": host,
        "port": str(port),
        "ctx": str(recipe.ctx),
        "slots": str(recipe.slots),
        "gpu": "" if gpu is None else str(gpu),
        "python": python,
        "id": entry.id,
    }


class ModelOverride(Strict, frozen=True):
    """``[catalog.models."<id>"]``: per-model settings over its recipe's."""

    aliases: list[str] = []
    idle_ttl_s: Annotated[float, Meta(ge=0)] | None = None
    pinned: bool | None = None
    ctx: Annotated[int, Meta(ge=128)] | None = None
    slots: Annotated[int, Meta(ge=1, le=4096)] | None = None


def with_override(recipe: RecipeConfig, override: ModelOverride | None) -> RecipeConfig:
    if override is None:
        return recipe
    return msgspec.structs.replace(
        recipe,
        ctx=override.ctx or recipe.ctx,
        slots=override.slots or recipe.slots,
        idle_ttl_s=override.idle_ttl_s if override.idle_ttl_s is not None else recipe.idle_ttl_s,
        pinned=override.pinned if override.pinned is not None else recipe.pinned,
    )
