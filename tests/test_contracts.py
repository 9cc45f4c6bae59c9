"""The shapes orchgate writes itself, checked against the published contracts it follows
(``../shared/contracts/``): OpenAI's own schemas for every error envelope the gateway
produces, its model list and model object, and the in-band error events of a broken
stream; and llama-orch's OrchQueue v1 data plane fuzzed with its own ``data.yaml``."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import pytest
import yaml

from gateway.app import carries_request_id
from tests.conftest import ADMIN, Gateway, pool, schemathesis
from tests.fakes.servers import AiohttpThread
from tests.fakes.upstream import FakeUpstream

# the other projects' published contracts live beside the checkout (../shared/contracts,
# as CI lays it out), never copied into the project
CONTRACTS = Path(__file__).resolve().parents[2] / "shared" / "contracts"


@functools.cache
def _openai_components() -> Any:
    path = CONTRACTS / "openai-openapi-subset.json"
    assert path.is_file(), f"the contracts folder must sit beside the checkout: {path}"
    return json.loads(path.read_text())["components"]


class _Schema:
    """One of OpenAI's component schemas, compiled on first use."""

    def __init__(self, name: str) -> None:
        self.name = name

    def validate(self, instance: Any) -> None:
        validator = _compiled(self.name)
        validator.validate(instance)


@functools.cache
def _compiled(name: str) -> Any:
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$ref": f"#/components/schemas/{name}",
        "components": _openai_components(),
    }
    return jsonschema_rs.validator_for(schema)


ERROR = _Schema("ErrorResponse")
MODELS = _Schema("ListModelsResponse")
MODEL = _Schema("Model")


@pytest.fixture
def gw(
    fake_upstream: tuple[FakeUpstream, AiohttpThread], gateway_factory: Any
) -> Iterator[Gateway]:
    _, server = fake_upstream
    config = {
        "auth": {"token": "t"},
        "server": {"max_body_bytes": 4096},
        "pools": [pool("p", ["m"], [{"id": "r0", "engine": "openai", "url": server.url}])],
    }
    with gateway_factory(config) as gateway:
        yield gateway


AUTH = {"Authorization": "Bearer t"}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "x"}]}


JSON = {"Content-Type": "application/json"}
FAULT = {"mode": "status", "status": 400, "body": {"detail": "odd shape"}}
GATEWAY_ERRORS: list[tuple[str, str, str, dict[str, Any]]] = [
    ("400 json", "POST", "/v1/chat/completions", {"content": b"{", "headers": AUTH | JSON}),
    ("400 field", "POST", "/v1/chat/completions", {"json": {"model": "m"}}),
    ("401", "POST", "/v1/chat/completions", {"json": CHAT, "headers": {}}),
    ("403 admin", "POST", "/v1/pools/p/reload", {"json": {}}),
    ("404 model", "POST", "/v1/chat/completions", {"json": {**CHAT, "model": "z"}}),
    ("404 route", "GET", "/v1/nowhere", {}),
    ("404 endpoint", "POST", "/v1/rerank", {"json": {"model": "m", "query": "q"}}),
    ("404 upstream", "GET", "/upstream/m/props", {"headers": ADMIN}),
    ("405", "GET", "/v1/chat/completions", {}),
    ("413", "POST", "/v1/chat/completions", {"json": {**CHAT, "pad": "x" * 5000}}),
    ("415", "POST", "/v1/chat/completions", {"content": b"{}", "headers": AUTH}),
    ("421", "GET", "/v1/models", {"headers": AUTH | {"Host": "evil.example"}}),
    ("upstream 400", "POST", "/v1/chat/completions", {"json": {**CHAT, "fake": FAULT}}),
]


@pytest.mark.parametrize(
    "name,method,path,kwargs", GATEWAY_ERRORS, ids=[e[0] for e in GATEWAY_ERRORS]
)
def test_every_gateway_error_is_an_openai_error_response(
    gw: Gateway, name: str, method: str, path: str, kwargs: dict[str, Any]
) -> None:
    answer = httpx.request(method, gw.url + path, **{"headers": AUTH, **kwargs})
    assert answer.status_code >= 400
    ERROR.validate(answer.json())  # raises with the path of the violation
    # the OpenAI surface always carries a request id, the control plane never (SPEC.md)
    assert ("x-request-id" in answer.headers) == carries_request_id(path)


def test_model_list_and_model_object_match_openai(gw: Gateway) -> None:
    listing = httpx.get(gw.url + "/v1/models", headers=AUTH).json()
    MODELS.validate(listing)
    MODEL.validate(httpx.get(gw.url + "/v1/models/m", headers=AUTH).json())


def test_in_band_stream_errors_are_openai_error_responses(gw: Gateway) -> None:
    # (an upstream's own in-band error event is relayed as it came: not the gateway's shape)
    for mode in ("no_done", "reset_after", "llamacpp_error"):
        body = {**CHAT, "stream": True, "fake": {"mode": mode, "chunks": 2}}
        answer = httpx.post(gw.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=10)
        events = [e for e in answer.content.split(b"\n\n") if e]
        assert events[-1] == b"data: [DONE]", mode
        errors = [json.loads(e[6:]) for e in events[:-1] if b'"error"' in e]
        assert errors, mode
        for error in errors:
            ERROR.validate(error)


@pytest.mark.slow  # a fuzzer: generated requests from llama-orch's own schema
def test_llama_orch_data_plane_contract_fuzzed_with_its_own_schema(
    gw: Gateway, tmp_path: Path
) -> None:
    # SPEC.md's one recorded difference: "engine" names orchgate's engines, and
    # "orchgate" itself before a pool is known (the contract lists llamacpp|vllm|tgi|triton)
    contract = yaml.safe_load((CONTRACTS / "llama-orch-data.yaml").read_text())
    contract["components"]["schemas"]["Engine"]["enum"] += ["openai", "openvino", "orchgate"]
    schema = tmp_path / "data.yaml"
    schema.write_text(yaml.safe_dump(contract))
    schemathesis(
        str(schema), gw.url, tmp_path,
        "--include-path-regex", "^/v1/tasks",
        "--checks", "not_a_server_error,response_schema_conformance,content_type_conformance",
        "--header", "Authorization: Bearer t", "--max-examples", "30", "--seed", "20261201",
    )  # fmt: skip
