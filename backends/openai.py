"""Engine ``openai``: any OpenAI-compatible upstream, optionally with its own API key.

Health is ``GET /v1/models``; load is not observable, so placement uses the gateway's own
slot accounting only.
"""

from __future__ import annotations

import os

from backends.openai_compat import HttpReplicaConfig, OpenAICompatBackend


class OpenAIReplicaConfig(HttpReplicaConfig, tag="openai", frozen=True):
    """``api_key`` or ``api_key_env`` (the name of an environment variable) authenticate
    the gateway to the upstream; the client's own gateway token is never forwarded."""

    api_key: str | None = None
    api_key_env: str | None = None


class OpenAIBackend(OpenAICompatBackend):
    engine = "openai"
    default_slots = 64

    def __init__(self, config: OpenAIReplicaConfig) -> None:
        key = config.api_key
        if key is None and config.api_key_env:
            key = os.environ.get(config.api_key_env)
        super().__init__(config, api_key=key)
