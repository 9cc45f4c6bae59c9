"""Bad input on both surfaces: each gets the right status and envelope, nothing leaks; and
schemathesis against the gateway's own OpenAPI document finds no 5xx and no response that
breaks the document."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Gateway, pool, schemathesis
from tests.fakes.servers import AiohttpThread, wait_until
from tests.fakes.upstream import FakeUpstream

MSG = [{"role": "user", "content": "hi"}]
CONTEXT = 4096

JSON = {"content-type": "application/json"}


@pytest.fixture
def gw(
    fake_upstream: tuple[FakeUpstream, AiohttpThread], gateway_factory: Any
) -> Iterator[Gateway]:
    replica = {"id": "f0", "engine": "openai", "url": fake_upstream[1].url, "slots": 2}
    config = {"pools": [pool("p", ["m"], [replica], max_context_tokens=CONTEXT)]}
    with gateway_factory(config) as gateway:
        yield gateway


def chat(gw: Gateway, content: bytes, **headers: str) -> httpx.Response:
    headers.setdefault("content-type", "application/json")
    return httpx.post(gw.url + "/v1/chat/completions", content=content, headers=headers, timeout=10)


def openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.mark.parametrize(
    "max_tokens,fragment",
    [
        (b"-1", b"max_tokens"),
        (b"0", b"max_tokens"),
        (b"4097", b"above this model's context of 4096"),
        (b"1000000000000", b"above this model's context"),
        (b"99999999999999999999999999", b"max_tokens"),
        (b"1e400", b"max_tokens"),
        (b'"12"', b"max_tokens"),
        (b"1.5", b"max_tokens"),
        (b"null", None),  # explicit null is "no limit given": accepted
    ],
)
def test_negative_or_absurd_max_tokens(
    gw: Gateway, fake_upstream: Any, max_tokens: bytes, fragment: bytes | None
) -> None:
    fake: FakeUpstream = fake_upstream[0]
    body = b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": '
    response = chat(gw, body + max_tokens + b"}")
    if fragment is None:
        assert response.status_code == 200
        return
    error = openai_error(response, 400)
    assert error["type"] == "invalid_request_error"
    assert fragment.decode() in error["message"] or error["param"] == "max_tokens"
    assert fake.bodies == []  # refused before it cost an upstream request
    for field in (b"max_completion_tokens",):
        body = b'{"model": "m", "messages": [], "' + field + b'": 5000}'
        assert openai_error(chat(gw, body), 400)["param"] == field.decode()


@pytest.mark.parametrize(
    "headers",
    [
        {f"x-h{i}": "a" * 100 for i in range(1000)},  # many
        {"x-big": "a" * 200_000},  # one huge
    ],
    ids=["1000-headers", "200KB-header"],
)
def test_huge_header_sets_are_431_on_every_surface(
    gw: Gateway, headers: dict[str, str], fake_upstream: Any
) -> None:
    body = b'{"model": "m", "messages": [{"role": "user", "content": "x"}]}'
    error = openai_error(chat(gw, body, **headers), 431)
    assert error["code"] == "request_header_fields_too_large"
    response = httpx.post(
        gw.url + "/v1/tasks", json={"model_ref": "m", "prompt": "x"}, headers=headers, timeout=10
    )
    assert response.status_code == 431
    assert response.json()["code"] == "INVALID_PARAMS"
    assert fake_upstream[0].bodies == []
    # the gateway is unharmed
    assert chat(gw, body).status_code == 200


BAD_BODIES = [
    (b"", 400, "empty"),
    (b"{", 400, "not valid JSON"),
    (b"[]", 400, "JSON object"),
    (b'{"model": "m", "messages": [], "stream": "yes"}', 400, "stream"),
    (b'{"model": 7, "messages": []}', 400, "model"),
    (b'{"model": "m", "messages": {}}', 400, "array"),
    (b'{"model": "m"}', 400, "messages"),
    (b'{"model": "m", "messages": [], "x": "\xff\xfe"}', 400, "UTF-8"),
    (b'{"model": "\xff", "messages": []}', 400, "UTF-8"),
    (b'{"model": "nope", "messages": []}', 404, "does not exist"),
    (b'{"model": "m", "messages": [], "n": 100000}', 400, "n"),
]


@pytest.mark.parametrize("body,status,fragment", BAD_BODIES)
def test_bad_bodies_get_the_right_status_and_envelope(
    gw: Gateway, body: bytes, status: int, fragment: str
) -> None:
    error = openai_error(chat(gw, body), status)
    assert fragment in error["message"] or error["param"] == fragment
    assert gw.slots_in_use() == 0 and gw.queue_depth() == 0


def test_task_api_bad_input(gw: Gateway) -> None:
    def post(path: str, content: bytes) -> httpx.Response:
        return httpx.post(gw.url + path, content=content, timeout=10, headers=JSON)

    for body in (b"{", b"[]", b'{"prompt": 5}', b'{"prompt": "x", "max_tokens": -1}',
                 b'{"prompt": "x", "max_tokens": 999999}',
                 b'{"prompt": "\xff"}', b'{"prompt": "x", "messages": []}'):  # fmt: skip
        response = post("/v1/tasks", body)
        assert response.status_code == 400, (body, response.text)
        assert response.json()["code"] == "INVALID_PARAMS" and response.json()["message"]
    for path in ("/v1/tasks/nope", "/v1/tasks/nope/stream"):
        response = httpx.get(gw.url + path, timeout=5)
        assert response.status_code == 404 and response.json()["code"] == "NOT_FOUND"
    assert post("/v1/tasks/nope/cancel", b"").status_code == 404
    task_id = post("/v1/tasks", b'{"prompt": "x", "params": {"fake": {"mode": "hang"}}}')
    task_id = task_id.json()["task_id"]
    assert post(f"/v1/tasks/{task_id}/cancel", b"").status_code == 204
    assert post(f"/v1/tasks/{task_id}/cancel", b"").status_code == 204  # cancel twice: same
    assert wait_until(lambda: gw.slots_in_use() == 0 and gw.state.tasks.active() == 0)


@pytest.mark.slow  # a fuzzer: hundreds of generated requests
def test_schemathesis_finds_no_5xx_and_no_schema_violation(gw: Gateway, tmp_path: Path) -> None:
    checks = (
        "not_a_server_error,status_code_conformance,content_type_conformance,"
        "response_schema_conformance,response_headers_conformance"
    )
    schemathesis(
        gw.url + "/openapi.json", None, tmp_path,
        "--checks", checks, "--max-examples", "40", "--seed", "20261123",
    )  # fmt: skip
    assert gw.slots_in_use() == 0
