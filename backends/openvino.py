"""Engine ``openvino``: the bounded OpenVINO GenAI worker (``orchgate npu-worker``).

Ready when ``GET /healthz`` says ``ok`` and the pipeline is ``loaded``. One slot by default:
the worker serialises generation on one pipeline, so the gateway's queue, not the worker,
holds waiting requests. Serves chat completions and the contract's ``/v1/worker/*`` jobs.
"""

from __future__ import annotations

from backends.base import NO_LIMITS, WORKER_ENDPOINTS, Endpoint, Limits, ReplicaInfo, UpstreamCall
from backends.errors import BackendDeviceError, BackendError
from backends.openai_compat import (
    HttpReplicaConfig,
    OpenAICompatBackend,
    UpstreamStream,
    decode_json,
)


class OpenVINOReplicaConfig(HttpReplicaConfig, tag="openvino", frozen=True):
    """The worker needs nothing beyond the common keys (``launch`` runs it managed)."""


class OpenVINOBackend(OpenAICompatBackend):
    engine = "openvino"
    default_slots = 1
    served = frozenset({Endpoint.CHAT, Endpoint.COMPLETIONS}) | WORKER_ENDPOINTS

    async def send(self, call: UpstreamCall, limits: Limits = NO_LIMITS) -> UpstreamStream:
        try:
            return await super().send(call, limits)
        except BackendError as error:
            if call.endpoint not in WORKER_ENDPOINTS or not error.answered or error.status < 500:
                raise
            # the worker's 5xx are the device's verdict on this job (module doc)
            raise BackendDeviceError(
                error.message,
                replica_id=error.replica_id,
                engine=error.engine,
                status=error.status,
                body=error.body,
                answered=True,
                raw=error.raw,
            ) from error

    async def probe(self) -> ReplicaInfo:
        status, raw = await self.get("/healthz")
        body = decode_json(raw)
        if status != 200 or not isinstance(body, dict):
            return ReplicaInfo(ready=False, detail=f"/healthz answered HTTP {status}")
        if not body.get("loaded"):
            return ReplicaInfo(ready=False, detail="loading the model")
        device = body.get("device")
        return ReplicaInfo(
            ready=bool(body.get("ok")),
            total_slots=1,
            engine_version=f"openvino-genai ({device})" if device else None,
            accelerator={
                "device": device,
                "busy": body.get("busy"),
                "busy_time_us": body.get("busy_time_us"),
                "initial_load_ms": body.get("initial_load_ms"),
            },
        )
