"""Logs: JSON lines with what an operator needs, and never a prompt, a completion or a token.

A real ``orchgate serve`` at debug level, with an auth token, serves traffic whose prompts
and credentials carry a canary string; every byte the process writes is then searched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import msgspec
import openai
import pytest

from tests.conftest import free_port
from tests.fakes.servers import gateway_process
from tests.sse import read_task_events

pytestmark = pytest.mark.slow  # a real orchgate serve process at debug level

CANARY = "CANARY-7f3e9a"
TOKEN = f"secret-{CANARY}-token"
ACCESS_FIELDS = {
    "ts", "method", "path", "status", "duration_ms", "ttfb_ms", "request_id",
    "pool", "replica", "engine", "attempts", "tokens_in", "tokens_out",
}  # fmt: skip


def test_logs_are_json_lines_and_never_hold_prompts_completions_or_tokens(
    fake_upstream: Any, tmp_path: Path
) -> None:
    fake, server = fake_upstream
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = tmp_path / "orchgate.toml"
    config.write_text(
        f"""
[server]
bind = "127.0.0.1:{port}"

[auth]
token = "{TOKEN}"

[[pools]]
id = "p"
models = ["m"]

[[pools.replicas]]
id = "f0"
engine = "openai"
url = "{server.url}"
slots = 4
"""
    )
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with gateway_process(config, port, args=["--log-level", "debug"]) as gateway:
        client = openai.OpenAI(base_url=url + "/v1", api_key=TOKEN, max_retries=0)
        messages = [{"role": "user", "content": f"my password is {CANARY}"}]
        client.chat.completions.create(model="m", messages=messages)  # type: ignore[arg-type]
        list(client.chat.completions.create(model="m", messages=messages, stream=True))  # type: ignore[arg-type]
        # a completion that echoes the canary back (the fake streams what it is told to)
        list(
            client.chat.completions.create(
                model="m",
                messages=messages,  # type: ignore[arg-type]
                stream=True,
                extra_body={"fake": {"chunks": 2, "text": CANARY}},
            )
        )
        task = httpx.post(
            url + "/v1/tasks", json={"model_ref": "m", "prompt": CANARY}, headers=auth
        ).json()
        assert read_task_events(url, task["task_id"], auth=auth)[-1][0] == "end"
        # refused requests: a wrong token, a bad body, an unknown model, a failing upstream
        wrong = {"Authorization": f"Bearer {CANARY}"}
        assert httpx.get(url + "/v1/models", headers=wrong).status_code == 401
        chat = url + "/v1/chat/completions"
        bad = f'{{"model": "m", "messages": "{CANARY}"'.encode()
        assert (
            httpx.post(
                chat, headers={**auth, "content-type": "application/json"}, content=bad
            ).status_code
            == 400
        )
        unknown = {"model": CANARY, "messages": messages}
        assert httpx.post(chat, headers=auth, json=unknown).status_code == 404
        fake.script.append({"mode": "status", "status": 400})
        refused = {"model": "m", "messages": messages}
        assert httpx.post(chat, headers=auth, json=refused).status_code == 400
    raw = gateway.access_log()
    assert CANARY.encode() not in raw, "a prompt, completion or credential reached the logs"
    assert b"Bearer" not in raw
    lines = [msgspec.json.decode(line) for line in raw.splitlines() if line.strip()]
    access = [line for line in lines if "path" in line]
    assert len(access) >= 9
    served = [a for a in access if a["path"] == "/v1/chat/completions" and a["status"] == 200]
    assert len(served) == 3
    for line in served:
        assert ACCESS_FIELDS <= line.keys()
        assert (line["pool"], line["replica"], line["engine"]) == ("p", "f0", "openai")
        assert line["tokens_in"] > 0 and line["tokens_out"] > 0
    assert {a["status"] for a in access} >= {200, 202, 400, 401, 404}
    (task_line,) = [line for line in lines if line.get("event") == "task"]
    assert task_line["state"] == "completed" and task_line["replica"] == "f0"
    assert task_line["tokens_out"] == 3 and task_line["tokens_in"] > 0
    own = [line for line in lines if "logger" in line]
    assert own and all({"ts", "level", "logger", "message"} <= line.keys() for line in own)
