#!/usr/bin/env python3
"""Stands in for ``llama-server`` while llama.cpp's own server test suite runs.

The suite starts ``$LLAMA_SERVER_BIN_PATH`` with llama-server's flags. This shim rewrites
them so that every preset runs the local SmolLM2 file with ``--no-repack`` (the models the
presets name live on a hub this machine cannot reach, and the prebuilt repacking crashes
on CPUs with AMX), then, by ``ORCHGATE_PEER_MODE``:

* ``direct``: becomes that llama-server (``exec``);
* ``through``: starts that llama-server on a free loopback port (exiting as it does when
  it refuses its flags, so the suite sees what it would see direct), then ``orchgate
  serve`` on the port and host the suite asked for, with that llama-server as the one
  replica of one pool.

Set by ``scripts/peer_suite.py``: ``ORCHGATE_PEER_MODE``, ``ORCHGATE_PEER_LLAMA`` (the real
binary), ``ORCHGATE_PEER_MODEL`` (the GGUF), ``ORCHGATE_PEER_WORK`` (a folder for configs).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

# flags whose value names a model somewhere else: the local file replaces them
_MODEL_FLAGS = {"--hf-repo", "--hf-file", "--model-url", "--mmproj-url", "-hf", "-hff"}
_DROPPED_SWITCHES = {"--offline"}
# names the suite sends as "model": a single llama-server ignores the name, a gateway routes
# by it, so an operator putting orchgate in front of one llama-server lists them as aliases
SUITE_MODEL_NAMES = (
    "test",
    "gpt-3.5-turbo",
    "gpt-3.5-turbo-instruct",
    "davinci-002",
    "gpt-4.1",
    "text-embedding-3-small",
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rewrite(argv: list[str], model: str) -> tuple[list[str], dict[str, str]]:
    """The llama-server argv to run, and the flags the gateway needs to know about."""
    out: list[str] = []
    seen: dict[str, str] = {}
    names_a_model = False
    it = iter(argv)
    for arg in it:
        if arg in _DROPPED_SWITCHES:
            continue
        if arg in _MODEL_FLAGS:
            next(it, None)
            names_a_model = names_a_model or arg in {"--hf-repo", "--model-url", "-hf"}
            continue
        if arg in {"--model", "-m", "--model-draft", "-md", "--lora"}:
            value = next(it, "")
            if arg in {"--model", "-m"} and not Path(value).is_file():
                names_a_model = True
                continue
            if arg in {"--model-draft", "-md"}:
                value = model  # same vocabulary, so speculative decoding still runs
            if arg == "--lora" and not Path(value).is_file():
                continue
            out += [arg, value]
            continue
        if arg in {"--port", "--host", "--alias", "--api-key", "--cors-origins", "--parallel"}:
            value = next(it, "")
            seen[arg] = value
            out += [arg, value]
            continue
        out.append(arg)
    if names_a_model:
        out += ["--model", model]
    out.append("--no-repack")
    return out, seen


def gateway_config(
    args: list[str], seen: dict[str, str], llama: str, work: Path
) -> tuple[Path, list[str]]:
    """An orchgate config serving what this llama-server would have served."""
    port = seen.get("--port", "8080")
    host = seen.get("--host", "127.0.0.1").split(",")[0].strip()
    # llama-server reads --alias as a comma-separated list of names for the one model
    aliases = [a.strip() for a in seen.get("--alias", "").split(",") if a.strip()]
    inner = _free_port()
    launch: list[str] = [llama]
    it = iter(args)
    for arg in it:
        if arg in {"--port", "--host", "--api-key"}:
            next(it, None)
            continue
        if arg == "--cors-origins":  # the gateway is the browser-facing side
            next(it, None)
            continue
        launch.append(arg)
    launch += ["--host", "{host}", "--port", "{port}"]
    names = aliases or ["smollm2"]
    names += [n for n in SUITE_MODEL_NAMES if n not in names]
    lines = [
        "[server]",
        f"bind = {json.dumps(f'{host}:{port}')}",
        "access_log = false",
    ]
    if seen.get("--cors-origins"):
        origins = [o.strip() for o in seen["--cors-origins"].split(",") if o.strip()]
        lines += ["[server.cors]", f"allow_origins = {json.dumps(origins)}"]
    lines += ["[auth]", 'admin_token = "peer-suite-admin"']
    if seen.get("--api-key"):
        lines.append(f"token = {json.dumps(seen['--api-key'])}")
    lines += [
        "[[pools]]",
        'id = "peer"',
        f"models = {json.dumps(names)}",
        "[pools.timeouts]",
        "first_token_s = 600.0",
        "idle_s = 600.0",
        "total_s = 1200.0",
        "[[pools.replicas]]",
        'id = "llama0"',
        'engine = "llamacpp"',
        f'url = "http://127.0.0.1:{inner}"',
        f"launch = {json.dumps(launch)}",
    ]
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"orchgate-{port}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path, launch


def main() -> None:
    mode = os.environ.get("ORCHGATE_PEER_MODE", "direct")
    llama = os.environ["ORCHGATE_PEER_LLAMA"]
    model = os.environ["ORCHGATE_PEER_MODEL"]
    args, seen = rewrite(sys.argv[1:], model)
    if mode == "direct":
        os.execv(llama, [llama, *args])
    work = Path(os.environ.get("ORCHGATE_PEER_WORK", "/tmp/orchgate-peer"))
    config, launch = gateway_config(args, seen, llama, work)
    raise SystemExit(_through(config, launch))


def _die_with_parent() -> None:
    """In the child: SIGKILL when this shim dies, even by SIGKILL (Linux prctl)."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _wait_healthy(engine: subprocess.Popen[bytes], port: str) -> None:
    deadline = time.monotonic() + 60
    while engine.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return
        except (OSError, ValueError):
            time.sleep(0.05)


def _through(config: Path, launch: list[str]) -> int:
    """llama-server first, on the inner port: if it refuses its flags, this exits as it
    did (the suite sees a server that died, as it would direct). Then orchgate in front,
    with that llama-server as its replica; SIGTERM stops both."""
    inner = config.read_text().split('url = "http://127.0.0.1:', 1)[1].split('"', 1)[0]
    argv = [a.replace("{host}", "127.0.0.1").replace("{port}", inner) for a in launch]
    children: list[subprocess.Popen[bytes]] = []

    def stop(*_: object) -> None:
        for child in children:
            if child.poll() is None:
                child.terminate()

    # from the first child on: the suite stops servers with SIGTERM, then SIGKILL after 5 s
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    engine = subprocess.Popen(argv, preexec_fn=_die_with_parent)
    children.append(engine)
    _wait_healthy(engine, inner)
    if engine.poll() is not None:
        return engine.returncode
    # the replica is not managed (no launch): the gateway relays to the engine started here
    text = config.read_text()
    text = text[: text.index("launch = ")]
    config.write_text(text)
    gateway = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
        preexec_fn=_die_with_parent,
    )
    children.append(gateway)
    while gateway.poll() is None and engine.poll() is None:
        time.sleep(0.1)
    stop()
    for child in (gateway, engine):
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            child.kill()
    return gateway.returncode or 0


if __name__ == "__main__":
    main()
