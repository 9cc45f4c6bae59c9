"""Models on demand with real llama-server processes: a catalog folder built from the real
SmolLM2 GGUF (two names for it, a truncated copy, a copy no engine accepts), a recipe, and
the official openai SDK as the client. First request loads; two models sharing room for
one take turns under continuous load with zero failed requests; the idle TTL stops the
process; damaged models answer 503 and leave the running one alone; a budget too small
answers ``insufficient_memory``; admin jobs report every phase."""

from __future__ import annotations

import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from backends.model_file import read_model
from gateway.residency import Residency
from policies.fit import MIB, estimate
from tests import catalog_trees as trees
from tests.conftest import ADMIN, Gateway, run_gateway, test_assets
from tests.fakes.servers import wait_until

pytestmark = pytest.mark.llamacpp

CTX, SLOTS = 1024, 2


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    smollm2 = test_assets.smollm2_model()
    root = tmp_path_factory.mktemp("models")
    trees.link_or_copy(smollm2, root / "alpha.gguf")
    trees.link_or_copy(smollm2, root / "beta.gguf")
    trees.truncated_copy(smollm2, root / "broken.gguf")
    trees.refused_copy(smollm2, root / "bogus.gguf")
    (root / "notes.txt").write_text("not a model")
    return root


def one_model_mib() -> int:
    shape = read_model(test_assets.smollm2_model())
    return estimate(shape, context_tokens=CTX, parallel=SLOTS, device="cpu").total_bytes // MIB


def catalog(models_dir: Path, *, memory_mib: int, **extra: Any) -> dict[str, Any]:
    launch = [
        str(test_assets.llama_server()), "-m", "{model_path}", "--host", "{host}",
        "--port", "{port}", "-c", "{ctx}", "-np", "{slots}", "-t", "2", "--no-repack",
        "--no-webui",
    ]  # fmt: skip
    return {
        "server": {"access_log": False},
        "catalog": {
            "dirs": [str(models_dir)],
            "recipes": [
                {
                    "engine": "llamacpp",
                    "match": "*.gguf",
                    "ctx": CTX,
                    "slots": SLOTS,
                    "launch": launch,
                }
            ],  # fmt: skip
            "memory_mib": {"cpu": memory_mib},
            "queue_timeout_s": 120.0,
            "load_timeout_s": 60.0,
            **extra,
        },
    }


@pytest.fixture
def room_for_one(models_dir: Path, tmp_path: Path) -> Iterator[Gateway]:
    config = catalog(
        models_dir,
        memory_mib=one_model_mib() * 3 // 2,
        models={"beta": {"aliases": ["b"]}},
    )
    with run_gateway(config, tmp_path) as gw:
        yield gw


def residency(gw: Gateway) -> Residency:
    catalog = gw.state.catalog
    assert isinstance(catalog, Residency)
    return catalog


def client(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat(gw: Gateway, model: str) -> str:
    answer = client(gw).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hi"}], max_tokens=4
    )
    return answer.choices[0].message.content or ""


