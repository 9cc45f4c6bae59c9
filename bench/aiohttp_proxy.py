"""A plain aiohttp pass-through: the naive Python proxy a gateway must beat.

``aiohttp.web`` in front, one pooled ``aiohttp.ClientSession`` behind, bodies streamed
chunk for chunk in both directions, nothing parsed: the ~40 lines someone writes before
reaching for a gateway (the peer issue 15 measures against).

    python -m bench.aiohttp_proxy --listen 9203 --upstream 9200
"""

from __future__ import annotations

import argparse

import aiohttp
import uvloop
from aiohttp import web

_HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}


def make_app(upstream: str) -> web.Application:
    app = web.Application()

    async def session(app: web.Application):  # type: ignore[no-untyped-def]
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
        app["session"] = aiohttp.ClientSession(upstream, connector=connector)
        yield
        await app["session"].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        async with request.app["session"].request(
            request.method, request.rel_url, headers=headers, data=await request.read()
        ) as upstream_response:
            response = web.StreamResponse(status=upstream_response.status)
            content_type = upstream_response.headers.get("Content-Type")
            if content_type:
                response.headers["Content-Type"] = content_type
            await response.prepare(request)
            async for chunk in upstream_response.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", type=int, required=True)
    parser.add_argument("--upstream", type=int, required=True)
    args = parser.parse_args()
    web.run_app(
        make_app(f"http://127.0.0.1:{args.upstream}"),
        host="127.0.0.1",
        port=args.listen,
        print=None,
        access_log=None,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
