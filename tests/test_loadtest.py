"""The load-test recipes work against orchgate: a short, bounded headless Locust run over
the OpenAI route (streaming and not) and the task API, with no failed request.

k6 cannot be installed here (not on PyPI or Debian); its script is checked for the routes
and checks it relies on.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, pool
from tests.fakes.servers import wait_until

pytestmark = pytest.mark.slow  # locust runs headless for seconds


def test_locust_recipe_runs_headless_without_failures(
    fake_upstream: Any, gateway_factory: Any, tmp_path: Path
) -> None:
    _, server = fake_upstream
    replica = {"id": "f0", "engine": "openai", "url": server.url, "slots": 16}
    with gateway_factory({"pools": [pool("p", ["m"], [replica])]}) as gw:
        assert wait_until(lambda: gw.state.pools["p"].queue.is_ready(), timeout=10)
        prefix = tmp_path / "run"
        result = subprocess.run(
            [sys.executable, "-m", "locust", "-f", str(REPO / "loadtest" / "locustfile.py"),
             "--host", gw.url, "--headless", "-u", "8", "-r", "8", "-t", "8s",
             "--csv", str(prefix), "--only-summary", "--stop-timeout", "5"],
            env={**os.environ, "ORCHGATE_MODEL": "m", "ORCHGATE_MAX_TOKENS": "8"},
            capture_output=True, text=True, timeout=90,
        )  # fmt: skip
        assert gw.slots_in_use() == 0 or wait_until(lambda: gw.slots_in_use() == 0, timeout=5)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(f"{prefix}_stats.csv") as stats_file:
        rows = {(row["Type"], row["Name"]): row for row in csv.DictReader(stats_file)}
    for kind, name in [
        ("POST", "chat"),
        ("POST", "chat stream"),
        ("TTFT", "chat stream"),
        ("DONE", "chat stream"),
        ("POST", "task submit"),
        ("GET", "task stream"),
    ]:
        assert int(rows[kind, name]["Request Count"]) > 0, (kind, name)
    total = rows["", "Aggregated"]
    assert int(total["Request Count"]) >= 20
    assert int(total["Failure Count"]) == 0, Path(f"{prefix}_failures.csv").read_text()


def test_k6_recipe_targets_the_gateway_routes() -> None:
    script = (REPO / "loadtest" / "k6.js").read_text()
    for needle in ("/v1/chat/completions", "/v1/tasks", "/stream", "data: [DONE]",
                   "event: end", "Authorization", "BASE_URL"):  # fmt: skip
        assert needle in script, needle
