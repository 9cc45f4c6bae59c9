"""orchgate against its peers, side by side in one run, as ratios to nginx.

Every target stands in front of the same fast fake upstream (``bench/fakeoai.py``):

* ``direct``   -- the load generator talks to the fake itself;
* ``orchgate`` -- ``orchgate serve``, default settings (access log on);
* ``aiohttp``  -- a plain aiohttp.web + aiohttp client pass-through (``bench/aiohttp_proxy.py``);
* ``nginx``    -- nginx with ``proxy_buffering off`` and upstream keep-alive, one worker
  (skipped when ``nginx`` is not installed: ``apt-get install nginx-light``);
* ``forwarder``-- a raw uvloop byte forwarder (``bench/forwarder.py``): Python's floor.

Scenarios: non-streaming chat with wrk at concurrency 32 (RPS × direct, CPU per request)
and 1 (added p50); ``--streams`` concurrent SSE streams of ``--tokens`` tokens paced
``--pace-ms`` apart with ``bench/streamclient.py`` (events/s × direct, added gap p99,
streams with a lost, merged or unterminated event, CPU per relayed event); the idle RSS of
``orchgate serve``. CPU is each proxy's own processes' user+system time from /proc. No
pinning by default (``--pin``: proxies on CPU 1, load and fake on CPU 0). Rounds are
interleaved in a random order; the report gives medians.

    python -m bench.peers                        # 2 rounds, about 2 minutes
    python -m bench.peers --rounds 1 --streams 256 --seconds 3

Writes ``bench/results/peers-<utc>.json`` and prints the table; the ``vs nginx`` columns
are what ``README.md`` ("Performance") reports, since they hold across machines better than
absolute figures. Then the profile guards: issue 15's targets, each checked against
nginx or direct from the same run (``--strict``: exit 1 when one is missed).
"""

from __future__ import annotations

import argparse
import os
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

from bench.run import LUA, cpu_seconds, parse_wrk, pct, wait_http

ROOT = Path(__file__).resolve().parent.parent
PORTS = {"direct": 9300, "orchgate": 9301, "aiohttp": 9302, "nginx": 9303, "forwarder": 9304}
PROXIES = ("orchgate", "aiohttp", "nginx", "forwarder")
ORCHGATE = """[server]
bind = "127.0.0.1:{port}"

[[pools]]
id = "bench"
models = ["bench"]
queue_capacity = 8192

[[pools.replicas]]
id = "fake"
engine = "openai"
url = "http://127.0.0.1:{upstream}"
slots = 4096
"""
NGINX = """worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log error;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body;
  proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi;
  uwsgi_temp_path {tmp}/uwsgi;
  scgi_temp_path {tmp}/scgi;
  upstream fake {{ server 127.0.0.1:{upstream}; keepalive 1024; }}
  server {{
    listen 127.0.0.1:{port} reuseport;
    location / {{
      proxy_pass http://fake;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
    }}
  }}
}}
"""


def process_tree(pid: int) -> list[int]:
    """``pid`` and its children (nginx's workers)."""
    pids = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                pids.append(int(entry.name))
    return pids


