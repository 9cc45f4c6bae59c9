"""Run llama.cpp's own server test suite against llama-server, then through orchgate.

The suite (``tools/server/tests`` of the llama.cpp our llama-server is built from) starts a
server per test with its presets' flags. ``scripts/peer_suite_shim.py`` stands in for the
binary: every preset runs the local SmolLM2 with ``--no-repack``; in ``through`` mode
orchgate serves on the suite's port with that llama-server as its one managed replica.
Each test's outcome is compared: a test that passes direct and fails through orchgate is a
gateway difference, listed with its file so that it can be judged against the routes
orchgate serves.

Usage::

    pip install -e '.[peer]'
    python scripts/peer_suite.py                      # both modes, report on stdout
    python scripts/peer_suite.py --mode through -- unit/test_chat_completion.py -k stream

It takes about twenty minutes for both modes on 2 cores; reports land in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import test_assets  # noqa: E402  (a script beside this one, stdlib-only)

MODES = ("direct", "through")


def _outcomes(junit: Path) -> dict[str, str]:
    result: dict[str, str] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = "passed"
        for child in case:
            if child.tag in {"failure", "error"}:
                outcome = "failed"
            elif child.tag == "skipped":
                outcome = "skipped"
        result[name] = outcome
    return result


def _failure_texts(junit: Path) -> dict[str, str]:
    texts: dict[str, str] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        for child in case:
            if child.tag in {"failure", "error"}:
                message = child.get("message") or (child.text or "")
                texts[name] = message.strip().splitlines()[-1][:300] if message.strip() else ""
    return texts


def run_mode(mode: str, suite: Path, out: Path, pytest_args: list[str]) -> Path:
    work = Path(tempfile.mkdtemp(prefix=f"orchgate-peer-{mode}-"))
    tests = work / "tests"
    shutil.copytree(suite, tests)
    (tests / "tmp").mkdir(exist_ok=True)
    wrapper = work / "llama-server"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} {HERE / "peer_suite_shim.py"} "$@"\n')
    wrapper.chmod(0o755)
    env = {
        **os.environ,
        "LLAMA_SERVER_BIN_PATH": str(wrapper),
        "ORCHGATE_PEER_MODE": mode,
        "ORCHGATE_PEER_LLAMA": str(test_assets.llama_server()),
        "ORCHGATE_PEER_MODEL": str(test_assets.smollm2_model()),
        "ORCHGATE_PEER_WORK": str(work / "configs"),
        "LLAMA_CACHE": str(tests / "tmp"),
    }
    junit = out / f"{mode}.xml"
    command = [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
        "--timeout=300", f"--junitxml={junit}", *(pytest_args or ["unit"]),
    ]  # fmt: skip
    log = out / f"{mode}.log"
    print(f"[peer-suite] {mode}: {' '.join(command[3:])} (log: {log})", file=sys.stderr)
    with log.open("w") as sink:
        subprocess.run(command, cwd=tests, env=env, stdout=sink, stderr=subprocess.STDOUT)
    shutil.rmtree(work, ignore_errors=True)
    return junit


def report(out: Path) -> dict[str, object]:
    direct = _outcomes(out / "direct.xml")
    through = _outcomes(out / "through.xml")
    why = _failure_texts(out / "through.xml")
    lost = sorted(n for n, o in direct.items() if o == "passed" and through.get(n) != "passed")
    gained = sorted(n for n, o in through.items() if o == "passed" and direct.get(n) != "passed")
    summary = {
        "tests": len(direct),
        "direct": dict(Counter(direct.values())),
        "through": dict(Counter(through.values())),
        "pass_direct_not_through": [{"test": n, "why": why.get(n, "")} for n in lost],
        "pass_through_not_direct": gained,
    }
    (out / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=(*MODES, "both"), default="both")
    parser.add_argument("--out", type=Path, default=Path("bench/results/peer-suite"))
    parser.add_argument("pytest_args", nargs="*", help="after --: passed to pytest")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    suite = test_assets.server_test_suite()
    for mode in MODES if args.mode == "both" else (args.mode,):
        run_mode(mode, suite, args.out.resolve(), args.pytest_args)
    if all((args.out / f"{m}.xml").exists() for m in MODES):
        summary = report(args.out)
        print(json.dumps(summary, indent=2))
        return 1 if summary["pass_direct_not_through"] else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
