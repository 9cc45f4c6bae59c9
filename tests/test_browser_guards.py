"""A hostile page in a real headless Chromium against a gateway on loopback.

The page is served from another loopback origin and does what any web page can do
without permission: ``fetch(..., {mode: "no-cors"})`` with a text body and HTML form
posts (``enctype="text/plain"``, which can carry JSON-looking text) against the control
plane (a reload with an inline launch) and the data plane (a chat completion). The
gateway has no data token, as the embedded default runs. Nothing may run, nothing may
change, and no request may reach the engine; the gateway's own log shows each one arrived
and was refused.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import web

from tests.browser import Browser
from tests.conftest import pool, serve_aiohttp
from tests.fakes.servers import wait_until

pytestmark = pytest.mark.slow  # a real browser

MARKER = Path("/tmp") / f"orchgate-browser-pwned-{os.getpid()}"
RELOAD_BODY = (
    '{"replicas": [{"id": "x", "engine": "openai", "url": "http://127.0.0.1:1", '
    f'"launch": ["/bin/sh", "-c", "touch {MARKER}"]}}]}}'
)
CHAT_BODY = '{"model": "m", "messages": [{"role": "user", "content": "spend your GPU"}]}'


def attacker_page(gateway: str) -> str:
    """What the page does: four no-cors fetches, two form posts, then ``title = done``."""
    reload_url = f"{gateway}/v1/pools/p/reload"
    chat_url = f"{gateway}/v1/chat/completions"
    # a text/plain form sends "name=value": put the JSON's start in the name
    name, _, value = RELOAD_BODY.partition("=")
    return f"""<!doctype html><html><body>
<iframe name="sink1"></iframe><iframe name="sink2"></iframe>
<form id="f1" method="POST" action="{reload_url}" enctype="text/plain" target="sink1">
  <input type="hidden" name='{RELOAD_BODY[:-2]}' value='"}}]}}'></form>
<form id="f2" method="POST" action="{chat_url}" enctype="text/plain" target="sink2">
  <input type="hidden" name='{CHAT_BODY[:-1]}' value='}}'></form>
<script>
const reloadBody = {msgspec.json.encode(RELOAD_BODY).decode()};
const chatBody = {msgspec.json.encode(CHAT_BODY).decode()};
const tries = [
  fetch("{reload_url}", {{method: "POST", mode: "no-cors", body: reloadBody}}),
  fetch("{reload_url}", {{method: "POST", mode: "no-cors", body: reloadBody,
                         headers: {{"Content-Type": "application/json"}}}}),
  fetch("{chat_url}", {{method: "POST", mode: "no-cors", body: chatBody}}),
  fetch("{chat_url}", {{method: "POST", body: chatBody,
                       headers: {{"Content-Type": "application/json"}}}}),  // CORS: preflight
];
let loaded = 0;
for (const sink of ["sink1", "sink2"]) {{
  const frame = document.querySelector(`iframe[name=${{sink}}]`);
  frame.addEventListener("load", () => {{ loaded += 1; }});
}}
document.getElementById("f1").submit();
document.getElementById("f2").submit();
Promise.allSettled(tries).then(() => {{
  const wait = () => loaded >= 2 ? (document.title = "done") : setTimeout(wait, 50);
  wait();
}});
</script></body></html>"""


def test_a_hostile_page_can_neither_run_nor_change_nor_spend_anything(
    fake_upstream: Any, gateway_factory: Any
) -> None:
    fake, server = fake_upstream
    replica = {"id": "f0", "engine": "openai", "url": server.url, "slots": 2}
    config = {"pools": [pool("p", ["m"], [replica])]}  # no data token: the embedded default
    with gateway_factory(config) as gw:
        page = attacker_page(gw.url)

        def site() -> web.Application:
            app = web.Application()

            async def index(_: web.Request) -> web.Response:
                return web.Response(text=page, content_type="text/html")

            app.router.add_get("/", index)
            return app

        before = len(fake.bodies)
        with serve_aiohttp(site) as attacker, Browser() as browser:
            # another origin on this machine: "localhost" is a different site to 127.0.0.1
            browser.goto(attacker.url.replace("127.0.0.1", "localhost") + "/")
            assert browser.wait_for(lambda: browser.evaluate("document.title") == "done")
        assert len(fake.bodies) == before, "a request from the page reached the engine"
        assert not MARKER.exists()
        assert gw.state.pools["p"].variant == "default" and not gw.state.retiring

        def refused(path: str) -> list[int]:
            lines = gw.log_path.read_text().splitlines()
            records = [msgspec.json.decode(line) for line in lines if line.startswith("{")]
            return [r["status"] for r in records if r.get("path") == path and r["method"] == "POST"]

        # they all arrived, and were all refused (the CORS one stopped at its preflight)
        assert wait_until(lambda: len(refused("/v1/pools/p/reload")) >= 3), refused(
            "/v1/pools/p/reload"
        )
        reloads, chats = refused("/v1/pools/p/reload"), refused("/v1/chat/completions")
        assert all(status in (403, 415) for status in reloads), reloads
        assert len(chats) >= 2 and all(status in (403, 415) for status in chats), chats
