"""orchgate overhead benchmark: gateway vs direct vs a plain byte-forwarding hop, one run.

Targets, all in front of the same fake upstream (``bench/fakeoai.py``):

* ``direct``    -- the load generator talks to the fake upstream itself;
* ``forwarder`` -- a raw uvloop TCP byte forwarder (``bench/forwarder.py``): the floor;
* ``orchgate``  -- ``orchgate serve`` with its default settings (access log on).

Pinning (Busbar / gwbench method): proxies on CPU 1, the fake upstream and the load
generators on CPU 0. Rounds are interleaved in a fresh random order each time; the
report gives the median over rounds and the min-max.

Scenarios: (i) non-streaming chat at concurrency 1 (added p50/p99) and 32 (RPS ratio,
p99) with wrk; (ii) paced streams (20 ms x 64 tokens) at 1, 64 and 256 concurrent streams
with ``bench/streamclient.py``: added TTFT, added inter-chunk gap p50/p99, fidelity;
(iii) gateway CPU per request and per relayed event from ``/proc/<pid>/stat``.

    python -m bench.run                      # full run, about 3-4 minutes
    python -m bench.run --rounds 1 --seconds 2   # quick look

Needs ``wrk`` (``apt-get install wrk``). Writes ``bench/results/<utc>.json``.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec

ROOT = Path(__file__).resolve().parent.parent
PORTS = {"direct": 9200, "forwarder": 9201, "orchgate": 9202}
TICKS = os.sysconf("SC_CLK_TCK")
LUA = """wrk.method = "POST"
wrk.body = '{"model":"bench","messages":[{"role":"user","content":"hello"}],"max_tokens":16}'
wrk.headers["Content-Type"] = "application/json"
"""
CONFIG = """[server]
bind = "127.0.0.1:{port}"

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


