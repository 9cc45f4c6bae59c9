"""Engine ``llamacpp``: llama.cpp's ``llama-server``.

Readiness comes from ``GET /health`` (503 "Loading model" while the weights load, 200
after); slots from ``GET /props`` ``total_slots`` (= ``--parallel``); the engine version
from ``build_info``; load from ``GET /slots`` where it is enabled.
"""

from __future__ import annotations

from typing import Any

from backends.base import OPENAI_ENDPOINTS, Endpoint, ModelFacts, ReplicaInfo, ReplicaLoad
from backends.openai_compat import HttpReplicaConfig, OpenAICompatBackend, decode_json


class LlamaCppReplicaConfig(HttpReplicaConfig, tag="llamacpp", frozen=True):
    """llama-server needs nothing beyond the common keys."""


class LlamaCppBackend(OpenAICompatBackend):
    engine = "llamacpp"
    default_slots = 1
    # llama-server (b6000 and later) serves the OpenAI routes, Anthropic's and its own; the
    # un-prefixed /completions and /embeddings are its native handlers, not the /v1 ones
    served = OPENAI_ENDPOINTS - {Endpoint.SPEECH} | {
        Endpoint.MESSAGES,
        Endpoint.COUNT_TOKENS,
        Endpoint.RERANK,
        Endpoint.TOKENIZE,
        Endpoint.DETOKENIZE,
    }
    paths = {}
    native_endpoints = frozenset(
        {Endpoint.BARE_COMPLETIONS, Endpoint.BARE_EMBEDDINGS, Endpoint.TOKENIZE,
         Endpoint.DETOKENIZE}
    )  # fmt: skip
    # /upstream/{model}/...: llama-server's own routes. Never /slots/{id} (its save and
    # restore actions take a file name) nor POST /props (changes the server's settings).
    native_routes = {
        "/completion": "post",
        "/infill": "post",
        "/tokenize": "post",
        "/detokenize": "post",
        "/apply-template": "post",
        "/embedding": "post",
        "/reranking": "post",
        "/v1/reranking": "post",
        # token counts before sending (llama-server b7000+; OpenAI's responses.input_tokens)
        "/chat/completions/input_tokens": "post",
        "/v1/chat/completions/input_tokens": "post",
        "/responses/input_tokens": "post",
        "/v1/responses/input_tokens": "post",
        "/props": "admin-get",
        "/slots": "admin-get",
        "/metrics": "admin-get",
        "/health": "get",
    }

    async def probe(self) -> ReplicaInfo:
        status, raw = await self.get("/health")
        if status != 200:
            body = decode_json(raw)
            detail = f"HTTP {status}"
            if isinstance(body, dict) and isinstance(body.get("error"), dict):
                detail = str(body["error"].get("message", detail))
            return ReplicaInfo(ready=False, detail=detail)
        status, raw = await self.get("/props")
        props = decode_json(raw) if status == 200 else None
        if not isinstance(props, dict):
            return ReplicaInfo(ready=True)
        slots = props.get("total_slots")
        build = props.get("build_info")
        return ReplicaInfo(
            ready=True,
            total_slots=slots if isinstance(slots, int) and slots > 0 else None,
            engine_version=build if isinstance(build, str) else None,
            model=model_facts(props),
        )

    async def load(self) -> ReplicaLoad:
        status, raw = await self.get("/slots")
        slots = decode_json(raw) if status == 200 else None
        if not isinstance(slots, list):
            return ReplicaLoad(running=0, waiting=0, total_slots=self.configured_slots)
        running = sum(1 for s in slots if isinstance(s, dict) and s.get("is_processing"))
        return ReplicaLoad(running=running, waiting=0, total_slots=len(slots))


def model_facts(props: dict[str, Any]) -> ModelFacts:
    """Context and capabilities from ``GET /props``: ``n_ctx`` of a slot (what one request
    can hold: ``-c`` over ``--parallel``), a chat template, whether the template takes
    tools, and the multimodal projector's modalities."""
    settings = props.get("default_generation_settings")
    n_ctx = settings.get("n_ctx") if isinstance(settings, dict) else None
    template_caps = props.get("chat_template_caps")
    modalities = props.get("modalities")
    found = ["chat", "completions"] if props.get("chat_template") else ["completions"]
    if isinstance(template_caps, dict) and template_caps.get("supports_tools"):
        found.append("tools")
    if isinstance(modalities, dict):
        found += [kind for kind in ("vision", "audio") if modalities.get(kind)]
    return ModelFacts(
        context_length=n_ctx if isinstance(n_ctx, int) and n_ctx > 0 else None,
        capabilities=tuple(found),
    )
