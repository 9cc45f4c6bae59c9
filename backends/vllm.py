"""Engine ``vllm``: vLLM's OpenAI-compatible server.

Readiness from ``GET /health`` (200 when the engine is alive, 503 after ``EngineDeadError``;
the port does not listen while weights load); version from ``GET /version``; load from the
``vllm:num_requests_running`` / ``vllm:num_requests_waiting`` gauges on ``GET /metrics``.
"""

from __future__ import annotations

from backends.base import OPENAI_ENDPOINTS, Endpoint, ModelFacts, ReplicaInfo, ReplicaLoad
from backends.openai_compat import HttpReplicaConfig, OpenAICompatBackend, decode_json


class VLLMReplicaConfig(HttpReplicaConfig, tag="vllm", frozen=True):
    """vLLM needs nothing beyond the common keys; set ``slots`` to its ``--max-num-seqs``."""


def gauge_sum(metrics_text: str, name: str) -> float | None:
    """Sum a gauge over all its label sets in Prometheus text format."""
    total: float | None = None
    for line in metrics_text.splitlines():
        if not line.startswith(name):
            continue
        rest = line[len(name) :]
        if rest[:1] not in ("{", " "):
            continue  # a longer metric name sharing the prefix
        try:
            value = float(line.rsplit(" ", 1)[1])
        except (IndexError, ValueError):
            continue
        total = (total or 0.0) + value
    return total


class VLLMBackend(OpenAICompatBackend):
    engine = "vllm"
    default_slots = 256  # vLLM's default --max-num-seqs
    # vLLM's OpenAI server (0.11+): the OpenAI routes, Anthropic messages, rerank and the
    # un-prefixed tokenizer routes ({model, prompt|messages} -> {count, max_model_len, tokens})
    served = OPENAI_ENDPOINTS - {Endpoint.SPEECH} | {
        Endpoint.MESSAGES,
        Endpoint.RERANK,
        Endpoint.TOKENIZE,
        Endpoint.DETOKENIZE,
    }
    native_endpoints = frozenset({Endpoint.TOKENIZE, Endpoint.DETOKENIZE})
    native_routes = {
        "/pooling": "post",
        "/classify": "post",
        "/score": "post",
        "/metrics": "admin-get",
        "/version": "get",
        "/health": "get",
    }

    async def probe(self) -> ReplicaInfo:
        status, _ = await self.get("/health")
        if status != 200:
            return ReplicaInfo(ready=False, detail=f"/health answered HTTP {status}")
        version = None
        status, raw = await self.get("/version")
        body = decode_json(raw) if status == 200 else None
        if isinstance(body, dict) and isinstance(body.get("version"), str):
            version = body["version"]
        return ReplicaInfo(ready=True, engine_version=version, model=await self._model_facts())

    async def _model_facts(self) -> ModelFacts | None:
        """``max_model_len`` of the served model (vLLM's ``/v1/models`` extra field)."""
        status, raw = await self.get("/v1/models")
        body = decode_json(raw) if status == 200 else None
        data = body.get("data") if isinstance(body, dict) else None
        first = data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else {}
        length = first.get("max_model_len")
        if not isinstance(length, int) or length <= 0:
            return None
        return ModelFacts(context_length=length)

    async def load(self) -> ReplicaLoad:
        status, raw = await self.get("/metrics")
        if status != 200:
            return ReplicaLoad(running=0, waiting=0, total_slots=self.configured_slots)
        text = raw.decode("utf-8", "replace")
        running = gauge_sum(text, "vllm:num_requests_running") or 0.0
        waiting = gauge_sum(text, "vllm:num_requests_waiting") or 0.0
        return ReplicaLoad(
            running=int(running), waiting=int(waiting), total_slots=self.configured_slots
        )