def pinned(cpu: int, cmd: list[str]) -> list[str]:
    return (
        ["taskset", "-c", str(cpu)]
        if shutil.which("taskset") and os.cpu_count() and os.cpu_count() >= 2
        else []
    ) + cmd  # type: ignore[operator]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def wait_http(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def parse_wrk(text: str) -> dict[str, float]:
    def duration(value: str) -> float:
        number, unit = re.match(r"([\d.]+)(\w+)", value).groups()  # type: ignore[union-attr]
        return float(number) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[unit]

    out = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))}  # type: ignore[union-attr]
    for pct in ("50", "99"):
        out[f"p{pct}_s"] = duration(re.search(rf"\s{pct}%\s+(\S+)", text).group(1))  # type: ignore[union-attr]
    out["requests"] = float(re.search(r"(\d+) requests in", text).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    out["non2xx"] = float(errors.group(1)) if errors else 0.0
    return out


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Rig:
    def __init__(self, tokens: int, pace_ms: float, access_log: bool) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="orchgate-bench-"))
        self.procs: list[subprocess.Popen[bytes]] = []
        py = sys.executable
        self.spawn(
            0,
            [
                py,
                "-m",
                "bench.fakeoai",
                "--port",
                str(PORTS["direct"]),
                "--tokens",
                str(tokens),
                "--pace-ms",
                str(pace_ms),
            ],
        )
        self.spawn(
            1,
            [
                py,
                "-m",
                "bench.forwarder",
                "--listen",
                str(PORTS["forwarder"]),
                "--upstream",
                str(PORTS["direct"]),
            ],
        )
        config = self.tmp / "orchgate.toml"
        text = CONFIG.format(port=PORTS["orchgate"], upstream=PORTS["direct"])
        if not access_log:
            text = text.replace("[server]\n", "[server]\naccess_log = false\n")
        config.write_text(text)
        self.gateway = self.spawn(
            1, [py, "-m", "gateway", "serve", "--config", str(config), "--log-level", "warning"]
        )
        self.lua = self.tmp / "post.lua"
        self.lua.write_text(LUA)
        wait_http(f"http://127.0.0.1:{PORTS['direct']}/health")
        wait_http(f"http://127.0.0.1:{PORTS['orchgate']}/health")

    def spawn(self, cpu: int, cmd: list[str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            pinned(cpu, cmd), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()

    def wrk(self, target: str, conns: int, seconds: float) -> dict[str, float]:
        url = f"http://127.0.0.1:{PORTS[target]}/v1/chat/completions"
        subprocess.run(
            pinned(0, ["wrk", "-t1", f"-c{conns}", "-d1s", "-s", str(self.lua), url]),
            capture_output=True,
            check=True,
        )  # warm-up
        cpu0 = cpu_seconds(self.gateway.pid)
        out = subprocess.run(
            pinned(
                0,
                [
                    "wrk",
                    "-t1",
                    f"-c{conns}",
                    f"-d{int(seconds)}s",
                    "--latency",
                    "-s",
                    str(self.lua),
                    url,
                ],
            ),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        result = parse_wrk(out)
        if target == "orchgate":
            result["cpu_us_per_req"] = (
                (cpu_seconds(self.gateway.pid) - cpu0) / max(result["requests"], 1) * 1e6
            )
        return result

    def streams(
        self, target: str, streams: int, tokens: int, tasks: bool = False
    ) -> dict[str, Any]:
        cpu0 = cpu_seconds(self.gateway.pid)
        out = subprocess.run(
            pinned(
                0,
                [
                    sys.executable,
                    "-m",
                    "bench.streamclient",
                    "--port",
                    str(PORTS[target]),
                    "--streams",
                    str(streams),
                    "--tokens",
                    str(tokens),
                ]
                + (["--tasks"] if tasks else []),
            ),
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout
        result: dict[str, Any] = msgspec.json.decode(out)
        if target == "orchgate":
            events = streams * (tokens + 1)
            result["cpu_us_per_event"] = (cpu_seconds(self.gateway.pid) - cpu0) / events * 1e6
        return result


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over rounds (and min-max) of each comparison."""

    def stat(values: list[float]) -> dict[str, float]:
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    report: dict[str, Any] = {}
    for name in rounds[0]:
        entries = [r[name] for r in rounds]
        if name.startswith("ns_"):
            report[name] = {
                "direct_rps": stat([e["direct"]["rps"] for e in entries]),
                "orchgate_ratio": stat(
                    [e["orchgate"]["rps"] / e["direct"]["rps"] for e in entries]
                ),
                "forwarder_ratio": stat(
                    [e["forwarder"]["rps"] / e["direct"]["rps"] for e in entries]
                ),
                "orchgate_added_p50_ms": stat(
                    [(e["orchgate"]["p50_s"] - e["direct"]["p50_s"]) * 1e3 for e in entries]
                ),
                "orchgate_added_p99_ms": stat(
                    [(e["orchgate"]["p99_s"] - e["direct"]["p99_s"]) * 1e3 for e in entries]
                ),
                "forwarder_added_p50_ms": stat(
                    [(e["forwarder"]["p50_s"] - e["direct"]["p50_s"]) * 1e3 for e in entries]
                ),
                "orchgate_p99_ms": stat([e["orchgate"]["p99_s"] * 1e3 for e in entries]),
                "direct_p99_ms": stat([e["direct"]["p99_s"] * 1e3 for e in entries]),
                "orchgate_cpu_us_per_req": stat([e["orchgate"]["cpu_us_per_req"] for e in entries]),
                "orchgate_non2xx": sum(e["orchgate"]["non2xx"] for e in entries),
            }
        elif name.startswith("task_"):

            def vs_direct(
                key: str, q: float, target: str, entries: list[Any] = entries
            ) -> list[float]:
                return [(pct(e[target][key], q) - pct(e["direct"][key], q)) * 1e3 for e in entries]

            report[name] = {
                target: {
                    "added_ttft_p50_ms": stat(vs_direct("ttft_s", 0.5, target)),
                    "added_gap_p99_ms": stat(vs_direct("gaps_s", 0.99, target)),
                    "bad_streams": sum(e[target]["bad_streams"] for e in entries),
                }
                for target in ("orchgate", "tasks")
            }
        else:

            def added(key: str, q: float, target: str, entries: list[Any] = entries) -> list[float]:
                return [(pct(e[target][key], q) - pct(e["direct"][key], q)) * 1e3 for e in entries]

            report[name] = {
                "orchgate_added_ttft_p50_ms": stat(added("ttft_s", 0.5, "orchgate")),
                "orchgate_added_gap_p50_ms": stat(added("gaps_s", 0.5, "orchgate")),
                "orchgate_added_gap_p99_ms": stat(added("gaps_s", 0.99, "orchgate")),
                "forwarder_added_gap_p99_ms": stat(added("gaps_s", 0.99, "forwarder")),
                "direct_gap_p99_ms": stat(
                    [pct(e["direct"]["gaps_s"], 0.99) * 1e3 for e in entries]
                ),
                "bad_streams": {t: sum(e[t]["bad_streams"] for e in entries) for t in PORTS},
                "orchgate_cpu_us_per_event": stat(
                    [e["orchgate"]["cpu_us_per_event"] for e in entries]
                ),
            }
    return report


def table(summary: dict[str, Any]) -> str:
    """The README's table: median over rounds, min-max in brackets."""

    def cell(stat: dict[str, float], fmt: str = "{:.2f}") -> str:
        return (
            f"{fmt.format(stat['median'])} [{fmt.format(stat['min'])}..{fmt.format(stat['max'])}]"
        )

    lines = ["| scenario | metric | orchgate | byte forwarder |", "|---|---|---|---|"]
    order = sorted(
        summary,
        key=lambda n: (n[:2] != "ns", n[:4] == "task", int(n.rsplit("_", 1)[1].lstrip("c"))),
    )
    for name in order:
        entry = summary[name]
        if name.startswith("task_"):
            for target, label in (("orchgate", "OpenAI stream"), ("tasks", "task API")):
                e = entry[target]
                lines.append(
                    f"| 32 paced streams via {label} | added TTFT p50 / gap p99 (ms) "
                    f"| {cell(e['added_ttft_p50_ms'])} / "
                    f"{cell(e['added_gap_p99_ms'], '{:.3f}')}, "
                    f"{e['bad_streams']} bad streams | |"
                )
            continue
        if name.startswith("ns_"):
            conc = name.split("_c")[1]
            lines.append(
                f"| non-stream c={conc} | RPS vs direct | "
                f"{cell(entry['orchgate_ratio'])}x | {cell(entry['forwarder_ratio'])}x |"
            )
            lines.append(
                f"| non-stream c={conc} | added p50 (ms) | "
                f"{cell(entry['orchgate_added_p50_ms'], '{:.3f}')} | "
                f"{cell(entry['forwarder_added_p50_ms'], '{:.3f}')} |"
            )
            lines.append(
                f"| non-stream c={conc} | added p99 (ms) | "
                f"{cell(entry['orchgate_added_p99_ms'], '{:.3f}')} | |"
            )
            lines.append(
                f"| non-stream c={conc} | gateway CPU per request (us) | "
                f"{cell(entry['orchgate_cpu_us_per_req'], '{:.0f}')} | |"
            )
        else:
            streams = name.split("_")[1]
            bad = entry["bad_streams"]
            lines.append(
                f"| {streams} paced streams | added TTFT p50 (ms) | "
                f"{cell(entry['orchgate_added_ttft_p50_ms'])} | |"
            )
            lines.append(
                f"| {streams} paced streams | added gap p50 / p99 (ms) | "
                f"{cell(entry['orchgate_added_gap_p50_ms'], '{:.3f}')} / "
                f"{cell(entry['orchgate_added_gap_p99_ms'], '{:.3f}')} | "
                f"p99 {cell(entry['forwarder_added_gap_p99_ms'], '{:.3f}')} |"
            )
            lines.append(
                f"| {streams} paced streams | streams with a lost/merged event or no "
                f"[DONE] | {bad['orchgate']} | {bad['forwarder']} (direct "
                f"{bad['direct']}) |"
            )
            if int(streams) >= 64:  # fewer events than /proc's 10 ms tick can resolve
                lines.append(
                    f"| {streams} paced streams | gateway CPU per event (us) | "
                    f"{cell(entry['orchgate_cpu_us_per_event'], '{:.1f}')} | |"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--streams", default="1,64,256")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--pace-ms", type=float, default=20)
    parser.add_argument("--no-access-log", action="store_true")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is required: apt-get install wrk")
    load = os.getloadavg()[0]
    rig = Rig(args.tokens, args.pace_ms, not args.no_access_log)
    rounds: list[dict[str, Any]] = []
    try:
        for number in range(args.rounds):
            results: dict[str, Any] = {}
            jobs = [("ns_c1", t) for t in PORTS] + [("ns_c32", t) for t in PORTS]
            jobs += [(f"st_{n}", t) for n in args.streams.split(",") for t in PORTS]
            jobs += [("task_32", "direct"), ("task_32", "orchgate"), ("task_32", "tasks")]
            random.shuffle(jobs)
            for scenario, target in jobs:
                if scenario.startswith("ns_"):
                    conns = int(scenario.split("_c")[1])
                    value: Any = rig.wrk(target, conns, args.seconds)
                elif target == "tasks":
                    value = rig.streams("orchgate", 32, args.tokens, tasks=True)
                else:
                    value = rig.streams(target, int(scenario.split("_")[1]), args.tokens)
                results.setdefault(scenario, {})[target] = value
            rounds.append(results)
            print(f"round {number + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        rig.close()
    report = {
        "load_avg_before": load,
        "rounds": args.rounds,
        "seconds": args.seconds,
        "python": sys.version.split()[0],
        "summary": summarise(rounds),
        "raw": rounds,
    }
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(exist_ok=True)
    path = out_dir / time.strftime("%Y%m%dT%H%M%SZ.json", time.gmtime())
    path.write_bytes(msgspec.json.format(msgspec.json.encode(report)))
    print(table(report["summary"]))
    print(f"raw results: {path}", file=sys.stderr)
    if load > 0.5:
        print(f"warning: load average was {load:.2f} before the run", file=sys.stderr)


if __name__ == "__main__":
    main()
