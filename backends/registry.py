"""Which engines exist, and which pool serves which model name.

Adding an engine is one new module in ``backends/`` plus one line here: its config Struct
joins the ``ReplicaConfig`` tagged union (so config validation stays exhaustive) and its
adapter class joins ``ENGINES``.
"""

from __future__ import annotations

from collections.abc import Iterable

from backends.base import Backend
from backends.llamacpp import LlamaCppBackend, LlamaCppReplicaConfig
from backends.openai import OpenAIBackend, OpenAIReplicaConfig
from backends.openai_compat import OpenAICompatBackend
from backends.openvino import OpenVINOBackend, OpenVINOReplicaConfig
from backends.vllm import VLLMBackend, VLLMReplicaConfig

ReplicaConfig = (
    LlamaCppReplicaConfig | VLLMReplicaConfig | OpenAIReplicaConfig | OpenVINOReplicaConfig
)

ENGINES: dict[type, type[OpenAICompatBackend]] = {
    LlamaCppReplicaConfig: LlamaCppBackend,
    VLLMReplicaConfig: VLLMBackend,
    OpenAIReplicaConfig: OpenAIBackend,
    OpenVINOReplicaConfig: OpenVINOBackend,
}


def build_backend(config: ReplicaConfig) -> Backend:
    """The adapter for one configured replica (not started yet)."""
    adapter: Backend = ENGINES[type(config)](config)
    return adapter


class ModelIndex:
    """Model name or alias -> pool id. Built once from config; immutable afterwards."""

    __slots__ = ("_by_name", "canonical")

    def __init__(self, pools: Iterable[tuple[str, list[str]]]) -> None:
        self._by_name: dict[str, str] = {}
        self.canonical: dict[str, str] = {}
        for pool_id, models in pools:
            for name in models:
                self._by_name[name] = pool_id
                self.canonical[name] = models[0]

    def pool_for(self, model: str) -> str | None:
        return self._by_name.get(model)

    def names(self) -> list[str]:
        return list(self._by_name)
