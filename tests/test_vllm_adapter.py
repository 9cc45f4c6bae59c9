"""The ``vllm`` adapter against the vLLM HTTP-surface simulator (``tests/fakes/vllm_sim.py``).

The pool's canonical model name is the name vLLM serves; aliases are rewritten to it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Gateway, pool
from tests.fakes.servers import AiohttpThread, wait_until
from tests.fakes.vllm_sim import VLLMSimulator

SERVED = "Qwen/Qwen2.5-0.5B-Instruct"
MSG = [{"role": "user", "content": "hello"}]


@pytest.fixture
def gw(vllm_sim: tuple[VLLMSimulator, AiohttpThread], gateway_factory: Any) -> Iterator[Gateway]:
    cfg = {
        "pools": [
            pool(
                "qwen",
                [SERVED, "qwen"],
                [{"id": "v0", "engine": "vllm", "url": vllm_sim[1].url + "/v1/", "slots": 4}],
                health_interval_s=0.2,
            )
        ]
    }
    with gateway_factory(cfg) as gateway:
        yield gateway


@pytest.fixture
def client(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)


def test_health_and_version_are_read(gw: Gateway) -> None:
    health = httpx.get(gw.url + "/v1/pools/qwen/health").json()
    replica = health["metrics"]["replicas"][0]
    assert health["ready"] is True
    assert replica["engine"] == "vllm" and replica["engine_version"] == "0.11.2"
    assert replica["engine_running"] == 0 and replica["engine_waiting"] == 0


def test_models_carry_vllms_max_model_len(gw: Gateway) -> None:
    assert wait_until(lambda: gw.state.pools["qwen"].queue.is_ready(), timeout=10)
    models = httpx.get(gw.url + "/v1/models").json()["data"]
    assert models and all(m["context_length"] == 2048 for m in models), models
    assert all("capabilities" not in m for m in models)  # vLLM does not say


def test_chat_through_alias_reaches_vllm_with_its_served_name(
    client: openai.OpenAI, vllm_sim: Any
) -> None:
    sim, _ = vllm_sim
    completion = client.chat.completions.create(model="qwen", messages=MSG, max_tokens=5, seed=11)
    assert completion.model == SERVED
    assert len(completion.choices[0].message.content.split()) == 5
    assert sim.bodies[-1]["model"] == SERVED and sim.bodies[-1]["seed"] == 11


def test_stream_usage_only_when_asked(client: openai.OpenAI) -> None:
    plain = list(
        client.chat.completions.create(model=SERVED, messages=MSG, max_tokens=4, stream=True)
    )
    assert all(c.choices for c in plain) and all(c.usage is None for c in plain)
    with_usage = list(
        client.chat.completions.create(
            model=SERVED,
            messages=MSG,
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert with_usage[-1].choices == [] and with_usage[-1].usage.completion_tokens == 4


def test_seed_is_deterministic_through_the_gateway(client: openai.OpenAI) -> None:
    def text(seed: int) -> str:
        return (
            client.completions.create(model=SERVED, prompt="x", max_tokens=8, seed=seed)
            .choices[0]
            .text
        )

    assert text(5) == text(5)
    assert text(5) != text(6)


def test_vllm_errors_are_normalised(gw: Gateway) -> None:
    response = httpx.post(
        gw.url + "/v1/chat/completions", json={"model": SERVED, "messages": MSG, "n": 0}, timeout=10
    )
    assert response.status_code == 400  # caught by the gateway before vLLM
    response = httpx.post(
        gw.url + "/v1/completions",
        json={"model": SERVED, "prompt": "x", "max_tokens": 2, "fake_bad": True, "stream": False},
        timeout=10,
    )
    assert response.status_code == 200


def test_vllm_integer_error_code_becomes_string_or_null(
    vllm_sim: Any, gateway_factory: Any
) -> None:
    sim, server = vllm_sim
    # the pool claims a model name the replica does not serve: vLLM answers its own 404
    cfg = {
        "pools": [
            pool("wrong", ["other-model"], [{"id": "v0", "engine": "vllm", "url": server.url}])
        ]
    }
    with gateway_factory(cfg) as gateway:
        response = httpx.post(
            gateway.url + "/v1/chat/completions",
            json={"model": "other-model", "messages": MSG},
            timeout=10,
        )
    assert response.status_code == 404
    assert response.json()["error"] == {
        "message": "The model `other-model` does not exist.",
        "type": "invalid_request_error",
        "param": "model",
        "code": None,
    }


def test_embeddings(client: openai.OpenAI) -> None:
    assert client.embeddings.create(model="qwen", input="x").data[0].embedding == [0.0, 0.5, 1.0]


def test_disconnect_aborts_the_vllm_request(gw: Gateway, vllm_sim: Any) -> None:
    sim, _ = vllm_sim
    sim.token_delay_s = 0.05
    body = {"model": SERVED, "messages": MSG, "max_tokens": 200, "stream": True}
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=10) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: {"):
                break
        assert wait_until(
            lambda: (
                httpx.get(gw.url + "/v1/pools/qwen/health").json()["metrics"]["replicas"][0][
                    "engine_running"
                ]
                == 1
            )
        )
    assert wait_until(lambda: sim.running == 0 and sim.aborted == 1, timeout=2)
    assert wait_until(lambda: gw.slots_in_use() == 0)


def test_dead_engine_makes_the_pool_unready(gw: Gateway, vllm_sim: Any) -> None:
    sim, _ = vllm_sim
    sim.dead = True
    assert wait_until(lambda: httpx.get(gw.url + "/health").status_code == 503, timeout=3)
    response = httpx.post(
        gw.url + "/v1/chat/completions", json={"model": SERVED, "messages": MSG}, timeout=10
    )
    assert response.status_code == 503 and response.headers["retry-after"]
    sim.dead = False
    assert wait_until(lambda: httpx.get(gw.url + "/health").status_code == 200, timeout=3)