def tree_cpu(pid: int) -> float:
    total = 0.0
    for one in process_tree(pid):
        try:
            total += cpu_seconds(one)
        except OSError:
            pass
    return total


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Peers:
    def __init__(self, tokens: int, pace_ms: float, pin: bool) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="orchgate-peers-"))
        self.pin = pin
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        py = sys.executable
        fake = [
            py,
            "-m",
            "bench.fakeoai",
            "--port",
            str(PORTS["direct"]),
            "--tokens",
            str(tokens),
            "--pace-ms",
            str(pace_ms),
        ]
        self.spawn("direct", 0, fake)
        config = self.tmp / "orchgate.toml"
        config.write_text(ORCHGATE.format(port=PORTS["orchgate"], upstream=PORTS["direct"]))
        self.spawn(
            "orchgate",
            1,
            [py, "-m", "gateway", "serve", "--config", str(config), "--log-level", "warning"],
        )
        for name, module in (("aiohttp", "bench.aiohttp_proxy"), ("forwarder", "bench.forwarder")):
            listen, upstream = str(PORTS[name]), str(PORTS["direct"])
            self.spawn(name, 1, [py, "-m", module, "--listen", listen, "--upstream", upstream])
        nginx = shutil.which("nginx") or (
            "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
        )
        if nginx is not None:
            conf = self.tmp / "nginx.conf"
            conf.write_text(
                NGINX.format(tmp=self.tmp, port=PORTS["nginx"], upstream=PORTS["direct"])
            )
            self.spawn("nginx", 1, [nginx, "-c", str(conf), "-p", str(self.tmp)])
        self.lua = self.tmp / "post.lua"
        self.lua.write_text(LUA)
        for name in self.procs:  # every target forwards /health to the fake
            wait_http(f"http://127.0.0.1:{PORTS[name]}/health")
        time.sleep(1.0)
        self.idle_rss_mb = rss_mb(self.procs["orchgate"].pid)

    @property
    def targets(self) -> list[str]:
        return ["direct", *(name for name in PROXIES if name in self.procs)]

    def cmd(self, cpu: int, argv: list[str]) -> list[str]:
        if self.pin and shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
            return ["taskset", "-c", str(cpu), *argv]
        return argv

    def spawn(self, name: str, cpu: int, argv: list[str]) -> None:
        self.procs[name] = subprocess.Popen(
            self.cmd(cpu, argv), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def close(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()

    def cpu(self, target: str) -> float:
        proc = self.procs.get(target) if target != "direct" else None
        return tree_cpu(proc.pid) if proc is not None else 0.0

    def wrk(self, target: str, conns: int, seconds: float) -> dict[str, float]:
        url = f"http://127.0.0.1:{PORTS[target]}/v1/chat/completions"
        base = ["wrk", "-t1", f"-c{conns}", "-s", str(self.lua)]
        subprocess.run(self.cmd(0, [*base, "-d1s", url]), capture_output=True, check=True)
        cpu0 = self.cpu(target)
        out = subprocess.run(
            self.cmd(0, [*base, f"-d{int(seconds)}s", "--latency", url]),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        result = parse_wrk(out)
        result["cpu_us_per_req"] = (self.cpu(target) - cpu0) / max(result["requests"], 1) * 1e6
        return result

    def streams(self, target: str, streams: int, tokens: int) -> dict[str, Any]:
        cpu0 = self.cpu(target)
        out = subprocess.run(
            self.cmd(
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
                ],
            ),
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout
        result: dict[str, Any] = msgspec.json.decode(out)
        result["cpu_us_per_event"] = (self.cpu(target) - cpu0) / max(result["events"], 1) * 1e6
        return result


def summarise(rounds: list[dict[str, Any]], targets: list[str]) -> dict[str, Any]:
    def med(values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")

    out: dict[str, Any] = {}
    for scenario in rounds[0]:
        entries = [r[scenario] for r in rounds]
        rows: dict[str, Any] = {}
        for target in targets:
            if scenario.startswith("ns_"):
                rows[target] = {
                    "rps": med([e[target]["rps"] for e in entries]),
                    "rps_x_direct": med([e[target]["rps"] / e["direct"]["rps"] for e in entries]),
                    "added_p50_ms": med(
                        [(e[target]["p50_s"] - e["direct"]["p50_s"]) * 1e3 for e in entries]
                    ),
                    "added_p99_ms": med(
                        [(e[target]["p99_s"] - e["direct"]["p99_s"]) * 1e3 for e in entries]
                    ),
                    "cpu_us_per_req": med([e[target]["cpu_us_per_req"] for e in entries]),
                    "non2xx": sum(e[target]["non2xx"] for e in entries),
                }
            else:
                rows[target] = {
                    "events_per_s": med(
                        [e[target]["events"] / e[target]["wall_s"] for e in entries]
                    ),
                    "events_x_direct": med(
                        [
                            (e[target]["events"] / e[target]["wall_s"])
                            / (e["direct"]["events"] / e["direct"]["wall_s"])
                            for e in entries
                        ]
                    ),
                    "added_gap_p99_ms": med(
                        [
                            (pct(e[target]["gaps_s"], 0.99) - pct(e["direct"]["gaps_s"], 0.99))
                            * 1e3
                            for e in entries
                        ]
                    ),
                    "cpu_us_per_event": med([e[target]["cpu_us_per_event"] for e in entries]),
                    "bad_streams": sum(e[target]["bad_streams"] for e in entries),
                }
        out[scenario] = rows
    return out


def table(summary: dict[str, Any], targets: list[str], idle_rss_mb: float) -> str:
    ns32, ns1 = summary.get("ns_c32", {}), summary.get("ns_c1", {})
    streams = sorted((n for n in summary if n.startswith("st_")), key=lambda n: int(n[3:]))
    nginx32 = ns32.get("nginx")
    head = [
        "target",
        "non-stream RPS c=32 (× direct)",
        "CPU µs / request (× nginx)",
        "added p50 c=1 (ms)",
    ]
    for name in streams:
        n = name.split("_")[1]
        head += [
            f"{n} streams: events/s × direct",
            f"{n}: added gap p99 (ms)",
            f"{n}: CPU µs / event (× nginx)",
            f"{n}: bad streams",
        ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for target in targets:
        cells = [target]
        row = ns32.get(target)
        if row is None:
            cells += ["", "", ""]
        else:
            cells.append(f"{row['rps']:,.0f} ({row['rps_x_direct']:.3f}×)")
            if target == "direct":
                cells.append("–")
            else:
                ratio = (
                    f" ({row['cpu_us_per_req'] / nginx32['cpu_us_per_req']:.1f}×)"
                    if nginx32
                    else ""
                )
                cells.append(f"{row['cpu_us_per_req']:.1f}{ratio}")
            one = ns1.get(target)
            cells.append("–" if target == "direct" or one is None else f"{one['added_p50_ms']:.3f}")
        for name in streams:
            st = summary[name][target]
            nginx = summary[name].get("nginx")
            if target == "direct":
                cells += [f"{st['events_per_s']:,.0f}", "–", "–", str(st["bad_streams"])]
                continue
            ratio = f" ({st['cpu_us_per_event'] / nginx['cpu_us_per_event']:.2f}×)" if nginx else ""
            cells += [
                f"{st['events_x_direct']:.3f}×",
                f"{st['added_gap_p99_ms']:+.2f}",
                f"{st['cpu_us_per_event']:.1f}{ratio}",
                str(st["bad_streams"]),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\nidle RSS of orchgate serve: {idle_rss_mb:.1f} MB")
    return "\n".join(lines)


class Guard(msgspec.Struct):
    """One of issue 15's targets, checked against this run's own figures."""

    name: str
    limit: str
    measured: str
    met: bool


def guards(summary: dict[str, Any], idle_rss_mb: float) -> list[Guard]:
    """orchgate against the targets, each relative to nginx or direct *from the same
    run* (absolute figures move with the machine). Reported, never a timed test; ``--strict``
    makes a miss the exit status."""
    out: list[Guard] = []
    ns32, ns1 = summary.get("ns_c32", {}), summary.get("ns_c1", {})
    if "orchgate" in ns32 and "nginx" in ns32:
        ratio = ns32["orchgate"]["cpu_us_per_req"] / ns32["nginx"]["cpu_us_per_req"]
        out.append(Guard("CPU per request", "≤ 4× nginx", f"{ratio:.2f}×", ratio <= 4))
    if "orchgate" in ns1:
        added = ns1["orchgate"]["added_p50_ms"]
        out.append(Guard("added p50 at c=1", "≤ 0.10 ms", f"{added:.3f} ms", added <= 0.10))
    for name in sorted((n for n in summary if n.startswith("st_")), key=lambda n: int(n[3:])):
        rows = summary[name]
        ours, nginx = rows.get("orchgate"), rows.get("nginx")
        if ours is None:
            continue
        n = name[3:]
        bad = ours["bad_streams"]
        out.append(Guard(f"{n} streams: lost or merged", "0 streams", str(bad), bad == 0))
        if nginx is not None:
            ratio = ours["cpu_us_per_event"] / nginx["cpu_us_per_event"]
            out.append(
                Guard(f"{n} streams: CPU per event", "≤ 1.5× nginx", f"{ratio:.2f}×", ratio <= 1.5)
            )
        if int(n) <= 256:  # beyond, the Python load generator is the bottleneck
            x = ours["events_x_direct"]
            out.append(Guard(f"{n} streams: events/s", "≥ 0.99× direct", f"{x:.3f}×", x >= 0.99))
            if nginx is not None:
                gap, bound = ours["added_gap_p99_ms"], nginx["added_gap_p99_ms"] + 0.5
                out.append(
                    Guard(
                        f"{n} streams: added gap p99",
                        f"≤ nginx + 0.5 ms ({bound:+.2f})",
                        f"{gap:+.2f} ms",
                        gap <= bound,
                    )
                )
    out.append(Guard("idle RSS", "≤ 60 MB", f"{idle_rss_mb:.1f} MB", idle_rss_mb <= 60))
    return out


def guard_table(checked: list[Guard]) -> str:
    lines = ["| guard | target | measured | |", "|---|---|---|---|"]
    lines += [
        f"| {g.name} | {g.limit} | {g.measured} | {'met' if g.met else 'MISSED'} |" for g in checked
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--streams", default="256,1024")
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--pace-ms", type=float, default=5)
    parser.add_argument("--pin", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated targets (direct always)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a guard is missed")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is required: apt-get install wrk")
    peers = Peers(args.tokens, args.pace_ms, args.pin)
    targets = peers.targets
    if args.only:
        targets = ["direct", *(t for t in targets if t in args.only.split(",") and t != "direct")]
    rounds: list[dict[str, Any]] = []
    try:
        for number in range(args.rounds):
            results: dict[str, Any] = {}
            jobs = [(f"ns_c{c}", t) for c in (32, 1) for t in targets]
            jobs += [(f"st_{n}", t) for n in args.streams.split(",") if n for t in targets]
            random.shuffle(jobs)
            for scenario, target in jobs:
                if scenario.startswith("ns_"):
                    value = peers.wrk(target, int(scenario.split("_c")[1]), args.seconds)
                else:
                    value = peers.streams(target, int(scenario.split("_")[1]), args.tokens)
                results.setdefault(scenario, {})[target] = value
            rounds.append(results)
            print(f"round {number + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        peers.close()
    summary = summarise(rounds, targets)
    checked = guards(summary, peers.idle_rss_mb)
    report = {
        "python": sys.version.split()[0],
        "rounds": args.rounds,
        "tokens": args.tokens,
        "pace_ms": args.pace_ms,
        "idle_rss_mb": peers.idle_rss_mb,
        "summary": summary,
        "guards": checked,
    }
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(exist_ok=True)
    path = out_dir / time.strftime("peers-%Y%m%dT%H%M%SZ.json", time.gmtime())
    path.write_bytes(msgspec.json.format(msgspec.json.encode(report)))
    print(table(summary, targets, peers.idle_rss_mb))
    print()
    print(guard_table(checked))
    print(f"results: {path}", file=sys.stderr)
    if args.strict and not all(g.met for g in checked):
        sys.exit(1)


if __name__ == "__main__":
    main()
