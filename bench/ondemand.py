"""Models on demand: time to first token for a model that is not loaded, and what clients
see while two models share room for one.

Runs ``orchgate serve`` with only a ``[catalog]``: a folder with two names for the SmolLM2
test asset (hard links), one llama-server recipe, and a memory budget that holds one of
them. Then:

* **cold**: ``--cold`` times, unload the model (admin API), stream one chat and time the
  first content token, against the same request once the model is loaded (**warm**);
* **turns**: ``--clients`` clients stream chats, half to each model, for ``--seconds``:
  every switch evicts one model and loads the other. Counts requests served and failed
  (any non-200, broken stream or missing ``[DONE]``), loads, evictions, latency.

    python -m bench.ondemand                       # 5 cold starts, 4 clients for 30 s
    python -m bench.ondemand --cold 2 --seconds 10

Writes ``bench/results/ondemand-<utc>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.swap import REPO, free_port, percentile, test_assets, wait_gateway

ADMIN = {"Authorization": "Bearer bench-admin"}
CTX, SLOTS = 1024, 2


def config_text(port: int, models: Path, memory_mib: int) -> str:
    launch = [str(test_assets.llama_server()), "-m", "{model_path}", "--host", "{host}",
              "--port", "{port}", "-c", "{ctx}", "-np", "{slots}", "-t", "2", "--no-repack",
              "--no-webui"]  # fmt: skip
    return (
        f'[server]\nbind = "127.0.0.1:{port}"\naccess_log = false\n\n'
        '[auth]\nadmin_token = "bench-admin"\n\n'
        f"[catalog]\ndirs = [{json.dumps(str(models))}]\nmemory_mib = {{ cpu = {memory_mib} }}\n\n"
        f'[[catalog.recipes]]\nengine = "llamacpp"\nmatch = "*.gguf"\nctx = {CTX}\n'
        f"slots = {SLOTS}\nlaunch = {json.dumps(launch)}\n"
    )


def one_model_mib() -> int:
    sys.path.insert(0, str(REPO))
    from backends.model_file import read_model
    from policies.fit import MIB, estimate

    shape = read_model(test_assets.smollm2_model())
    return estimate(shape, context_tokens=CTX, parallel=SLOTS, device="cpu").total_bytes // MIB


async def first_token(http: httpx.AsyncClient, url: str, model: str) -> tuple[float, bool]:
    """Seconds to the first content token, and whether the stream ended with [DONE]."""
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me about the sea."}],
            "max_tokens": 16, "stream": True}  # fmt: skip
    started = time.monotonic()
    first = None
    last = ""
    async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
        async for line in r.aiter_lines():
            if first is None and '"content":"' in line and '"content":""' not in line:
                first = time.monotonic() - started
            if line:
                last = line
        ok = r.status_code == 200 and last == "data: [DONE]"
    return (first if first is not None else float("nan")), ok


async def wait_status(http: httpx.AsyncClient, url: str, model: str, status: str) -> None:
    for _ in range(600):
        models = (await http.get(url + "/v1/models")).json()["data"]
        if next(m for m in models if m["id"] == model)["status"] == status:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{model} never became {status}")


async def cold_starts(http: httpx.AsyncClient, url: str, rounds: int) -> dict[str, Any]:
    cold, warm = [], []
    for _ in range(rounds):
        await http.post(url + "/v1/models/alpha/unload?wait=true", headers=ADMIN)
        await wait_status(http, url, "alpha", "unloaded")
        seconds, ok = await first_token(http, url, "alpha")
        assert ok, "a cold request failed"
        cold.append(seconds)
        seconds, ok = await first_token(http, url, "alpha")
        warm.append(seconds)
    jobs = (await http.get(url + "/v1/jobs", headers=ADMIN)).json()["data"]
    loads = [j["load_ms"] for j in jobs if j["kind"] == "load" and "load_ms" in j]
    return {
        "rounds": rounds,
        "cold_first_token_ms": {
            "median": round(statistics.median(cold) * 1000, 1),
            "max": round(max(cold) * 1000, 1),
        },  # fmt: skip
        "warm_first_token_ms": {"median": round(statistics.median(warm) * 1000, 1)},
        "load_ms_median": round(statistics.median(loads), 1) if loads else None,
    }


async def turns(url: str, clients: int, seconds: float) -> dict[str, Any]:
    done: list[tuple[str, float]] = []
    failures: list[str] = []
    stop = time.monotonic() + seconds

    async def client(model: str) -> None:
        async with httpx.AsyncClient(timeout=300) as http:
            while time.monotonic() < stop:
                started = time.monotonic()
                try:
                    _, ok = await first_token(http, url, model)
                except httpx.HTTPError as exc:
                    failures.append(f"{model}: {type(exc).__name__}: {exc}")
                    continue
                if ok:
                    done.append((model, time.monotonic() - started))
                else:
                    failures.append(f"{model}: bad answer")

    await asyncio.gather(*(client("alpha" if i % 2 == 0 else "beta") for i in range(clients)))
    async with httpx.AsyncClient(timeout=30) as http:
        metrics = (await http.get(url + "/v1/catalog", headers=ADMIN)).json()
        jobs = (await http.get(url + "/v1/jobs", headers=ADMIN)).json()["data"]
    latencies = [s for _, s in done]
    return {
        "clients": clients,
        "seconds": seconds,
        "requests_ok": len(done),
        "by_model": {m: sum(1 for d, _ in done if d == m) for m in ("alpha", "beta")},
        "requests_failed": len(failures),
        "failures": failures[:10],
        "loads": sum(1 for j in jobs if j["kind"] == "load" and j["phase"] == "ready"),
        "evictions": sum(1 for j in jobs if j["kind"] == "unload" and j.get("reason") == "evicted"),
        "latency_ms": {
            "p50": round(percentile(latencies, 0.5) * 1000, 1),
            "p99": round(percentile(latencies, 0.99) * 1000, 1),
        },  # fmt: skip
        "loaded_at_end": [m["id"] for m in metrics["models"] if m["status"] == "loaded"],
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        models.mkdir()
        for name in ("alpha.gguf", "beta.gguf"):
            try:
                os.link(test_assets.smollm2_model(), models / name)
            except OSError:
                shutil.copyfile(test_assets.smollm2_model(), models / name)
        config = Path(tmp) / "orchgate.toml"
        config.write_text(config_text(port, models, one_model_mib() * 3 // 2))
        log = open(Path(tmp) / "gateway.log", "wb")
        gateway = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config),
             "--log-level", "warning"],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
        )  # fmt: skip
        try:
            async with httpx.AsyncClient(timeout=300) as http:
                await wait_gateway(http, url, gateway, Path(tmp) / "gateway.log")
                cold = await cold_starts(http, url, args.cold)
            shared = await turns(url, args.clients, args.seconds)
        finally:
            gateway.terminate()
            gateway.wait(timeout=30)
            log.close()
    return {"machine": os.cpu_count(), "cold": cold, "turns": shared}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cold", type=int, default=5, help="cold starts to time")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    report = asyncio.run(run(args))
    out = REPO / "bench" / "results" / time.strftime("ondemand-%Y%m%dT%H%M%SZ.json", time.gmtime())
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"written to {out.relative_to(REPO)}")
    return 0 if report["turns"]["requests_failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
