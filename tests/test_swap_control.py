"""The swap control plane on a fake upstream: the reservation lock (423, renew, release,
force, expiry), signed webhooks to a real local receiver (signature, retries, never in the
reload's way), whole-config reloads (validated first, all-or-nothing), and the API's
answers for bad requests. The reloads themselves are real: new replica set, health gate,
warm-up request, atomic switch, retirement."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from gateway.config import load_config
from gateway.webhooks import verify
from tests.conftest import (
    ADMIN,
    ADMIN_TOKEN,
    free_port,
    run_gateway,
    serve_aiohttp,
    variant_toml,
)
from tests.fakes.servers import AiohttpThread, wait_until

SECRET = "a-webhook-secret-of-some-length"


class Receiver:
    """A webhook receiver that answers 500 to the first ``fail_first`` deliveries."""

    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.gate = threading.Event()  # deliveries wait for it: a receiver as slow as we like
        self.gate.set()
        self.attempts: list[tuple[dict[str, str], bytes]] = []
        self.accepted: list[tuple[dict[str, str], bytes]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = dict(request.headers)
        self.attempts.append((headers, body))
        await asyncio.get_running_loop().run_in_executor(None, self.gate.wait, 30)
        if len(self.attempts) <= self.fail_first:
            return web.Response(status=500)
        self.accepted.append((headers, body))
        return web.Response(status=204)


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, AiohttpThread]]:
    hook = Receiver(fail_first=1)
    with serve_aiohttp(hook.app) as server:
        yield hook, server


def write(
    path: Path, port: int, upstream: str, *, hook_url: str | None = None, extra: str = ""
) -> None:
    hooks = (
        f'[[webhooks]]\nurl = "{hook_url}"\nsecret = "{SECRET}"\n' if hook_url is not None else ""
    )
    path.write_text(
        f"""
[server]
bind = "127.0.0.1:{port}"

[auth]
admin_token = "{ADMIN_TOKEN}"

{hooks}
[[pools]]
id = "p"
models = ["m", "alias"]
health_interval_s = 0.2
reload_timeout_s = 3

[[pools.replicas]]
id = "f0"
engine = "openai"
url = "{upstream}"
slots = 4

[[pools.variants]]
id = "two"
models = ["m2", "alias"]

