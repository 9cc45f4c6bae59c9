"""Model swaps under load: how long a swap takes and what clients see meanwhile.

Runs ``orchgate serve`` with one pool of a managed llama-server (SmolLM2, the test
assets) that has two settings -- ``default`` (2 slots, 2048-token context) and ``b``
(4 slots, 4096) -- while ``--clients`` concurrent clients stream chats through the alias
both settings keep. Every ``--every`` seconds it swaps to the other setting with
``POST /v1/pools/chat/reload`` and records the answer's time. Reports swap durations, the
number of failed requests (any non-200, broken stream or missing ``[DONE]``), and request
latency while a swap is running against the rest of the run.

    python -m bench.swap                          # 6 swaps, 8 clients, about a minute
    python -m bench.swap --swaps 2 --clients 4    # quick look
    python -m bench.swap --strategy replace       # in-place swaps (requests wait)

Writes ``bench/results/swap-<utc>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import test_assets  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_gateway(
    http: httpx.AsyncClient, url: str, process: subprocess.Popen[bytes], log: Path
) -> None:
    """Until ``/health`` answers 200; raise with the log if the gateway exits first."""
    for _ in range(600):
        if process.poll() is not None:
            raise RuntimeError(f"orchgate exited: {log.read_text()}")
        try:
            if (await http.get(url + "/health")).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{url} never became healthy")


def config_text(port: int, replica_port: int, strategy: str = "blue_green") -> str:
    binary, model = test_assets.llama_server(), test_assets.smollm2_model()

    def launch(slots: int, context: int) -> str:
        return json.dumps(
            [str(binary), "-m", "{model}", "--host", "{host}", "--port", "{port}",
             "-np", str(slots), "-c", str(context), "-t", "1", "--no-webui"]
        )  # fmt: skip

    replica = (
        f'id = "r0"\nengine = "llamacpp"\nurl = "http://127.0.0.1:{replica_port}"\n'
        f'model_path = "{model}"\n'
    )
    return (
        f'[server]\nbind = "127.0.0.1:{port}"\naccess_log = false\n\n'
        f'[[pools]]\nid = "chat"\nmodels = ["smollm2-a", "chat"]\nhealth_interval_s = 0.5\n'
        f'swap_strategy = "{strategy}"\n\n'
        f"[[pools.replicas]]\n{replica}launch = {launch(2, 2048)}\n\n"
        f'[[pools.variants]]\nid = "b"\nmodels = ["smollm2-b", "chat"]\n\n'
        f"[[pools.variants.replicas]]\n{replica}launch = {launch(4, 4096)}\n"
    )


class Load:
    def __init__(self, url: str) -> None:
        self.url = url
        self.done: list[tuple[float, float]] = []  # (start, end) of requests that succeeded
        self.failures: list[str] = []
        self.stop = False

    async def client(self) -> None:
        body = {
            "model": "chat",
            "messages": [{"role": "user", "content": "Tell me about the sea."}],
            "max_tokens": 16,
            "stream": True,
        }
        async with httpx.AsyncClient(timeout=60) as http:
            while not self.stop:
                started = time.monotonic()
                try:
                    async with http.stream(
                        "POST", self.url + "/v1/chat/completions", json=body
                    ) as r:
                        last = b""
                        async for line in r.aiter_lines():
                            if line:
                                last = line.encode()
                        if r.status_code != 200 or last != b"data: [DONE]":
                            self.failures.append(f"HTTP {r.status_code}, last line {last[:80]!r}")
                            continue
                except httpx.HTTPError as exc:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                self.done.append((started, time.monotonic()))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "orchgate.toml"
        config.write_text(config_text(port, free_port(), args.strategy))
        log = open(Path(tmp) / "gateway.log", "wb")
        gateway = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config),
             "--log-level", "warning"],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            async with httpx.AsyncClient(timeout=120) as http:
                await wait_gateway(http, url, gateway, Path(tmp) / "gateway.log")
                load = Load(url)
                clients = [asyncio.create_task(load.client()) for _ in range(args.clients)]
                await asyncio.sleep(args.every)
                swaps: list[dict[str, Any]] = []
                for i in range(args.swaps):
                    variant = "b" if i % 2 == 0 else "default"
                    started = time.monotonic()
                    answer = await http.post(
                        f"{url}/v1/pools/chat/reload?wait=true", json={"variant": variant}
                    )
                    ended = time.monotonic()
                    swaps.append(
                        {"to": variant, "status": answer.status_code, "start": started,
                         "end": ended, "seconds": round(ended - started, 3)}
                    )  # fmt: skip
                    await asyncio.sleep(args.every)
                load.stop = True
                await asyncio.gather(*clients)
        finally:
            gateway.terminate()
            gateway.wait(timeout=30)
            log.close()

    def during_swap(start: float, end: float) -> bool:
        return any(s["start"] <= end and start <= s["end"] for s in swaps)

    during = [e - s for s, e in load.done if during_swap(s, e)]
    steady = [e - s for s, e in load.done if not during_swap(s, e)]
    seconds = [s["seconds"] for s in swaps]
    return {
        "strategy": args.strategy,
        "clients": args.clients,
        "swaps": [{k: v for k, v in s.items() if k not in ("start", "end")} for s in swaps],
        "swap_seconds_median": round(statistics.median(seconds), 3),
        "swap_seconds_max": round(max(seconds), 3),
        "requests_ok": len(load.done),
        "requests_failed": len(load.failures),
        "failures": load.failures[:20],
        "latency_ms_steady": {
            "p50": round(percentile(steady, 0.5) * 1000, 1),
            "p99": round(percentile(steady, 0.99) * 1000, 1),
        },
        "latency_ms_during_swaps": {
            "p50": round(percentile(during, 0.5) * 1000, 1),
            "p99": round(percentile(during, 0.99) * 1000, 1),
            "requests": len(during),
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--swaps", type=int, default=6)
    parser.add_argument("--every", type=float, default=5.0, help="seconds between swaps")
    parser.add_argument(
        "--strategy", choices=["blue_green", "replace"], default="blue_green",
        help="the pool's swap_strategy",
    )  # fmt: skip
    args = parser.parse_args()
    report = asyncio.run(run(args))
    out = REPO / "bench" / "results" / time.strftime("swap-%Y%m%dT%H%M%SZ.json", time.gmtime())
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"written to {out.relative_to(REPO)}")
    return (
        0
        if report["requests_failed"] == 0 and all(s["status"] == 200 for s in report["swaps"])
        else 1
    )


if __name__ == "__main__":
    sys.exit(main())
