"""What ``[cluster]`` costs on the OpenAI path: one gateway each way, the same fake upstream.

Targets (all ``orchgate serve``, access log off, in front of ``bench/fakeoai.py``):

* ``local``   -- no ``[cluster]``: the embedded default;
* ``standby`` -- ``mode = "standby"``, the only node, so it leads (admission in process);
* ``active``  -- ``mode = "active"``: every admission is a script on a loopback
  ``redis-server``, every give-back a pipelined one.

Non-streaming chat with wrk at concurrency 1 (p50, p99: what a request pays) and 32 (RPS,
CPU per request of the gateway and of redis-server), interleaved rounds in a fresh random
order, medians reported. The issue's goals: standby within 5 % of local, active adding at
most 0.35 ms p50 at concurrency 1.

    python -m bench.cluster                     # 3 rounds x 5 s, about 2 minutes
    python -m bench.cluster --rounds 1 --seconds 2

Needs ``wrk`` and ``redis-server`` (Debian's packages). Writes ``bench/results/``.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

from bench import run
from bench.run import LUA, ROOT, cpu_seconds, parse_wrk, pinned, wait_http

PORTS = {"upstream": 9300, "local": 9301, "standby": 9302, "active": 9303, "redis": 9304}
CONFIG = """[server]
bind = "127.0.0.1:{port}"
access_log = false
{cluster}
[[pools]]
id = "bench"
models = ["bench"]
queue_capacity = 4096

[[pools.replicas]]
id = "fake"
engine = "openai"
url = "http://127.0.0.1:{upstream}"
slots = 1024
"""
CLUSTER = """
[cluster]
mode = "{mode}"
url = "redis://127.0.0.1:{redis}/{db}"
node_id = "bench-{mode}"
"""
TARGETS = ("local", "standby", "active")


class Rig(run.Rig):
    """``bench.run``'s processes (spawned pinned, stopped together), other targets."""

    def __init__(self) -> None:  # not run.Rig's targets: its __init__ is not called
        self.tmp = Path(tempfile.mkdtemp(prefix="orchgate-bench-cluster-"))
        self.procs: list[subprocess.Popen[bytes]] = []
        redis = shutil.which("redis-server")
        if redis is None:
            sys.exit("bench.cluster needs redis-server (apt-get install redis-server)")
        self.redis = self.spawn(0, [redis, "--port", str(PORTS["redis"]), "--save", "",
                                    "--appendonly", "no", "--dir", str(self.tmp)])  # fmt: skip
        self.spawn(0, [sys.executable, "-m", "bench.fakeoai", "--port", str(PORTS["upstream"])])
        self.gateways: dict[str, subprocess.Popen[bytes]] = {}
        for db, target in enumerate(TARGETS):
            cluster = "" if target == "local" else CLUSTER.format(
                mode=target, redis=PORTS["redis"], db=db
            )  # fmt: skip
            config = self.tmp / f"{target}.toml"
            config.write_text(CONFIG.format(port=PORTS[target], upstream=PORTS["upstream"],
                                            cluster=cluster))  # fmt: skip
            self.gateways[target] = self.spawn(1, [sys.executable, "-m", "gateway", "serve",
                                                   "--config", str(config),
                                                   "--log-level", "warning"])  # fmt: skip
        self.lua = self.tmp / "post.lua"
        self.lua.write_text(LUA)
        wait_http(f"http://127.0.0.1:{PORTS['upstream']}/health")
        for target in TARGETS:
            wait_http(f"http://127.0.0.1:{PORTS[target]}/ready")

    def wrk(self, target: str, conns: int, seconds: float) -> dict[str, float]:
        url = f"http://127.0.0.1:{PORTS[target]}/v1/chat/completions"
        base = ["wrk", "-t1", f"-c{conns}", "-s", str(self.lua)]
        subprocess.run(pinned(0, [*base, "-d1s", url]), capture_output=True, check=True)
        gateway, redis = self.gateways[target].pid, self.redis.pid
        cpu0, redis0 = cpu_seconds(gateway), cpu_seconds(redis)
        out = subprocess.run(pinned(0, [*base, f"-d{int(seconds)}s", "--latency", url]),
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        result = parse_wrk(out)
        requests = max(result["requests"], 1)
        result["cpu_us_per_req"] = (cpu_seconds(gateway) - cpu0) / requests * 1e6
        result["redis_us_per_req"] = (cpu_seconds(redis) - redis0) / requests * 1e6
        return result


def summarise(rounds: list[dict[str, dict[str, dict[str, float]]]]) -> dict[str, Any]:
    def median(target: str, scenario: str, key: str) -> float:
        return statistics.median(r[target][scenario][key] for r in rounds)

    summary: dict[str, Any] = {}
    for target in TARGETS:
        summary[target] = {
            "c1_p50_ms": median(target, "c1", "p50_s") * 1e3,
            "c1_p99_ms": median(target, "c1", "p99_s") * 1e3,
            "c32_rps": median(target, "c32", "rps"),
            "cpu_us_per_req": median(target, "c32", "cpu_us_per_req"),
            "redis_us_per_req": median(target, "c32", "redis_us_per_req"),
            "non2xx": sum(r[target][s]["non2xx"] for r in rounds for s in ("c1", "c32")),
        }
    local = summary["local"]
    for target in TARGETS:
        entry = summary[target]
        entry["c1_added_p50_ms"] = entry["c1_p50_ms"] - local["c1_p50_ms"]
        entry["c32_rps_vs_local"] = entry["c32_rps"] / local["c32_rps"]
    return summary


def table(summary: dict[str, Any]) -> str:
    lines = [
        "| target | c=1 p50 (+ vs local) | c=1 p99 | c=32 RPS (x local) | gateway CPU µs/req "
        "| redis-server CPU µs/req | non-2xx |",
        "|---|---|---|---|---|---|---|",
    ]
    for target in TARGETS:
        e = summary[target]
        lines.append(
            f"| {target} | {e['c1_p50_ms']:.3f} ms (+{e['c1_added_p50_ms']:.3f}) "
            f"| {e['c1_p99_ms']:.3f} ms | {e['c32_rps']:,.0f} ({e['c32_rps_vs_local']:.3f}×) "
            f"| {e['cpu_us_per_req']:.1f} | {e['redis_us_per_req']:.1f} | {e['non2xx']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("bench.cluster needs wrk (apt-get install wrk)")
    rig = Rig()
    rounds: list[dict[str, dict[str, dict[str, float]]]] = []
    try:
        for n in range(args.rounds):
            order = random.sample(TARGETS, len(TARGETS))
            result: dict[str, dict[str, dict[str, float]]] = {}
            for target in order:
                result[target] = {"c1": rig.wrk(target, 1, args.seconds),
                                  "c32": rig.wrk(target, 32, args.seconds)}  # fmt: skip
            rounds.append(result)
            print(f"round {n + 1}/{args.rounds} done ({', '.join(order)})", file=sys.stderr)
    finally:
        rig.close()
    summary = summarise(rounds)
    out = (
        ROOT
        / "bench"
        / "results"
        / f"cluster-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    )
    out.parent.mkdir(exist_ok=True)
    out.write_bytes(
        msgspec.json.format(msgspec.json.encode({"rounds": rounds, "summary": summary}))
    )
    print(table(summary))
    print(f"\nwritten: {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