def listed(gw: Gateway) -> dict[str, dict[str, Any]]:
    body = httpx.get(gw.url + "/v1/models", timeout=10).json()
    return {m["id"]: m for m in body["data"]}


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_for(condition: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_first_request_loads_the_model_and_the_list_shows_everything(
    room_for_one: Gateway,
) -> None:
    gw = room_for_one
    models = listed(gw)
    assert models["alpha"]["status"] == "unloaded" and models["beta"]["status"] == "unloaded"
    assert models["b"]["root"] == "beta"  # an alias from [catalog.models.beta]
    assert models["broken"]["status"] == "failed"  # its header says it is truncated
    assert models["alpha"]["capabilities"] == ["chat", "completions"]
    assert models["alpha"]["context_length"] == CTX
    assert "notes" not in models
    assert httpx.get(gw.url + "/health", timeout=5).status_code == 200  # unloaded is not unready

    started = time.monotonic()
    assert chat(gw, "alpha")
    first_token_s = time.monotonic() - started
    # the replica serves from its first healthy probe; "loaded" follows its warm-up request
    assert wait_until(lambda: listed(gw)["alpha"]["status"] == "loaded", timeout=5)
    jobs = httpx.get(gw.url + "/v1/jobs", headers=ADMIN, timeout=5).json()["data"]
    load = next(j for j in jobs if j["model"] == "alpha" and j["kind"] == "load")
    phases = [p["phase"] for p in load["phases"]]
    assert phases == ["queued", "starting", "loading", "warming_up", "ready"]
    assert 0 < load["load_ms"] < first_token_s * 1000
    # the next request does not wait for anything
    started = time.monotonic()
    chat(gw, "alpha")
    assert time.monotonic() - started < first_token_s


def test_two_models_in_room_for_one_take_turns_with_zero_failures(room_for_one: Gateway) -> None:
    gw = room_for_one
    failures: list[str] = []
    done: list[str] = []

    def user(model: str) -> None:
        for _ in range(5):  # a count, not a duration: the same work on any machine
            try:
                chat(gw, model)
                done.append(model)
            except Exception as exc:  # noqa: BLE001 -- counted, the assertion says which
                failures.append(f"{model}: {exc!r}")

    threads = [threading.Thread(target=user, args=(m,)) for m in ("alpha", "b", "alpha", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    catalog = residency(gw)
    evictions = sum(n for (event, _, why), n in catalog.counts.items()
                    if event == "unload" and why == "evicted")  # fmt: skip
    loads = sum(n for (event, _, ok), n in catalog.counts.items() if event == "load" and ok == "ok")
    print(
        f"served alpha={done.count('alpha')} beta={done.count('b')}, loads={loads}, "
        f"evictions={evictions}, failures={len(failures)}"
    )
    assert failures == []
    assert done.count("alpha") == 10 and done.count("b") == 10
    assert evictions >= 2 and loads >= 3, catalog.counts
    # never both at once: the budget holds one
    statuses = [m.status for m in catalog.models.values()]
    assert statuses.count("loaded") <= 1
    assert gw.slots_in_use() == 0


def test_idle_ttl_stops_the_process(models_dir: Path, tmp_path: Path) -> None:
    from tests.conftest import serve_aiohttp
    from tests.test_swap_control import SECRET, Receiver

    hook = Receiver()
    with serve_aiohttp(hook.app) as receiver:
        config = catalog(models_dir, memory_mib=4096, models={"alpha": {"idle_ttl_s": 1.5}})
        config["webhooks"] = [{"url": receiver.url + "/hook", "secret": SECRET}]
        _idle_ttl(config, tmp_path, hook)


def _idle_ttl(config: dict[str, Any], tmp_path: Path, hook: Any) -> None:
    import msgspec

    with run_gateway(config, tmp_path) as gw:
        chat(gw, "alpha")
        alpha = residency(gw).models["alpha"]
        assert alpha.status == "loaded" and port_open(alpha.port)
        wait_for(lambda: alpha.status == "unloaded", timeout=10)
        assert not port_open(alpha.port)  # the process is gone, not just unlisted
        assert residency(gw).counts["unload", "alpha", "idle"] == 1
        assert gw.state.model_states()["alpha"] == "Retired"  # SPEC's two states
        assert chat(gw, "alpha")  # and it comes back on the next request
        wait_for(lambda: len(hook.accepted) >= 3)
        events = [msgspec.json.decode(body) for _, body in hook.accepted]
        assert [e["event"] for e in events[:3]] == [
            "model_loaded", "model_unloaded", "model_loaded"
        ]  # fmt: skip
        assert events[1]["reason"] == "idle" and events[0]["load_ms"] > 0


def test_damaged_models_answer_503_and_leave_the_running_model_alone(
    models_dir: Path, tmp_path: Path
) -> None:
    config = catalog(models_dir, memory_mib=one_model_mib() * 5 // 2)
    with run_gateway(config, tmp_path) as gw:
        chat(gw, "alpha")
        alpha = residency(gw).models["alpha"]
        pid = alpha.pool.processes[0].pid if alpha.pool else None
        with pytest.raises(openai.APIStatusError) as truncated:
            chat(gw, "broken")
        assert truncated.value.status_code == 503
        assert "truncated" in truncated.value.message and "broken" in truncated.value.message
        # a header that reads fine, an engine that refuses it: the load fails, its waiter
        # gets a retriable 503 naming the model and why, and the next try backs off
        with pytest.raises(openai.APIStatusError) as refused:
            chat(gw, "bogus")
        assert refused.value.status_code == 503
        assert refused.value.response.headers.get("retry-after")
        body = refused.value.response.json()["error"]
        assert body["code"] == "model_unavailable"
        assert "bogus" in body["message"] and "exited" in body["message"]
        assert residency(gw).models["bogus"].status == "failed"
        with pytest.raises(openai.APIStatusError) as again:
            chat(gw, "bogus")
        assert again.value.status_code == 503  # backing off: refused at once, no new process
        assert residency(gw).counts["load", "bogus", "failed"] == 1
        assert alpha.status == "loaded" and alpha.pool is not None
        assert alpha.pool.processes[0].pid == pid
        assert chat(gw, "alpha")
        assert gw.slots_in_use() == 0 and gw.queue_depth() == 0


def test_a_budget_too_small_answers_insufficient_memory(models_dir: Path, tmp_path: Path) -> None:
    with run_gateway(catalog(models_dir, memory_mib=16), tmp_path) as gw:
        response = httpx.post(
            gw.url + "/v1/chat/completions",
            json={"model": "alpha", "messages": [{"role": "user", "content": "hi"}]},
            timeout=30,
        )
        assert response.status_code == 503
        body = response.json()
        assert body["error"]["code"] == "insufficient_memory"
        memory = body["memory"]
        assert memory["need_bytes"] > 16 * MIB and memory["budgets_bytes"]["cpu"] == 16 * MIB
        assert memory["estimate"]["weights_bytes"] > 0
        assert residency(gw).models["alpha"].pool.processes == []  # nothing was started


def test_admin_jobs_load_and_unload(room_for_one: Gateway) -> None:
    gw = room_for_one
    assert httpx.post(gw.url + "/v1/models/beta/load", timeout=5).status_code == 401
    response = httpx.post(gw.url + "/v1/models/beta/load", headers=ADMIN, timeout=5)
    assert response.status_code == 202
    job_url = gw.url + response.headers["location"]
    wait_for(lambda: httpx.get(job_url, headers=ADMIN, timeout=5).json()["phase"] == "ready", 60)
    assert listed(gw)["beta"]["status"] == "loaded"
    done = httpx.post(gw.url + "/v1/models/b/unload?wait=true", headers=ADMIN, timeout=30)
    assert done.status_code == 200 and done.json()["phase"] == "unloaded"
    assert [p["phase"] for p in done.json()["phases"]] == [
        "queued", "draining", "unloading", "unloaded"
    ]  # fmt: skip
    assert listed(gw)["beta"]["status"] == "unloaded"
    missing = httpx.post(gw.url + "/v1/models/nope/load", headers=ADMIN, timeout=5)
    assert missing.status_code == 404
    catalog = httpx.get(gw.url + "/v1/catalog", headers=ADMIN, timeout=5).json()
    beta = next(m for m in catalog["models"] if m["id"] == "beta")
    assert beta["memory"]["kv_cache_bytes"] > 0 and beta["engine"] == "llamacpp"
    assert any("notes.txt" not in s["path"] for s in catalog["skipped"]) or catalog["skipped"] == []


def test_a_reserved_model_is_kept_for_its_holder(room_for_one: Gateway) -> None:
    """A reservation on a catalog model's pool (the same swap lock as a pool reload): no
    unload or swap without the holder's token (423), no eviction for another model (that
    one answers insufficient_memory naming it); the holder unloads it."""
    gw = room_for_one
    assert chat(gw, "alpha")
    pool_id = listed(gw)["alpha"]["pool"]
    held = httpx.post(
        f"{gw.url}/v1/pools/{pool_id}/reservation", json={"holder": "bench-7", "ttl_s": 60}
    )
    assert held.status_code == 201, held.text
    token = held.json()["token"]
    locked = httpx.post(gw.url + "/v1/models/alpha/unload", headers=ADMIN, timeout=5)
    assert locked.status_code == 423, locked.text
    assert locked.json()["error"]["code"] == "pool_reserved"
    swap = httpx.post(gw.url + "/v1/models/beta/load?replace=alpha", headers=ADMIN, timeout=5)
    assert swap.status_code == 423 and listed(gw)["beta"]["status"] == "unloaded"
    with pytest.raises(openai.APIStatusError) as refused:
        chat(gw, "beta")  # room for one, and that one is reserved: never evicted
    assert refused.value.status_code == 503
    assert "reserved" in str(refused.value.body) and "alpha" in str(refused.value.body)
    menu = {m["id"]: m for m in httpx.get(gw.url + "/v1/status").json()["catalog"]}
    assert menu["alpha"]["reservation"]["holder"] == "bench-7"
    assert menu["beta"]["fit"]["fits"] is False and "alpha" in menu["beta"]["fit"]["why"]
    mine = {**ADMIN, "X-Reservation-Token": token}
    done = httpx.post(gw.url + "/v1/models/alpha/unload?wait=true", headers=mine, timeout=30)
    assert done.status_code == 200 and done.json()["phase"] == "unloaded"


def test_task_api_and_anthropic_surface_load_on_demand(room_for_one: Gateway) -> None:
    """Either surface starts a catalog model: a task's 202 predicts the load in its
    ``predicted_start_ms``, then its events run to the end; Anthropic's messages too."""
    from tests.test_tasks_api import read_events

    gw = room_for_one
    submitted = httpx.post(
        gw.url + "/v1/tasks",
        json={"model_ref": "alpha", "prompt": "The sea is", "max_tokens": 6},
        timeout=30,
    )
    assert submitted.status_code == 202
    accepted = submitted.json()
    assert accepted["queue_position"] >= 1 and accepted["predicted_start_ms"] >= 1000
    events = read_events(gw, accepted["task_id"])
    assert events[0][0] == "started" and events[-1][0] == "end"
    assert events[-1][1]["tokens_out"] > 0
    message = httpx.post(
        gw.url + "/v1/messages",
        json={"model": "b", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]},
        timeout=120,
    )
    assert message.status_code == 200 and message.json()["type"] == "message"
    # the replica serves from its first healthy probe; "loaded" follows its warm-up request
    assert wait_until(lambda: listed(gw)["beta"]["status"] == "loaded", timeout=5)
    assert listed(gw)["alpha"]["status"] != "loaded"


def test_explicit_pools_coexist_and_keep_their_names(
    models_dir: Path, tmp_path: Path, llama_server: Any
) -> None:
    from tests.conftest import pool

    config = catalog(models_dir, memory_mib=4096, models={"beta": {"aliases": ["fixed"]}})
    config["pools"] = [
        pool("fixed", ["fixed"], [{"id": "llama0", "engine": "llamacpp", "url": llama_server.url}])
    ]
    with run_gateway(config, tmp_path) as gw:
        models = listed(gw)
        assert models["fixed"]["pool"] == "fixed" and "status" not in models["fixed"]
        assert "beta" not in models  # its alias is an explicit pool's name: skipped, said why
        skipped = httpx.get(gw.url + "/v1/catalog", headers=ADMIN, timeout=5).json()["skipped"]
        assert any("'fixed' is already served" in s["reason"] for s in skipped)
        assert chat(gw, "fixed") and chat(gw, "alpha")
        assert gw.state.pools["fixed"].on_demand is False


def test_the_catalog_ranking_over_http(room_for_one: Gateway) -> None:
    gw = room_for_one
    ranking = httpx.get(gw.url + "/v1/catalog/rank?job=chat", headers=ADMIN, timeout=10)
    assert ranking.status_code == 200
    rows = ranking.json()["data"]
    assert {"alpha", "beta"} <= {r["id"] for r in rows} and rows[0]["fits"]
    assert rows[0]["decode_tokens_s"] > 0 and rows[0]["device"].startswith("CPU")
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    assert httpx.get(gw.url + "/v1/catalog/rank?job=nope", headers=ADMIN).status_code == 400
    assert httpx.get(gw.url + "/v1/catalog/rank").status_code in (401, 403)


def test_the_status_page_menu_loads_and_unloads_under_traffic(
    models_dir: Path, tmp_path: Path
) -> None:
    """The model menu in a real headless Chromium: every catalog model with its status,
    size, memory and estimated speed; Load asks to confirm and for the admin token, shows
    the job's phases live, then the model is loaded; Unload likewise -- while a client keeps
    chatting with the other model."""
    from tests.browser import Browser
    from tests.conftest import ADMIN_TOKEN

    config = catalog(
        models_dir, memory_mib=one_model_mib() * 3, models={"beta": {"aliases": ["b"]}}
    )
    with run_gateway(config, tmp_path) as gw:
        _menu_under_traffic(gw, tmp_path, Browser, ADMIN_TOKEN)


def _menu_under_traffic(gw: Gateway, tmp_path: Path, Browser: Any, ADMIN_TOKEN: str) -> None:  # noqa: N803

    def menu(model: str) -> str:
        return str(browser.evaluate(
            f"document.querySelector('[data-model=\"{model}\"]').closest('tr').innerText"
        ))  # fmt: skip

    def click(model: str, action: str) -> None:
        button = f"document.querySelector('[data-model=\"{model}\"] button[data-action={action}]')"
        assert browser.wait_for(lambda: browser.evaluate(f"{button} !== null")), menu(model)
        browser.evaluate(f"{button}.click()")

    stop = threading.Event()
    failures: list[str] = []

    def traffic() -> None:
        while not stop.is_set():
            try:
                chat(gw, "alpha")
            except Exception as exc:  # noqa: BLE001 -- the assertion lists them
                failures.append(repr(exc))

    worker = threading.Thread(target=traffic)
    with Browser() as browser:
        browser.goto(gw.url + "/status")
        assert browser.wait_for(lambda: "est. tokens/s" in browser.text()), browser.text()
        worker.start()
        assert browser.wait_for(lambda: "loaded" in menu("alpha"), timeout=60), menu("alpha")
        assert "unloaded" in menu("beta") and "MiB" in menu("beta")
        assert re.search(r"beta\s+unloaded\s+0\.1 GiB\s+\d+ MiB · fits\s+\d+", browser.text())
        assert "failed" in menu("broken")
        click("beta", "load")
        assert browser.wait_for(lambda: "Load beta?" in menu("beta")), menu("beta")
        browser.evaluate(
            '(() => { const i = document.querySelector(\'[data-model="beta"] input'
            f"[data-field=admin-token]'); i.value = '{ADMIN_TOKEN}';"
            " i.dispatchEvent(new Event('input')); })()"
        )
        click("beta", "confirm-load")
        assert browser.wait_for(lambda: "load done in" in menu("beta"), timeout=120), menu("beta")
        assert browser.wait_for(lambda: "loaded" in menu("beta").split("load done")[0])
        browser.screenshot(tmp_path / "status-models.png")
        click("beta", "unload")
        assert browser.wait_for(lambda: "Unload beta?" in menu("beta")), menu("beta")
        click("beta", "confirm-unload")  # the admin token is kept in the tab now
        assert browser.wait_for(lambda: "unload done" in menu("beta"), timeout=60), menu("beta")

        # swap the busy model for the other: alpha drains and unloads, beta loads; the
        # traffic's requests for alpha wait and bring it back, none fails
        click("alpha", "swap")
        assert browser.wait_for(lambda: "Unload alpha and load" in menu("alpha")), menu("alpha")
        assert browser.evaluate(
            "document.querySelector('[data-model=alpha] select').value"
        ) == "beta"  # fmt: skip
        click("alpha", "confirm-swap")
        assert browser.wait_for(lambda: "swap to beta done in" in menu("alpha"), timeout=120), menu(
            "alpha"
        )
        assert browser.wait_for(lambda: "loaded" in menu("beta"), timeout=30), menu("beta")
        unloads = [j for j in residency(gw).jobs.recent() if j.kind == "unload"]
        assert unloads and unloads[0].model == "alpha"  # newest first
        png = browser.screenshot(tmp_path / "status-models.png")
        assert png.startswith(b"\x89PNG") and len(png) > 10_000
        keep = os.environ.get("ORCHGATE_SCREENSHOT_DIR")
        if keep:
            shutil.copy(tmp_path / "status-models.png", Path(keep) / "status-models.png")
    stop.set()
    worker.join(timeout=120)
    assert failures == []
    assert listed(gw)["beta"]["status"] == "loaded"