[[pools.variants.replicas]]
id = "f1"
engine = "openai"
url = "{upstream}"
slots = 8
{extra}"""
    )


def gateway(tmp_path: Path, upstream: str, **kwargs: Any) -> Any:
    path = tmp_path / "orchgate.toml"
    write(path, free_port(), upstream, **kwargs)
    return run_gateway(load_config(path, env={}), tmp_path, path)


def reload(url: str, body: Any = None, token: str | None = None) -> httpx.Response:
    headers = {**ADMIN, "X-Reservation-Token": token} if token else ADMIN
    return httpx.post(f"{url}/v1/pools/p/reload?wait=true", json=body, headers=headers, timeout=30)


def config_reload(url: str) -> httpx.Response:
    return httpx.post(url + "/v1/config/reload", headers=ADMIN, timeout=30)


def test_reservation_lock_blocks_reloads_until_released_forced_or_expired(
    fake_upstream: Any, tmp_path: Path
) -> None:
    _, server = fake_upstream
    with gateway(tmp_path, server.url) as gw:
        base = gw.url
        taken = httpx.post(
            f"{base}/v1/pools/p/reservation", json={"holder": "nightly-eval", "ttl_s": 60}
        )
        assert taken.status_code == 201, taken.text
        token = taken.json()["token"]
        assert taken.json()["holder"] == "nightly-eval" and 59 < taken.json()["expires_in_s"] <= 60

        # anyone can see who holds it, never the token
        seen = httpx.get(f"{base}/v1/pools/p/reservation").json()
        assert seen["reserved"] is True and seen["holder"] == "nightly-eval"
        assert "token" not in seen

        for offered in (None, "wrong-token"):
            locked = reload(base, {"variant": "two"}, offered)
            assert locked.status_code == 423, locked.text
            assert locked.json()["error"]["code"] == "pool_reserved"
            assert locked.json()["reservation"]["holder"] == "nightly-eval"
        assert gw.state.pools["p"].variant == "default"

        # someone else cannot take it; the holder renews with its token
        other = httpx.post(f"{base}/v1/pools/p/reservation", json={"holder": "someone"})
        assert other.status_code == 409 and other.json()["reservation"]["holder"] == "nightly-eval"
        renewed = httpx.post(
            f"{base}/v1/pools/p/reservation",
            json={"holder": "nightly-eval", "ttl_s": 120},
            headers={"X-Reservation-Token": token},
        )
        assert renewed.status_code == 200 and renewed.json()["token"] == token
        assert renewed.json()["expires_in_s"] > 60

        # the holder's token lets its own reload through
        swapped = reload(base, {"variant": "two"}, token)
        assert swapped.status_code == 200, swapped.text

        # release: the wrong token is refused, the right one works
        wrong = httpx.delete(
            f"{base}/v1/pools/p/reservation", headers={"X-Reservation-Token": "nope"}
        )
        assert wrong.status_code == 423
        released = httpx.delete(
            f"{base}/v1/pools/p/reservation", headers={"X-Reservation-Token": token}
        )
        assert released.status_code == 204
        assert httpx.get(f"{base}/v1/pools/p/reservation").json()["reserved"] is False
        assert reload(base, {"variant": "default"}).status_code == 200

        # an operator force-releases a lock someone forgot
        httpx.post(f"{base}/v1/pools/p/reservation", json={"holder": "forgetful"})
        assert reload(base).status_code == 423
        forced = httpx.delete(f"{base}/v1/pools/p/reservation?force=true", headers=ADMIN)
        assert forced.status_code == 204
        assert reload(base).status_code == 200

        # and a lock ends on its own
        short = httpx.post(f"{base}/v1/pools/p/reservation", json={"holder": "brief", "ttl_s": 1})
        assert short.status_code == 201
        assert reload(base).status_code == 423

        def expired() -> bool:
            return httpx.get(f"{base}/v1/pools/p/reservation").json()["reserved"] is False

        assert wait_until(expired, timeout=5)
        assert reload(base).status_code == 200


@pytest.mark.slow  # waits out real 1 s delivery backoffs
def test_webhooks_are_signed_retried_and_never_delay_the_reload(
    fake_upstream: Any, receiver: tuple[Receiver, AiohttpThread], tmp_path: Path, dead_url: str
) -> None:
    _, server = fake_upstream
    hook, hook_server = receiver
    hook.gate.clear()  # the receiver hangs until the reload has answered
    dead = variant_toml("dead", ["m", "alias"], f'id = "x"\nengine = "openai"\nurl = "{dead_url}"')
    with gateway(tmp_path, server.url, hook_url=hook_server.url + "/hook", extra=dead) as gw:
        swapped = reload(gw.url, {"variant": "two"})  # would time out if it waited
        assert swapped.status_code == 200, swapped.text
        assert wait_until(lambda: len(hook.attempts) == 1)  # delivery under way, not done
        assert hook.accepted == []
        hook.gate.set()

        # the first delivery got a 500; the retry (same delivery id) was accepted
        assert wait_until(lambda: len(hook.accepted) == 1, timeout=10), hook.attempts
        assert len(hook.attempts) == 2
        first, second = hook.attempts[0][0], hook.attempts[1][0]
        assert first["X-Orchgate-Delivery"] == second["X-Orchgate-Delivery"]
        assert (first["X-Orchgate-Attempt"], second["X-Orchgate-Attempt"]) == ("1", "2")

        headers, body = hook.accepted[0]
        assert headers["X-Orchgate-Event"] == "swap_complete"
        signature, timestamp = headers["X-Orchgate-Signature"], headers["X-Orchgate-Timestamp"]
        assert signature.startswith("sha256=")
        assert verify(SECRET.encode(), timestamp, body, signature)
        assert not verify(b"another secret", timestamp, body, signature)
        assert not verify(SECRET.encode(), timestamp, body.replace(b"two", b"owt"), signature)
        assert not verify(SECRET.encode(), str(int(timestamp) - 3600), body, signature)
        event = httpx.Response(200, content=body).json()
        assert event["event"] == "swap_complete" and event["pool_id"] == "p"
        assert event["variant"] == "two" and event["models"] == ["m2", "alias"]
        assert event["previous"] == {"variant": "default", "models": ["m", "alias"]}

        # a failed swap is announced too
        failed = reload(gw.url, {"variant": "dead"})
        assert failed.status_code == 409 and failed.json()["rolled_back"] is True
        assert wait_until(lambda: len(hook.accepted) == 2, timeout=10)
        headers, body = hook.accepted[1]
        assert headers["X-Orchgate-Event"] == "swap_failed"
        event = httpx.Response(200, content=body).json()
        assert event["rolled_back"] is True and "not healthy within" in event["error"]
        assert gw.state.pools["p"].variant == "two"


def test_reload_swaps_routing_and_models_atomically(fake_upstream: Any, tmp_path: Path) -> None:
    fake, server = fake_upstream
    three = variant_toml(
        "three", ["m3", "alias"], f'id = "f0"\nengine = "openai"\nurl = "{server.url}"'
    )
    with gateway(tmp_path, server.url, extra=three) as gw:
        chat = {"model": "alias", "messages": [{"role": "user", "content": "hi"}]}
        first = httpx.post(gw.url + "/v1/chat/completions", json=chat)
        assert first.headers["x-orchgate-replica"] == "f0"
        assert reload(gw.url, {"variant": "two"}).status_code == 200
        second = httpx.post(gw.url + "/v1/chat/completions", json=chat)
        assert second.status_code == 200 and second.headers["x-orchgate-replica"] == "f1"
        # the warm-up went to the new replica with the new model name, before the switch
        assert any(b'"model":"m2"' in body and b'"max_tokens":1' in body for body in fake.bodies)
        gone = httpx.post(gw.url + "/v1/chat/completions", json={**chat, "model": "m"})
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
        assert (
            httpx.post(gw.url + "/v1/chat/completions", json={**chat, "model": "m2"}).status_code
            == 200
        )
        # the variant has 8 slots, configured
        assert gw.state.pools["p"].queue.ready_slots() == 8
        # a third setting: the model list changes with it
        third = reload(gw.url, {"variant": "three"})
        assert third.status_code == 200 and third.json()["variant"] == "three"
        models = {m["id"] for m in httpx.get(gw.url + "/v1/models").json()["data"]}
        assert models == {"m3", "alias"}
        openapi = httpx.get(gw.url + "/openapi.json").json()
        assert "m3" in str(openapi) and '"m2"' not in str(openapi)


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"variant": "nope"}, 404, "not_found"),
        ({"variant": "two", "bogus": 1}, 400, "invalid_request"),
        ({"variant": ""}, 400, "invalid_request"),
        ({"strategy": "teleport"}, 400, "invalid_request"),
        ([], 400, "invalid_request"),
    ],
)
def test_bad_reload_requests_change_nothing(
    fake_upstream: Any, tmp_path: Path, body: Any, status: int, code: str
) -> None:
    _, server = fake_upstream
    with gateway(tmp_path, server.url) as gw:
        answer = reload(gw.url, body)
        assert answer.status_code == status, answer.text
        assert answer.json()["error"]["code"] == code
        assert gw.state.pools["p"].variant == "default" and not gw.state.retiring
        bad_json = httpx.post(
            f"{gw.url}/v1/pools/p/reload",
            content=b"{not json",
            headers={**ADMIN, "content-type": "application/json"},
        )
        assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == "invalid_json"
        assert httpx.post(f"{gw.url}/v1/pools/nope/reload", headers=ADMIN).status_code == 404


def extra_pool(models: str, url: str, *, timeout: str = "") -> str:
    return (
        f'\n[[pools]]\nid = "q"\nmodels = {models}\n{timeout}'
        f'[[pools.replicas]]\nid = "g0"\nengine = "openai"\nurl = "{url}"\n'
    )


def test_config_reload_applies_a_valid_file_whole_and_an_invalid_one_not_at_all(
    fake_upstream: Any, tmp_path: Path, dead_url: str
) -> None:
    _, server = fake_upstream
    path = tmp_path / "orchgate.toml"
    with gateway(tmp_path, server.url) as gw:
        good = path.read_text()
        # a model name owned by two pools: valid TOML, invalid config
        path.write_text(good + extra_pool('["m"]', "http://127.0.0.1:1"))
        refused = config_reload(gw.url)
        assert refused.status_code == 422 and "already served by pool" in refused.text
        assert list(gw.state.pools) == ["p"]

        # a new pool with a replica that never comes up: all or nothing
        path.write_text(good + extra_pool('["q"]', dead_url, timeout="reload_timeout_s = 1\n"))
        failed = config_reload(gw.url)
        assert failed.status_code == 409 and failed.json()["rolled_back"] is True
        assert list(gw.state.pools) == ["p"]

        # a valid file: pool q added, p unchanged (it keeps running as it is)
        tasks = good.replace("[server]", "[tasks]\ndefault_max_tokens = 7\n\n[server]")
        path.write_text(tasks + extra_pool('["q"]', server.url))
        applied = config_reload(gw.url)
        assert applied.status_code == 200, applied.text
        assert applied.json()["pools"] == {"p": "unchanged", "q": "added"}
        assert applied.json()["restart_required"] == ["tasks"]
        chat = {"model": "q", "messages": [{"role": "user", "content": "hi"}]}
        assert httpx.post(gw.url + "/v1/chat/completions", json=chat).status_code == 200

        # removing it again retires it
        path.write_text(good)
        removed = config_reload(gw.url)
        assert removed.json()["pools"] == {"p": "unchanged", "q": "removed"}
        assert httpx.post(gw.url + "/v1/chat/completions", json=chat).status_code == 404
        assert wait_until(lambda: not gw.state.retiring, timeout=10)


def test_config_reload_without_a_file_is_a_conflict(
    gateway_factory: Any, fake_upstream: Any
) -> None:
    _, server = fake_upstream
    replica = {"id": "f0", "engine": "openai", "url": server.url, "slots": 1}
    with gateway_factory({"pools": [{"id": "p", "models": ["m"], "replicas": [replica]}]}) as gw:
        answer = config_reload(gw.url)
        assert answer.status_code == 409 and "without --config" in answer.text
        # a pool reload without a body re-applies the startup config
        assert reload(gw.url).status_code == 200


def test_a_replica_that_is_healthy_but_serves_another_model_is_not_switched_to(
    fake_upstream: Any, vllm_sim: Any, tmp_path: Path
) -> None:
    """vLLM answers /health whatever it loaded; only a request for the model proves it."""
    _, server = fake_upstream
    sim, sim_server = vllm_sim
    v0 = f'id = "v0"\nengine = "vllm"\nurl = "{sim_server.url}"\nslots = 4'
    settings = variant_toml("wrong", ["meta-llama/Llama-3.1-8B", "alias"], v0) + variant_toml(
        "right", [sim.served_model, "alias"], v0
    )
    with gateway(tmp_path, server.url, extra=settings) as gw:
        refused = reload(gw.url, {"variant": "wrong"})
        assert refused.status_code == 409, refused.text
        message = refused.json()["error"]["message"]
        assert "v0 is healthy but did not serve model 'meta-llama/Llama-3.1-8B'" in message
        assert "does not exist" in message
        assert gw.state.pools["p"].replicas[0].replica_id == "f0"
        right = reload(gw.url, {"variant": "right"})
        assert right.status_code == 200, right.text
        chat = {"model": "alias", "messages": [{"role": "user", "content": "hi"}]}
        answer = httpx.post(gw.url + "/v1/chat/completions", json=chat)
        assert answer.status_code == 200 and answer.headers["x-orchgate-replica"] == "v0"


def test_the_contract_reload_body_names_the_model(fake_upstream: Any, tmp_path: Path) -> None:
    """llama-orch's control contract: ``{"new_model_ref": ...}`` picks the setting that
    serves that model (a variant's model name or id); a failed reload is ``409``."""
    _, server = fake_upstream
    with gateway(tmp_path, server.url) as gw:
        swapped = reload(gw.url, {"new_model_ref": "m2"})
        assert swapped.status_code == 200 and swapped.json()["variant"] == "two", swapped.text
        back = reload(gw.url, {"new_model_ref": "m"})
        assert back.status_code == 200 and back.json()["variant"] == "default"
        unknown = reload(gw.url, {"new_model_ref": "gpt-9"})
        assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "new_model_ref"
